"""Reading ahead: decode the next inputs in background threads while the model works."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterable[T], load: Callable[[T], R], depth: int = 1, workers: int = 1) -> Iterator[tuple[T, R]]:
    """Yield ``(item, load(item))`` in order, with at most ``depth`` items loaded ahead by
    ``workers`` threads (a bounded queue, so memory stays flat however many items there are).
    Decoders (PIL, OpenCV) release the GIL, so threads decode in parallel."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ovss-read") as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(load, item)))
            if len(pending) > depth:
                ready, future = pending.popleft()
                yield ready, future.result()
        while pending:
            ready, future = pending.popleft()
            yield ready, future.result()
