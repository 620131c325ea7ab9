"""Checkpoint cache, downloads and safe checkpoint loading.

* :func:`cache_dir` / :func:`cached_path`: ovss's own cache (``$OVSS_HOME``, else
  ``$XDG_CACHE_HOME/ovss``, else ``~/.cache/ovss``; files under
  ``weights/<entry name>/<file name>``), where files ovss downloads from plain URLs go
  and where a file fetched by hand is looked for.
* :func:`find_cached`: a zoo file already on disk, in ovss's cache or (for files hosted
  on the Hugging Face Hub) in the Hugging Face cache (:mod:`ovss_cli.hub`).
* :func:`fetch`: the cached copy, else a download: Hub files through ``huggingface_hub``,
  others with :func:`download` (plain :mod:`urllib`, streams into ``<dest>.part``, resumes
  with an HTTP ``Range`` request, renames atomically). Either way the size and sha256 are
  checked where the zoo pins them. With ``OVSS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` a missing
  file is an error naming the command that fetches it, and nothing touches the network.
* :func:`resolve_weights`: a ``--weights FILE`` wins, else the zoo entry (fetched).
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import hub
from .errors import WeightsError
from .zoo import ZOO, HubFile, ZooEntry, get_entry

CHUNK = 1 << 20  # bytes read per step while downloading or hashing
_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".tar"}
OFFLINE_VARIABLES = ("OVSS_OFFLINE", "HF_HUB_OFFLINE")
# The option that replaces each kind of zoo file with a local one.
_LOCAL_OPTION = {"san": "--weights", "alpha-clip": "--weights", "sam": "--sam-weights", "clip": "--clip-weights"}


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
    """Folder holding checkpoints in ovss's own cache: ``cache_dir()/"weights"``."""
    return cache_dir() / "weights"


def cached_path(entry: ZooEntry) -> Path:
    """Where ``entry`` lives in ovss's own cache: where :func:`download` puts it, and
    where a file fetched by hand is found (for any entry, Hub-hosted ones included).

    Each entry gets its own folder because different entries may publish files with
    the same name (the CLIP entries are all ``open_clip_model.safetensors``).
    """
    return weights_dir() / entry.name / entry.filename


def _size_ok(path: Path, size: int | None) -> bool:
    try:
        return path.is_file() and (size is None or path.stat().st_size == size)
    except OSError:
        return False


def find_cached(entry: ZooEntry) -> Path | None:
    """The file of ``entry`` already on disk, or None; reads no content, makes no request.

    ovss's own cache first (right size, when the zoo knows it), then, for a Hub file, the
    Hugging Face cache (see :func:`ovss_cli.hub.find_in_cache`).
    """
    own = cached_path(entry)
    if _size_ok(own, entry.size):
        return own
    if isinstance(entry.source, HubFile):
        return hub.find_in_cache(entry.source, sha256=entry.sha256, size=entry.size)
    return None


def is_cached(entry: ZooEntry) -> bool:
    """True if :func:`find_cached` finds the file."""
    return find_cached(entry) is not None


def source_url(entry: ZooEntry) -> str:
    """Where ``entry`` is downloaded from now (a Hub file at ``$HF_ENDPOINT``, if set)."""
    if isinstance(entry.source, HubFile):
        return entry.source.url(hub.hf_endpoint())
    return entry.source.url()


def offline_mode() -> str | None:
    """``"OVSS_OFFLINE=1"`` (or the ``HF_HUB_OFFLINE`` setting) when downloads are off, else None.

    Read at call time, with huggingface_hub's notion of true (1, on, yes, true).
    """
    for var in OFFLINE_VARIABLES:
        value = os.environ.get(var, "")
        if value.strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={value.strip()}"
    return None


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


def source_info(entry: ZooEntry) -> dict[str, str]:
    """Where ``entry`` lives, as data: a Hub repository file or a URL."""
    if isinstance(entry.source, HubFile):
        return {"type": "huggingface", "repo_id": entry.source.repo_id, "filename": entry.source.filename,
                "revision": entry.source.revision}
    return {"type": "url", "url": entry.source.url()}


def zoo_json() -> list[dict[str, Any]]:
    """One record per zoo entry for scripts (``ovss models --json``); ``path`` is the
    cached file, or None when it still has to be downloaded."""
    records = []
    for entry in ZOO.values():
        found = find_cached(entry)
        records.append({
            "name": entry.name,
            "kind": entry.kind,
            "arch": entry.arch,
            "description": entry.description,
            "size": entry.size,
            "sha256": entry.sha256,
            "path": str(found) if found else None,
            "source": source_info(entry),
            "url": source_url(entry),
        })
    return records


