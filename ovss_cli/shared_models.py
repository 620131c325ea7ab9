"""Networks loaded once for several segmenters: ``ovss compare`` builds one segmenter per variant,
and variants that differ only in how they use a network (SAM + Alpha-CLIP's region mode, alpha,
filter; SAN's TTA or resize) must not load its checkpoint again.

Factories wrap their heavy loads in :func:`shared`; outside a :func:`sharing` block it just
builds. Keys name everything the built object depends on (checkpoint file, device, precision),
so a shared network is never used in two different ways.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Hashable, Iterator, TypeVar

T = TypeVar("T")
_cache: dict[Hashable, Any] | None = None


@contextlib.contextmanager
def sharing() -> Iterator[dict[Hashable, Any]]:
    """Within the block, :func:`shared` builds each key once."""
    global _cache
    previous, _cache = _cache, {}
    try:
        yield _cache
    finally:
        _cache = previous


def shared(key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, or inside :func:`sharing` the object built for ``key`` before."""
    if _cache is None:
        return build()
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


def file_key(path: Any) -> tuple:
    """A checkpoint file as part of a key: path, size and modification time."""
    import os

    try:
        stat = os.stat(path)
        return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    except (OSError, TypeError):
        return (str(path),)
