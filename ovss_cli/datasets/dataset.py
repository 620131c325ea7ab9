"""A listed semantic-segmentation dataset: (image, label) pairs plus what the labels mean.

Listing happens once, when the dataset is opened (file names only, nothing decoded);
:meth:`SemSegDataset.samples` then walks the pairs lazily, optionally a deterministic
subset, so a run can stop early or evaluate a slice of a 50k-image set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import UsageError
from .labels import read_label
from .specs import DatasetSpec


@dataclass(frozen=True)
class Sample:
    """One evaluation image: ``id`` is its path relative to the image folder, no extension."""

    id: str
    image_path: Path
    label_path: Path


class SemSegDataset:
    """Sorted (image, label) pairs, the class names label ``i`` stands for, the ignore value.

    ``unmatched_labels`` counts label files with no image (dropped, as detectron2 drops
    them); ``spec`` is the benchmark's :class:`DatasetSpec`, None for a custom layout.
    """

    def __init__(
        self,
        name: str,
        class_names: Sequence[str],
        ignore_label: int,
        pairs: Sequence[Sample],
        *,
        spec: DatasetSpec | None = None,
        unmatched_labels: int = 0,
    ) -> None:
        self.name = name
        self.class_names = list(class_names)
        self.ignore_label = ignore_label
        self.spec = spec
        self.unmatched_labels = unmatched_labels
        self._pairs = tuple(sorted(pairs, key=lambda sample: sample.id))

    def __len__(self) -> int:
        return len(self._pairs)

    def __repr__(self) -> str:
        return f"SemSegDataset({self.name!r}, {len(self.class_names)} classes, {len(self)} images)"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def samples(
        self, limit: int | None = None, subset: float | None = None, seed: int = 0
    ) -> Iterator[Sample]:
        """Yield pairs in id order: all of them, an evenly spread ``subset`` fraction, and/or
        the first ``limit`` of those (see :func:`select_indices`)."""
        for index in select_indices(len(self._pairs), limit=limit, subset=subset, seed=seed):
            yield self._pairs[index]

    def read_label(self, path: str | Path) -> np.ndarray:
        """The label map at ``path`` as int64 values, unchanged (ignore stays ``ignore_label``)."""
        return read_label(path)


def select_indices(
    count: int, limit: int | None = None, subset: float | None = None, seed: int = 0
) -> range | list[int]:
    """Indices into ``count`` sorted items: an evenly spread fraction, then the first N.

    ``subset`` keeps ``k = max(1, round(subset * count))`` items at positions
    ``floor(offset + i * count / k)``, i = 0..k-1, where ``offset`` in [0, count / k) comes
    from ``seed``: every part of the sorted list is represented, and the same seed always
    picks the same items. ``limit`` then keeps the first ``limit`` of those.
    """
    if subset is not None and not (0.0 < subset <= 1.0):
        raise UsageError(f"subset must be a fraction in (0, 1], got {subset}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be a positive number of images, got {limit}")
    indices: range | list[int] = range(count)
    if subset is not None and subset < 1.0 and count > 0:
        k = max(1, round(subset * count))
        step = count / k
        offset = float(np.random.default_rng(seed).random()) * step
        indices = [min(count - 1, math.floor(offset + i * step)) for i in range(k)]
    if limit is not None:
        indices = indices[:limit]
    return indices
