"""Write files so that readers see either the old content or the complete new content.

A run that is killed half-way must never leave a truncated PNG or JSON behind that looks
finished: data goes to a hidden temp file beside the target, is fsynced, and only then
renamed over the target (``os.replace`` is atomic on the same file system).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import secrets
from pathlib import Path
from typing import IO, Any, Iterator, Literal


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, creating parent directories."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with UTF-8 ``text`` atomically, creating parent directories."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: Literal["w", "wb"] = "w"
) -> Iterator[IO[Any]]:
    """Yield a file that replaces ``path`` when the block ends without an exception.

    Text mode writes UTF-8 with ``\\n`` line endings. If the block raises, the temp file is
    removed and ``path`` is left exactly as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp, fd = _create_temp(target)
    try:
        if mode == "wb":
            handle: IO[Any] = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
    except BaseException:
        os.close(fd)
        _remove_quietly(temp)
        raise
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        _remove_quietly(temp)
        raise
    _fsync_directory(target.parent)


_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete the temp files that writers killed mid-write (SIGKILL, power loss) left under
    ``folder``; call only while no writer is active there. Returns how many were removed."""
    removed = 0
    for root, _, files in os.walk(folder):
        for name in files:
            if _TEMP_NAME.match(name):
                _remove_quietly(Path(root) / name)
                removed += 1
    return removed


def _create_temp(target: Path) -> tuple[Path, int]:
    """Create ``.<name>.<random>.tmp`` next to ``target``; mode 0666 minus the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return temp, os.open(temp, flags, 0o666)
        except FileExistsError:
            continue


def _remove_quietly(path: Path) -> None:
    """Delete ``path`` if it is there; a failure here must not hide the original error."""
    with contextlib.suppress(OSError):
        path.unlink()


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX only; best effort)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Errors that say the output location cannot take more writes, whatever is being written: they
# stop a run (every later write would fail too) instead of failing one image.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def storage_error(error: BaseException, where: str | os.PathLike[str]) -> "OutputError | None":
    """An :class:`~ovss_cli.errors.OutputError` for a full or read-only disk (including
    SQLite's "database or disk is full"), else None."""
    from ..errors import OutputError

    full = "disk is full" in str(error) or "readonly database" in str(error)
    if (isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS) or full:
        what = "no space left on the disk" if "full" in str(error) or getattr(error, "errno", None) in (
            errno.ENOSPC, errno.EDQUOT) else "the disk is read-only"
        return OutputError(f"cannot write to {where}: {what}; free space (or fix the folder) and run the same "
                           "command again: finished images are kept")
    return None


def check_output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Check, without creating anything, that ``path`` is (or can become) a folder that takes
    files: a file in its place or in the way, or a location that cannot be written, is an
    OutputError naming it. For checks before a model loads, when the run may still find
    nothing to do (and then must leave no folder behind)."""
    from ..errors import OutputError

    folder = Path(path)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"lies under the file {existing}"
        raise OutputError(f"{option} {folder} {where}, not a folder; choose a folder")
    _probe(existing, folder, option)
    return folder


def ensure_output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create the output folder and check it takes files, before any work: a file in its place
    or a folder that cannot be written is an OutputError naming it."""
    from ..errors import OutputError

    folder = check_output_folder(path, option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot write to {option} {folder}: {error.strerror or error}; "
                          f"choose another {option}") from None
    _probe(folder, folder, option)
    return folder


def _probe(directory: Path, folder: Path, option: str) -> None:
    """Create and remove a temp file in ``directory``: the one test of writability that holds
    for root, ACLs and read-only mounts alike."""
    from ..errors import OutputError

    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".ovss-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise OutputError(f"cannot write to {option} {folder}: {error.strerror or error}; "
                          f"choose another {option}") from None