def zoo_rows() -> list[dict[str, Any]]:
    """One row per zoo entry for an ``ovss models`` table (sizes for people)."""
    return [
        {"name": r["name"], "kind": r["kind"], "size": human_size(r["size"]), "cached": r["path"] is not None,
         "path": r["path"], "url": r["url"]}
        for r in zoo_json()
    ]


def cache_description() -> str:
    """Both caches in one line, for the ``ovss models`` title."""
    return f"{cache_dir()}; Hugging Face files: {hub.hf_cache_dir()}"


# -------------------------------------------------------------------------- messages


def _how_to_get(entry: ZooEntry, dest: Path) -> str:
    """The one hint every missing-file error ends with, offline or after a failed download."""
    option = _LOCAL_OPTION.get(entry.kind, "--weights")
    return (
        f"run `ovss models download {entry.name}` on a machine with internet access (it fills the same cache), "
        f"or download {source_url(entry)} yourself and put it at {dest}, or pass {option} FILE"
    )


def _cannot_download(entry: ZooEntry, dest: Path, reason: str) -> WeightsError:
    return WeightsError(f"cannot download {entry.name} ({reason}); {_how_to_get(entry, dest)}")


def _offline_error(entry: ZooEntry, setting: str) -> WeightsError:
    return WeightsError(
        f"{entry.name} is not in the cache and downloads are off ({setting}); {_how_to_get(entry, cached_path(entry))}"
    )


def _checksum_error(entry: ZooEntry, what: str, dest: Path) -> WeightsError:
    return WeightsError(
        f"checksum did not match for {entry.name} downloaded from {source_url(entry)}: {what}; "
        f"the download was deleted; run again or download it yourself and put it at {dest}"
    )


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
    """Append the body of the entry's URL from ``offset`` to ``part``; return the total size.

    Raises :class:`_RangeIgnored` if the server will not resume at ``offset`` (the caller
    restarts from zero) and :class:`_NetworkError` for any transfer failure.
    """
    try:
        response = _open(source_url(entry), offset, timeout)
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
    it so the next call resumes. In offline mode nothing is requested. Failures raise
    :class:`WeightsError`.
    """
    setting = offline_mode()
    if setting:
        raise _offline_error(entry, setting)
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
        raise _checksum_error(entry, f"got {total} bytes, expected {entry.size}", dest)
    got = digest.hexdigest()
    if entry.sha256 is not None and got != entry.sha256.lower():
        part.unlink(missing_ok=True)
        raise _checksum_error(entry, f"sha256 {got[:16]}..., expected {entry.sha256[:16]}...", dest)
    try:
        os.replace(part, dest)
    except OSError as error:
        raise WeightsError(f"cannot move {part} to {dest}: {_one_line(error.strerror or error)}") from None
    return dest


# ------------------------------------------------------------------------------ fetch


def sha256_file(path: Path, *, progress: bool = False, label: str = "") -> str:
    """Hex sha256 of a file, read in :data:`CHUNK` blocks (a byte progress bar if asked)."""
    digest = hashlib.sha256()
    bar = _Progress(progress, label or path.name)
    try:
        bar.start(path.stat().st_size, 0)
        with path.open("rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
                bar.advance(len(block))
    except OSError as error:
        raise WeightsError(f"cannot read {path}: {_one_line(error.strerror or error)}") from None
    finally:
        bar.close()
    return digest.hexdigest()


def _fetch_from_hub(entry: ZooEntry, progress: bool) -> Path:
    """Download a Hub file into the Hugging Face cache, then check it as :func:`download` does."""
    assert isinstance(entry.source, HubFile)
    setting = offline_mode()
    if setting:
        raise _offline_error(entry, setting)
    try:
        path = hub.download(entry.source, progress=progress)
    except hub.HubError as error:
        raise _cannot_download(entry, cached_path(entry), error.reason) from None
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        hub.remove(path)
        raise _checksum_error(entry, f"got {size} bytes, expected {entry.size}", cached_path(entry))
    if entry.sha256 is not None:
        got = sha256_file(path, progress=progress, label=f"checking {entry.name}")
        if got != entry.sha256.lower():
            hub.remove(path)
            raise _checksum_error(entry, f"sha256 {got[:16]}..., expected {entry.sha256[:16]}...", cached_path(entry))
    return path


def _download_missing(entry: ZooEntry, progress: bool, timeout: float) -> Path:
    if isinstance(entry.source, HubFile):
        return _fetch_from_hub(entry, progress)
    return download(entry, progress=progress, timeout=timeout)


def fetch(entry: ZooEntry, *, progress: bool = True, timeout: float = 30) -> Path:
    """The file of ``entry``: the cached copy (:func:`find_cached`), else downloaded and
    checked. Offline (``OVSS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) a missing file raises
    :class:`WeightsError` naming ``ovss models download`` before any request is made."""
    found = find_cached(entry)
    if found is not None:
        return found
    return _download_missing(entry, progress, timeout)


@dataclass(frozen=True)
class Fetched:
    """What :func:`prefetch` did for one entry."""

    entry: ZooEntry
    path: Path
    action: str  # "downloaded" | "cached" | "replaced" (a cached copy failed its checksum)
    verified: bool  # the sha256 was checked against the zoo's pin


def _is_pinned_file(entry: ZooEntry, path: Path) -> bool:
    """True unless ``path`` is an alternate file (another format) the zoo pins no checksum for."""
    return entry.sha256 is not None and path.name == entry.filename


def prefetch(entry: ZooEntry, *, progress: bool = True, verify: bool = True, timeout: float = 30) -> Fetched:
    """Make sure ``entry`` is on disk ahead of time (``ovss models download``).

    A missing file is downloaded and checked; with ``verify`` a cached one is hashed
    too, and replaced when its sha256 does not match the zoo's (a corrupt copy).
    """
    found = find_cached(entry)
    if found is None:
        path = _download_missing(entry, progress, timeout)
        return Fetched(entry, path, "downloaded", entry.sha256 is not None and _is_pinned_file(entry, path))
    if not (verify and _is_pinned_file(entry, found)):
        return Fetched(entry, found, "cached", False)
    if sha256_file(found, progress=progress, label=f"checking {entry.name}") == entry.sha256.lower():  # type: ignore[union-attr]
        return Fetched(entry, found, "cached", True)
    if hub.in_hub_cache(found):
        hub.remove(found)
    else:
        found.unlink(missing_ok=True)
    return Fetched(entry, fetch(entry, progress=progress, timeout=timeout), "replaced", True)


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
    first if needed (see :func:`fetch`).
    """
    if local is not None and str(local) != "":
        return check_local_checkpoint(local)
    return fetch(get_entry(name if name is not None else default), progress=progress)


