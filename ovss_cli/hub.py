"""Files hosted on the Hugging Face Hub: find them in its cache, fetch them through ``huggingface_hub``.

Going through ``huggingface_hub`` rather than a plain HTTP GET means ovss shares the
Hugging Face cache with open_clip, timm and transformers (a CLIP they already fetched is
not fetched again) and honours what users configure for them: ``HF_ENDPOINT`` mirrors,
``HF_TOKEN``, ``HF_HOME``/``HF_HUB_CACHE``, proxies, timeouts, retries with resume.

Endpoint and cache folder are read from the environment at call time (``huggingface_hub``
reads them once, at import) and passed explicitly. Whether to go online at all is
decided by :mod:`ovss_cli.weights` before anything here touches the network; checksums
are checked there too. Failures raise :class:`HubError` with a one-line reason.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterator

from .errors import WeightsError
from .zoo import HF_DEFAULT_ENDPOINT, HubFile

_SHA256 = re.compile(r"[0-9a-f]{64}")
_DISK_ERRORS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


class HubError(Exception):
    """A file could not be fetched from the Hub; ``reason`` is one short line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def hf_endpoint() -> str:
    """``$HF_ENDPOINT`` (a mirror), else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved as ``huggingface_hub`` resolves it:
    ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def repo_cache_dir(source: HubFile) -> Path:
    """``<cache>/models--<org>--<name>``: where the Hub cache keeps one model repository."""
    return hf_cache_dir() / ("models--" + source.repo_id.replace("/", "--"))


# ----------------------------------------------------------------------------- lookup


def _revisions(source: HubFile) -> list[str]:
    """The pinned revision, then ``main`` (what open_clip fetches), then every other
    cached snapshot."""
    order = [source.revision, "main"]
    snapshots = repo_cache_dir(source) / "snapshots"
    try:
        order += sorted(p.name for p in snapshots.iterdir())
    except OSError:
        pass
    return list(dict.fromkeys(order))


def _acceptable(path: Path, *, sha256: str | None, size: int | None, pinned: bool) -> bool:
    """Whether a cached snapshot file holds the zoo's file, without reading it.

    The Hub cache stores each file once, as ``blobs/<etag>`` (for large files the etag is
    the file's sha256) with symlinks under ``snapshots/<commit>/``: a blob named by a
    different sha256 is a different file. A copy without a symlink (caches on filesystems
    without them) is trusted at the pinned revision, elsewhere only by its exact size.
    """
    try:
        real = path.resolve()
        if not real.is_file():
            return False
        actual = real.stat().st_size
    except OSError:
        return False
    if size is not None and actual != size:
        return False
    if sha256 is None:
        return True
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        return real.name == sha256.lower()
    return pinned or size is not None


def find_in_cache(source: HubFile, *, sha256: str | None, size: int | None) -> Path | None:
    """The cached copy of ``source`` in the Hugging Face cache, or None. Reads no file
    content and makes no request.

    The file itself is looked for at the pinned revision, ``main`` and any other cached
    revision (its blob name must match ``sha256``); then ``source.alternates`` (the same
    weights in another format, which the zoo pins no checksum for).
    """
    if not repo_cache_dir(source).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    cache = str(hf_cache_dir())
    revisions = _revisions(source)
    for filename, checked in [(source.filename, True)] + [(alt, False) for alt in source.alternates]:
        for revision in revisions:
            found = try_to_load_from_cache(source.repo_id, filename, cache_dir=cache, revision=revision)
            if isinstance(found, str) and _acceptable(
                Path(found),
                sha256=sha256 if checked else None,
                size=size if checked else None,
                pinned=revision == source.revision,
            ):
                return Path(found)
    return None


def in_hub_cache(path: Path) -> bool:
    """True if ``path`` lies inside the Hugging Face cache."""
    try:
        return path.absolute().is_relative_to(hf_cache_dir().absolute())
    except OSError:  # pragma: no cover - unreadable cwd
        return False


def remove(path: Path) -> None:
    """Delete a cached snapshot file and the blob it points at (a bad download)."""
    blob = path.resolve()
    for target in (path, blob):
        with contextlib.suppress(FileNotFoundError):
            target.unlink()


# --------------------------------------------------------------------------- download


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn ``huggingface_hub``'s progress bars off for the duration when ``enabled`` is
    False (they are on by default and obey ``HF_HUB_DISABLE_PROGRESS_BARS``)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


# What requests / httpx / http.client raise when a body ends early.
_DROPPED = {"IncompleteRead", "RemoteProtocolError", "ChunkedEncodingError", "ProtocolError", "ReadError"}

_HTTP_HINTS = {
    401: "unauthorized; set HF_TOKEN (or run `hf auth login`) if the repository needs a login",
    403: "forbidden; the repository may be gated: accept its terms on the Hub and set HF_TOKEN",
    404: "not found at this endpoint",
    429: "rate limited; try again later or set HF_TOKEN",
}


def _reason(error: BaseException, endpoint: str) -> str:
    """A short, single-line reason for a failed ``hf_hub_download``."""
    for link in _chain(error):
        status = getattr(getattr(link, "response", None), "status_code", None)
        if isinstance(status, int):
            hint = _HTTP_HINTS.get(status, "")
            return f"HTTP {status} from {endpoint}" + (f": {hint}" if hint else "")
    root = _chain(error)[-1]
    name = type(root).__name__
    if name in _DROPPED:
        return f"the connection to {endpoint} dropped during the transfer; run again to resume"
    if "Timeout" in name or isinstance(root, TimeoutError):
        return f"timed out talking to {endpoint}"
    if "Connect" in name or "Proxy" in name or isinstance(root, ConnectionError):
        found = re.search(r"\[Errno -?\d+\][^'\")]*", str(root))
        detail = found.group(0).strip() if found else _one_line(root, 120)
        return f"cannot reach {endpoint}" + (f" ({detail})" if detail else "")
    return _one_line(f"{name}: {root}" if str(root) else name)


def download(source: HubFile, *, progress: bool = True) -> Path:
    """Fetch ``source`` into the Hugging Face cache with ``hf_hub_download`` and return
    the snapshot path. Network and server failures raise :class:`HubError`; a cache that
    cannot be written raises :class:`WeightsError`."""
    from huggingface_hub import hf_hub_download

    from . import __version__

    endpoint = hf_endpoint()
    cache = hf_cache_dir()
    try:
        with _progress_bars(progress):
            path = hf_hub_download(
                source.repo_id,
                source.filename,
                revision=source.revision,
                cache_dir=str(cache),
                endpoint=endpoint,
                library_name="ovss",
                library_version=__version__,
            )
    except OSError as error:
        if error.errno in _DISK_ERRORS:
            raise WeightsError(
                f"cannot write to the Hugging Face cache {cache}: {_one_line(error.strerror or error)}; "
                f"free some disk space or set HF_HOME to a writable folder"
            ) from None
        raise HubError(_reason(error, endpoint)) from None
    except Exception as error:  # noqa: BLE001 - httpx/requests errors, ValueError, ...: all one message
        raise HubError(_reason(error, endpoint)) from None
    return Path(path)
