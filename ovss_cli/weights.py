"""Checkpoint cache, resumable downloads and safe checkpoint loading.

* :func:`cache_dir` / :func:`cached_path` / :func:`is_cached`: where zoo files live
  (``$OVSS_HOME``, else ``$XDG_CACHE_HOME/ovss``, else ``~/.cache/ovss``; files under
  ``weights/<entry name>/<file name>``).
* :func:`download`: plain :mod:`urllib`, streams into ``<dest>.part``, resumes with an
  HTTP ``Range`` request, checks size and sha256, renames atomically.
* :func:`resolve_weights`: a ``--weights FILE`` wins, else the zoo entry (downloaded
  into the cache on first use).
* :func:`load_state_file`: reads ``.pth``/``.pt``/``.bin`` with torch's weights-only
  unpickler, ``.safetensors`` with safetensors, TorchScript archives with
  ``torch.jit.load``; never unpickles arbitrary Python objects.

Every failure a user can cause or fix raises :class:`~ovss_cli.errors.WeightsError`
with a one-line message.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import re
import socket
import sys
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

from .errors import WeightsError
from .zoo import ZOO, ZooEntry, get_entry

CHUNK = 1 << 20  # bytes read per step while downloading or hashing
_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".tar"}


# ----------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Root of ovss's cache: ``$OVSS_HOME``, else ``$XDG_CACHE_HOME/ovss``, else ``~/.cache/ovss``."""
    home = os.environ.get("OVSS_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "ovss"
    return Path.home() / ".cache" / "ovss"


def text_cache_dir() -> Path | None:
    """Where class-name embeddings persist between runs (None when ``OVSS_TEXT_CACHE=0``)."""
    if os.environ.get("OVSS_TEXT_CACHE", "1") == "0":
        return None
    return cache_dir() / "text-embeddings"


def weights_dir() -> Path:
    """Folder holding downloaded checkpoints: ``cache_dir()/"weights"``."""
    return cache_dir() / "weights"


def cached_path(entry: ZooEntry) -> Path:
    """Where ``entry`` lives once downloaded.

    Each entry gets its own folder because different entries may publish files with
    the same name (the CLIP entries are all ``open_clip_model.safetensors``).
    """
    return weights_dir() / entry.name / entry.filename


def is_cached(entry: ZooEntry) -> bool:
    """True if the file exists and, when the zoo knows its size, has that size."""
    path = cached_path(entry)
    try:
        if not path.is_file():
            return False
        return entry.size is None or path.stat().st_size == entry.size
    except OSError:
        return False


def human_size(n: int | None) -> str:
    """``375042383`` -> ``"357.7 MiB"``; ``None`` -> ``"?"``."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - loop always returns


def zoo_rows() -> list[dict[str, Any]]:
    """One row per zoo entry for an ``ovss models`` table."""
    return [
        {
            "name": entry.name,
            "kind": entry.kind,
            "size": human_size(entry.size),
            "cached": is_cached(entry),
            "path": str(cached_path(entry)),
            "url": entry.url,
        }
        for entry in ZOO.values()
    ]


# -------------------------------------------------------------------------- download


class _NetworkError(Exception):
    """Internal: a transfer failed; ``reason`` is a short, one-line explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _RangeIgnored(Exception):
    """Internal: the server cannot resume at the offset we asked for."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _user_agent() -> str:
    try:
        from . import __version__
    except ImportError:  # pragma: no cover - partial installs
        __version__ = "0"
    return f"ovss/{__version__} (+python-urllib/{sys.version_info.major}.{sys.version_info.minor})"


def _reason(error: BaseException, timeout: float) -> str:
    """A short, single-line reason for a failed request."""
    if isinstance(error, urllib.error.HTTPError):
        return _one_line(f"HTTP {error.code} {error.reason or ''}")
    if isinstance(error, urllib.error.URLError):
        inner = error.reason
        if isinstance(inner, (socket.timeout, TimeoutError)):
            return f"timed out after {timeout:g} s"
        if isinstance(inner, OSError) and inner.strerror:
            return _one_line(inner.strerror)
        return _one_line(inner)
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g} s"
    if isinstance(error, http.client.HTTPException):
        return _one_line(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
    if isinstance(error, OSError) and error.strerror:
        return _one_line(error.strerror)
    return _one_line(error) or type(error).__name__


def _cannot_download(entry: ZooEntry, dest: Path, reason: str) -> WeightsError:
    return WeightsError(
        f"cannot download {entry.name} from {entry.url} ({reason}); "
        f"download it yourself and put it at {dest}, or pass --weights FILE"
    )


def _hash_existing(part: Path) -> tuple["hashlib._Hash", int]:
    digest = hashlib.sha256()
    done = 0
    with part.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
            done += len(block)
    return digest, done


def _content_range_start(value: str | None) -> int | None:
    """Start offset from ``Content-Range: bytes START-END/TOTAL``."""
    if not value:
        return None
    match = re.match(r"\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", value)
    return int(match.group(1)) if match else None


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - zoo URLs are https


class _Progress:
    """A byte progress bar on stderr (rich if available, else tqdm, else nothing)."""

    def __init__(self, enabled: bool, label: str) -> None:
        self._enabled = enabled
        self._label = label
        self._bar: Any = None
        self._task: Any = None
        self._kind = ""

    @property
    def started(self) -> bool:
        return bool(self._kind)

    def start(self, total: int | None, done: int) -> None:
        if not self._enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=total, completed=done)
            self._kind = "rich"
        except ImportError:  # pragma: no cover - rich is a dependency
            try:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=self._label, file=sys.stderr,
                )
                self._kind = "tqdm"
            except ImportError:
                self._bar = None

    def reset(self, total: int | None) -> None:
        if self._kind == "rich":
            self._bar.reset(self._task, total=total, completed=0)
        elif self._kind == "tqdm":  # pragma: no cover
            self._bar.reset(total=total)

    def advance(self, n: int) -> None:
        if self._kind == "rich":
            self._bar.advance(self._task, n)
        elif self._kind == "tqdm":  # pragma: no cover
            self._bar.update(n)

    def close(self) -> None:
        if self._kind == "rich":
            self._bar.stop()
        elif self._kind == "tqdm":  # pragma: no cover
            self._bar.close()
        self._kind = ""


def _transfer(
    entry: ZooEntry, part: Path, digest: "hashlib._Hash", offset: int, timeout: float, bar: _Progress
) -> int:
    """Append the body of ``entry.url`` from ``offset`` to ``part``; return the total size.

    Raises :class:`_RangeIgnored` if the server will not resume at ``offset`` (the caller
    restarts from zero) and :class:`_NetworkError` for any transfer failure.
    """
    try:
        response = _open(entry.url, offset, timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the part is longer than the file, or useless
            raise _RangeIgnored from None
        raise _NetworkError(_reason(error, timeout)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as error:
        raise _NetworkError(_reason(error, timeout)) from None

    with response:
        status = response.status
        if offset and (status != 206 or _content_range_start(response.headers.get("Content-Range")) != offset):
            raise _RangeIgnored  # a 200 restarts the body from byte 0: start over
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        expected = offset + length if length is not None else entry.size
        if bar.started:
            bar.reset(expected)
            bar.advance(offset)
        else:
            bar.start(expected, offset)
        try:
            handle = part.open("ab" if offset else "wb")
        except OSError as error:
            raise _write_failed(part, error) from None
        with handle:
            received = _stream(response, handle, digest, bar, part, timeout)
        if length is not None and received < length:
            raise _NetworkError(
                f"connection closed after {offset + received} of {offset + length} bytes; run again to resume"
            )
        return offset + received


def _write_failed(part: Path, error: OSError) -> WeightsError:
    return WeightsError(
        f"cannot write {part}: {_one_line(error.strerror or error)}; free some disk space "
        f"or set OVSS_HOME to a writable folder"
    )


def _stream(
    response: IO[bytes], handle: IO[bytes], digest: "hashlib._Hash", bar: _Progress, part: Path, timeout: float
) -> int:
    received = 0
    while True:
        try:
            block = response.read(CHUNK)
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise _NetworkError(_reason(error, timeout) + "; run again to resume") from None
        if not block:
            return received
        try:
            handle.write(block)
        except OSError as error:
            raise _write_failed(part, error) from None
        digest.update(block)
        received += len(block)
        bar.advance(len(block))


def download(
    entry: ZooEntry,
    dest: Path | None = None,
    *,
    progress: bool = True,
    timeout: float = 30,
) -> Path:
    """Download ``entry`` to ``dest`` (default :func:`cached_path`) and return the path.

    The body streams into ``<dest>.part``; an existing part is resumed with a ``Range``
    request (if the server answers 200 instead of 206 the download restarts from zero).
    The size and sha256 (when the zoo knows them) are checked before the part is renamed
    onto ``dest``. A checksum or size mismatch deletes the part; a network failure keeps
    it so the next call resumes. Failures raise :class:`WeightsError`.
    """
    dest = Path(dest) if dest is not None else cached_path(entry)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsError(
            f"cannot create {dest.parent}: {_one_line(error.strerror or error)}; "
            f"set OVSS_HOME to a writable folder"
        ) from None

    offset = 0
    digest = hashlib.sha256()
    if part.is_file():
        if entry.size is not None and part.stat().st_size > entry.size:
            part.unlink()  # cannot be a prefix of the right file
        else:
            digest, offset = _hash_existing(part)

    bar = _Progress(progress, entry.name)
    try:
        if offset and entry.size is not None and offset == entry.size:
            total = offset  # a complete part left by an interrupted rename: just verify it
        else:
            try:
                total = _transfer(entry, part, digest, offset, timeout, bar)
            except _RangeIgnored:
                digest = hashlib.sha256()
                total = _transfer(entry, part, digest, 0, timeout, bar)
    except _NetworkError as error:
        raise _cannot_download(entry, dest, error.reason) from None
    except _RangeIgnored:  # pragma: no cover - only after a fresh start, which sends no Range
        raise _cannot_download(entry, dest, "the server sent an unusable partial response") from None
    finally:
        bar.close()

    if entry.size is not None and total != entry.size:
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"checksum did not match for {entry.name} downloaded from {entry.url}: got {total} bytes, "
            f"expected {entry.size}; the download was deleted; run again or download it yourself "
            f"and put it at {dest}"
        )
    got = digest.hexdigest()
    if entry.sha256 is not None and got != entry.sha256.lower():
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"checksum did not match for {entry.name} downloaded from {entry.url}: sha256 {got[:16]}..., "
            f"expected {entry.sha256[:16]}...; the download was deleted; run again or download it "
            f"yourself and put it at {dest}"
        )
    try:
        os.replace(part, dest)
    except OSError as error:
        raise WeightsError(f"cannot move {part} to {dest}: {_one_line(error.strerror or error)}") from None
    return dest


# --------------------------------------------------------------------------- resolve


def resolve_weights(
    name: str | None,
    local: str | Path | None,
    *,
    default: str,
    progress: bool = True,
) -> Path:
    """The checkpoint file to use.

    ``local`` (a ``--weights FILE``) wins; it must be an existing file. Otherwise the zoo
    entry ``name`` (``default`` when ``None``) is returned from the cache, downloading it
    first if needed.
    """
    if local is not None and str(local) != "":
        path = Path(local).expanduser()
        if not path.exists():
            raise WeightsError(
                f"checkpoint not found: {path}; check the path passed to --weights "
                f"(or leave --weights out to use the model zoo)"
            )
        if path.is_dir():
            raise WeightsError(
                f"checkpoint path is a directory, not a file: {path}; pass the checkpoint file itself to --weights"
            )
        return path
    entry = get_entry(name if name is not None else default)
    if is_cached(entry):
        return cached_path(entry)
    return download(entry, progress=progress)


# ------------------------------------------------------------------------------ load


def _looks_like_safetensors(path: Path, file_size: int) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_len <= file_size - 8


def _is_torchscript(path: Path) -> bool:
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" or "/code/" in n or n.startswith("code/")
               for n in names)


def _corrupt(path: Path) -> WeightsError:
    return WeightsError(
        f"{path} is not a readable checkpoint (truncated or corrupt?): delete it and download again"
    )


def load_state_file(path: str | Path) -> dict:
    """Load a checkpoint into a dict of tensors (or the checkpoint's own top-level dict).

    Never unpickles arbitrary objects: pickled checkpoints go through torch's weights-only
    unpickler, ``.safetensors`` through safetensors, TorchScript archives through
    ``torch.jit.load`` (their ``state_dict()`` is returned). Anything unreadable raises
    :class:`WeightsError` naming the file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"checkpoint not found: {path}; check the path passed to --weights")
    if path.is_dir():
        raise WeightsError(f"checkpoint path is a directory, not a file: {path}; pass the checkpoint file itself")
    try:
        file_size = path.stat().st_size
    except OSError as error:
        raise WeightsError(f"cannot read {path}: {_one_line(error.strerror or error)}") from None
    if file_size == 0:
        raise WeightsError(f"{path} is empty (0 bytes; an interrupted download?): delete it and download again")

    if path.suffix.lower() == ".safetensors" or (
        path.suffix.lower() not in _TORCH_SUFFIXES and _looks_like_safetensors(path, file_size)
    ):
        return _load_safetensors(path)

    import torch

    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated"
                module = torch.jit.load(str(path), map_location="cpu")
            return dict(module.state_dict())
        except Exception:  # noqa: BLE001 - any failure means an unusable archive
            raise _corrupt(path) from None

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" in message or "weights_only" in message:
            found = re.search(r"GLOBAL ([\w.]+)", message)
            what = f" ({found.group(1)})" if found else ""
            raise WeightsError(
                f"{path} holds pickled Python objects{what} besides tensors, so ovss refuses to load it "
                f"(loading could run arbitrary code); use the published checkpoint, or convert this one "
                f"to safetensors in a trusted environment"
            ) from None
        raise _corrupt(path) from None
    except MemoryError:
        raise WeightsError(f"not enough memory to load {path}") from None
    except Exception:  # noqa: BLE001 - EOFError, RuntimeError (bad zip), KeyError, ...
        raise _corrupt(path) from None
    if not isinstance(state, dict):
        raise WeightsError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors; pass a model checkpoint"
        )
    return state


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - safetensors is installed with torch tooling
        raise WeightsError(
            f"{path} is a safetensors file but the safetensors package is missing; pip install safetensors"
        ) from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise WeightsError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): delete it and download again"
        ) from None


def load_state_strict(module: Any, state: dict, source: str, expected: str, hint: str = "") -> None:
    """Load ``state`` into ``module`` with exact key and shape matching (assigning tensors, so
    a module built on the meta device gets real ones). A mismatch is one :class:`WeightsError`
    naming the file, what it should have been, counts with an example of each kind, and ``hint``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise WeightsError(f"{source} does not match {expected}: {'; '.join(parts)}" + (f". {hint}" if hint else ""))
    module.load_state_dict(state, strict=True, assign=True)