def check_local_checkpoint(local: str | Path, flag: str = "--weights") -> Path:
    """``local`` (given with ``flag``) as a path, if it names an existing file; else a
    :class:`WeightsError` saying what is wrong with it."""
    path = Path(local).expanduser()
    if not path.exists():
        raise WeightsError(
            f"checkpoint not found: {path}; check the path passed to {flag} "
            f"(or leave {flag} out to use the model zoo)"
        )
    if path.is_dir():
        raise WeightsError(
            f"checkpoint path is a directory, not a file: {path}; pass the checkpoint file itself to {flag}"
        )
    return path


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
        # a pickle naming a class or function the weights-only unpickler does not allow; other
        # failures ("Unsupported operand", a bad opcode) mean the bytes are not a pickle at all
        if ("Weights only load failed" in message or "weights_only" in message) and "global" in message.lower():
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


def checkpoint_kind(checkpoint: Any) -> str | None:
    """What a loaded checkpoint looks like ("a SAN checkpoint", ...), to say so when it is
    given where another kind belongs; None when it is none of ours."""
    if not isinstance(checkpoint, dict):
        return None
    if "ovss_config" in checkpoint:
        return "a SAN checkpoint"
    keys = list(checkpoint["model"]) if isinstance(checkpoint.get("model"), dict) else list(checkpoint)
    keys = [str(k).removeprefix("module.") for k in keys]
    if any(k.startswith("side_adapter_network.") for k in keys):
        return "a SAN checkpoint"
    if any(k.startswith("image_encoder.") for k in keys) and any(k.startswith("mask_decoder.") for k in keys):
        return "a Segment Anything (SAM) checkpoint"
    if "conv1_alpha.weight" in keys:
        return "an Alpha-CLIP visual checkpoint"
    if "token_embedding.weight" in keys or "visual.conv1.weight" in keys:
        return "a CLIP checkpoint"
    return None


def load_state_strict(module: Any, state: dict, source: str, expected: str, hint: str = "") -> None:
    """Load ``state`` into ``module`` with exact key and shape matching (assigning tensors, so
    a module built on the meta device gets real ones). A mismatch is one :class:`WeightsError`
    naming the file, what it should have been, the missing and unexpected keys and the shape
    mismatches (the first few of each, with counts), what the file looks like, and ``hint``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        def listed(keys: list[str]) -> str:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            return ", ".join(keys[:3]) + more

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({listed(unexpected)})")
        if wrong:
            shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} expected" for k in wrong]
            parts.append(f"{len(wrong)} shape mismatches ({listed(shapes)})")
        kind = checkpoint_kind(state)
        looks = f"; it looks like {kind}" if kind and kind not in expected else ""
        raise WeightsError(f"{source} does not match {expected}: {'; '.join(parts)}{looks}" + (f". {hint}" if hint else ""))
    module.load_state_dict(state, strict=True, assign=True)

