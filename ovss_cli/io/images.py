"""Finding input images and decoding them to 8-bit RGB arrays.

Every method consumes H x W x 3 uint8 RGB, so all the odd cases (EXIF rotation, alpha,
palettes, CMYK, 16-bit samples) are settled here, once. Unreadable files become
:class:`~ovss_cli.errors.InputError` with a one-line reason so a batch run can report the
file and carry on.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Iterator, Sequence, TextIO

import cv2
import cv2.utils.logging
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

_EXIF_ORIENTATION = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_MAX_REASON = 120

# A bad file is reported once, as its InputError; the decoders' own chatter about it (OpenCV's
# log lines, PIL's "Corrupt EXIF data" warnings) would repeat it out of context.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


@dataclass(frozen=True)
class InputImage:
    """One image to process: where it is, and the relative path its outputs mirror.

    ``error`` is set when the walk already knows the input cannot be read (a path from stdin
    that does not exist, a folder that cannot be listed): it is then that input's failure,
    reported like an unreadable image, and the run goes on."""

    path: Path
    rel: Path
    error: str | None = None


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """Whether the file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return PurePath(path).suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- discovery


@dataclass
class WalkLog:
    """What a walk passed over: files that are not images (by extension), and inputs inside an
    excluded folder (the run's own output folder)."""

    skipped: Counter = field(default_factory=Counter)
    excluded: int = 0
    excluded_examples: list[str] = field(default_factory=list)
    output_folders: list[str] = field(default_factory=list)  # other ovss runs' output folders passed over
    hidden: int = 0  # entries whose names start with "." (not walked)

    def exclude(self, path: str | Path) -> None:
        self.excluded += 1
        if len(self.excluded_examples) < 5:
            self.excluded_examples.append(str(path))


def iter_inputs(paths: Sequence[str], stdin: TextIO | None = None, log: WalkLog | None = None,
                exclude: Sequence[str | Path] = ()) -> Iterator[InputImage]:
    """Yield the images named by CLI arguments, lazily and in a deterministic order.

    Each argument is a file, a directory (walked recursively in sorted order, image
    extensions only, hidden entries skipped) or ``-`` for newline-separated paths read from
    ``stdin``. Explicit arguments are checked up front so a typo fails before any work;
    paths read from stdin that do not exist, and folders that cannot be listed, are yielded
    with their ``error`` set. Folders in ``exclude`` are not entered and files inside them
    not yielded (a run never reads its own outputs). ``log`` counts what was passed over.

    Outputs are named after ``rel`` without its extension, so two inputs whose ``rel``
    differ only in extension or letter case (``a.jpg``, ``A.png``) would clash: later ones
    get ``_2``, ``_3``... suffixes. With a single directory argument clashes can only occur
    inside one folder, so the bookkeeping is per folder and memory stays flat however many
    images there are; with several arguments or stdin it spans the whole run.
    """
    for arg in paths:
        if arg == "-":
            continue
        kind, reason = path_kind(Path(arg))
        if kind == "missing":
            raise InputError(f"input not found: {arg}")
        if kind == "error":
            raise InputError(f"cannot access input {arg}: {reason}")
    run_wide: set[str] | None = set() if len(paths) != 1 or paths[0] == "-" else None
    walk = _Walk(log if log is not None else WalkLog(), tuple(os.path.realpath(e) for e in exclude))
    for arg in paths:
        sources = _iter_stdin_paths(stdin if stdin is not None else sys.stdin) if arg == "-" else [arg]
        for source in sources:
            yield from walk.expand(source, run_wide)


class InputWalk:
    """The inputs of one run (see :func:`iter_inputs`), re-iterable, remembering what the walk
    passed over so a run that finds nothing can say what it found instead."""

    def __init__(self, paths: Sequence[str], stdin: TextIO | None = None, exclude: Sequence[str | Path] = ()):
        self.paths = list(paths)
        self.stdin = stdin
        self.exclude = list(exclude)
        self.log = WalkLog()

    def __iter__(self) -> Iterator[InputImage]:
        self.log = WalkLog()
        return iter_inputs(self.paths, self.stdin, self.log, self.exclude)

    def skipped_text(self) -> str:
        """``"3 .heic, 1 .gif"``: the files passed over, by extension (most frequent first)."""
        return ", ".join(f"{n} {ext}" for ext, n in self.log.skipped.most_common())

    def excluded_text(self) -> str:
        """A warning naming the inputs left out because they lie in an excluded folder, and the
        output folders of other ovss runs (e.g. other shards') the walk did not enter."""
        parts = []
        if self.log.excluded:
            where = ", ".join(str(e) for e in self.exclude)
            examples = ", ".join(self.log.excluded_examples)
            parts.append(f"left out {self.log.excluded} input(s) inside the output folder {where} "
                         f"(a run never reads its own outputs): {examples}{', ...' if self.log.excluded > 5 else ''}")
        if self.log.output_folders:
            folders = self.log.output_folders
            parts.append(f"did not enter {len(folders)} folder(s) holding another ovss run's outputs: "
                         f"{', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''}")
        return "; ".join(parts)

    def nothing_found(self) -> InputError:
        """The error for a run whose inputs hold no image file."""
        where = ", ".join("stdin" if p == "-" else p for p in self.paths)
        skipped = self.log.skipped
        found = f"; skipped {sum(skipped.values())} other files ({self.skipped_text()})" if skipped else ""
        if self.log.excluded:
            found += f"; {self.log.excluded} inside the output folder were left out"
        if self.log.output_folders:
            found += f"; {len(self.log.output_folders)} folder(s) of other ovss runs' outputs were not entered"
        if self.log.hidden:
            found += f"; {self.log.hidden} hidden entries (names starting with '.') were not read"
        supported = ", ".join(sorted(IMAGE_EXTENSIONS))
        return InputError(f"no image found in {where}{found}; supported: {supported}")


def _iter_stdin_paths(stream: TextIO) -> Iterator[str]:
    """Non-blank lines of ``stream``, stripped, read one at a time."""
    for line in stream:
        line = line.strip()
        if line:
            yield line


class _Walk:
    """One run's walk: the log it fills and the folders it must not enter."""

    def __init__(self, log: WalkLog, exclude: tuple[str, ...]):
        self.log = log
        self.exclude = exclude

    def excluded(self, path: Path) -> bool:
        if not self.exclude:
            return False
        real = os.path.realpath(path)
        return any(real == e or real.startswith(e + os.sep) for e in self.exclude)

    def expand(self, source: str, used: set[str] | None) -> Iterator[InputImage]:
        """One argument -> its images (itself if it is a file, its tree if a directory)."""
        path = Path(source)
        if self.excluded(path):
            self.log.exclude(path)
            return
        kind, reason = path_kind(path)
        if kind == "dir":
            yield from self.walk(path, Path(), set(), used)
            return
        rel = _unique_rel(_rel_for_file(path), used if used is not None else set())
        error = {"missing": f"input not found: {source}", "error": f"cannot access input {source}: {reason}"}
        yield InputImage(path, rel, error.get(kind))

    def walk(self, directory: Path, rel_dir: Path, seen: set[tuple[int, int]], used: set[str] | None) -> Iterator[InputImage]:
        """Depth-first walk of ``directory`` (whose outputs go under ``rel_dir``) in name order,
        one directory listing at a time.

        ``seen`` holds the (device, inode) of directories on the walk so that symlink loops
        are not followed forever; ``used`` is the run-wide set of output names, or None to
        deduplicate within this folder only. Sub-folders whose names differ only in case
        (``Sub``, ``sub``) get distinct output folders (``sub_2``), so outputs never clash on a
        case-insensitive disk. A folder that cannot be listed is yielded as a failed input; the
        walk goes on with its siblings.
        """
        try:
            info = directory.stat()
            key = (info.st_dev, info.st_ino)
            if key in seen:
                return
            seen.add(key)
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            rel = rel_dir if rel_dir != Path() else Path(directory.name)
            yield InputImage(directory, rel, f"cannot list directory {directory}: {error.strerror or error}")
            return
        local = used if used is not None else set()
        folders: set[str] = set()  # output names of this listing's sub-folders, case-folded
        for entry in entries:
            if entry.name.startswith("."):
                self.log.hidden += 1
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()
            except OSError:  # a symbolic link loop: reported below if it looks like an image
                is_dir = False
            if is_dir:
                if self.excluded(path):
                    self.log.exclude(path)
                elif is_output_folder(path):
                    self.log.output_folders.append(str(path))
                else:
                    yield from self.walk(path, rel_dir / _unique_folder(entry.name, folders), seen, used)
            elif not is_image_path(entry.name):
                self.log.skipped[PurePath(entry.name).suffix.lower() or "(no extension)"] += 1
            else:
                rel = _unique_rel(rel_dir / entry.name, local)
                kind, reason = path_kind(path)
                yield InputImage(path, rel, None if kind == "file" else f"cannot read image {path}: "
                                 f"{reason if kind == 'error' else _missing_reason(path)}")
        seen.discard(key)


def _unique_folder(name: str, used: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``... when a sibling folder's name equals it but for case."""
    candidate, counter = name, 1
    while candidate.casefold() in used:
        counter += 1
        candidate = f"{name}_{counter}"
    used.add(candidate.casefold())
    return candidate


def is_output_folder(path: Path) -> bool:
    """Whether ``path`` holds the outputs of an ovss run (``segment``'s ``.ovss/run.json``,
    ``compare``'s ``compare.json``): a walk never reads them as inputs, whichever run wrote
    them (another shard's ``--out`` inside the input folder, say)."""
    return os.path.isfile(path / ".ovss" / "run.json") or os.path.isfile(path / "compare.json")  # never raise


def path_kind(path: Path) -> tuple[str, str | None]:
    """``("dir" | "file" | "missing" | "error", reason)`` for ``path``, never raising: a folder
    without search permission makes ``Path.exists()`` raise, and must fail one input instead
    of the run."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return "missing", None
        reason = "permission denied" if error.errno == errno.EACCES else (error.strerror or str(error))
        return "error", reason
    return ("dir" if stat.S_ISDIR(mode) else "file"), None


def _rel_for_file(path: Path) -> Path:
    """The path as given when it is relative and stays inside the cwd, else the file name."""
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return Path(path.name)
    return path


def _unique_rel(rel: Path, used: set[str]) -> Path:
    """``rel`` itself if its output name is unused, else ``name_2.ext``, ``name_3.ext``...

    Output names ignore the extension and letter case (see :func:`output_stem`)."""
    candidate = rel
    counter = 1
    while output_stem(candidate).as_posix().lower() in used:
        counter += 1
        candidate = rel.with_name(f"{rel.stem}_{counter}{rel.suffix}")
    used.add(output_stem(candidate).as_posix().lower())
    return candidate


def output_stem(rel: Path) -> Path:
    """The extension-less relative path that an input's output files are named after."""
    return rel.with_suffix("")


# --------------------------------------------------------------------------- decoding


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to a C-contiguous H x W x 3 uint8 RGB array.

    EXIF orientation is applied; alpha is dropped (not composited); grayscale, palette,
    CMYK and YCbCr become RGB; 16-bit samples are scaled so 65535 -> 255 with rounding;
    animated GIFs and multi-page TIFFs give their first frame (:func:`read_image_notes`
    says so). Any failure to decode raises :class:`InputError` naming the file.
    """
    return read_image_notes(path)[0]


def read_image_notes(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str]]:
    """:func:`read_image`, plus notes worth recording with the result (``"first of 3 frames"``)."""
    path = Path(path)
    kind, reason = path_kind(path)
    if kind == "dir":
        raise InputError(f"cannot read image {path}: it is a directory, not a file")
    if kind == "missing":
        raise InputError(f"cannot read image {path}: {_missing_reason(path)}")
    if kind == "error":
        raise InputError(f"cannot read image {path}: {reason}")
    notes: list[str] = []
    try:
        if path.stat().st_size == 0:
            raise InputError(f"cannot read image {path}: file is empty")
        rgb = _decode(path, notes)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(
            f"cannot read image {path}: too many pixels (decompression bomb guard); "
            "downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read image {path}: not a recognised image format") from None
    except MemoryError:
        raise InputError(f"cannot read image {path}: out of memory while decoding") from None
    except PermissionError:
        raise InputError(f"cannot read image {path}: permission denied") from None
    except Exception as error:  # any decoder failure on a bad file is the input's fault
        raise InputError(f"cannot read image {path}: {_short_reason(error)}") from None
    return np.ascontiguousarray(rgb), notes


def _missing_reason(path: Path) -> str:
    """Why a path that is listed does not exist: a broken or looping symbolic link, or gone."""
    try:
        link = path.is_symlink()
    except OSError:
        link = False
    if link:
        try:
            path.resolve(strict=True)
        except RuntimeError:
            return "symbolic link loop"
        except OSError as error:
            if error.errno == errno.ELOOP:
                return "symbolic link loop"
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    return "file not found (deleted after it was listed?)"


def _decode(path: Path, notes: list[str]) -> np.ndarray:
    """PIL first; OpenCV for files PIL cannot open or would truncate (16-bit colour)."""
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        rgb = _decode_with_cv2(path)
        if rgb is None:
            raise
        return rgb
    with image:
        frames = getattr(image, "n_frames", 1)
        if frames > 1:  # animated GIF/WebP, multi-page TIFF: the first frame, said so
            image.seek(0)
            kind = "pages" if image.format == "TIFF" else "frames"
            notes.append(f"first of {frames} {kind} used")
        if _is_wide_colour(image):
            rgb = _decode_with_cv2(path)
            if rgb is None:
                raise InputError(f"cannot read image {path}: corrupt or truncated 16-bit image")
            return _apply_orientation(rgb, _orientation(image))
        image.load()  # PIL is lazy: decode everything now, inside the caller's try
        image = ImageOps.exif_transpose(image)
        return _pil_to_rgb(image, path)


def _is_wide_colour(image: Image.Image) -> bool:
    """Whether PIL would silently cut a 16-bit colour image down to 8 bits by truncation."""
    if image.mode not in ("RGB", "RGBA", "LA") or not image.tile:
        return False
    args = image.tile[0][3]  # (codec, extents, offset, args); args starts with the raw mode
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return isinstance(rawmode, str) and ";16" in rawmode


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or unreadable)."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # broken EXIF must not make a good image unreadable
        return 1


def _apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip an RGB array as the EXIF orientation tag says."""
    method = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
    if method is None:
        return rgb
    return np.asarray(Image.fromarray(rgb).transpose(method))


def _pil_to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """Any decoded PIL image -> H x W x 3 uint8 RGB."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode.startswith("I;16") or mode == "I":
        gray = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return _gray_to_rgb(_scale_16_to_8(gray))
    if mode == "F":
        gray = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if gray.size and gray.max() <= 1.0:
            gray = gray * 255.0
        return _gray_to_rgb(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    if mode in ("P", "PA"):
        image = image.convert("RGBA")  # applies palette transparency without a warning
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError):
        raise InputError(f"cannot read image {path}: unsupported pixel mode {mode}") from None


def _decode_with_cv2(path: Path) -> np.ndarray | None:
    """Decode with OpenCV (unchanged depth/channels) to uint8 RGB; None if it cannot."""
    buffer = np.fromfile(str(path), dtype=np.uint8)
    if buffer.size == 0:
        return None
    array = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if array is None:
        return None
    if array.dtype == np.uint16:
        array = _scale_16_to_8(array)
    elif array.dtype != np.uint8:
        return None
    if array.ndim == 2:
        return _gray_to_rgb(array)
    channels = array.shape[2]
    if channels == 1 or channels == 2:  # gray, gray + alpha
        return _gray_to_rgb(array[:, :, 0])
    if channels == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    return None


def _scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded to nearest (65535 / 257 == 255 exactly)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """H x W -> H x W x 3 by repeating the channel."""
    return np.repeat(gray[:, :, None], 3, axis=2)


def _short_reason(error: BaseException) -> str:
    """First line of an exception message, trimmed for a one-line report."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return text
