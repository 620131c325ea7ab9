"""Training data: which sample fills each slot of each global batch, its augmented view, and the
checks a dataset passes before the first step.

The data order is a stream of positions 0, 1, 2, ...: position ``p`` is slot ``p % B`` of
global batch ``p // B`` (B = ``--batch-size``) and holds sample ``perm_e[p % n]`` of epoch
``e = p // n``, where ``perm_e`` is a permutation drawn from (seed, e). A process of rank r out of
W reads slots ``[r B/W, (r+1) B/W)`` of every global batch, and the augmentation of position p is
drawn from (seed, p): so a batch holds the same pixels whatever the number of processes, and a
resumed run reads exactly what the interrupted one would have read next.
"""
from __future__ import annotations

import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..datasets import Sample, SemSegDataset
from ..errors import DatasetError
from ..io.images import read_image
from .augment import AugmentConfig, augment

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (independent streams for different tuples)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The sample order of one epoch."""
    return np.random.default_rng([seed, epoch, 0x5A4E]).permutation(count)


class DataOrder:
    """Maps stream positions to sample indices (caching the current epoch's permutation)."""

    def __init__(self, seed: int, count: int):
        self.seed, self.count = seed, count
        self._epoch, self._perm = -1, np.zeros(0, np.int64)

    def sample_index(self, position: int) -> int:
        epoch = position // self.count
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_order(self.seed, epoch, self.count)
        return int(self._perm[position % self.count])


def rank_slots(global_batch: int, rank: int, world: int) -> range:
    """The slots of every global batch that rank ``rank`` reads."""
    per_rank = global_batch // world
    return range(rank * per_rank, (rank + 1) * per_rank)


class RankPositions(torch.utils.data.Sampler):
    """This rank's stream positions for iterations ``[start, stop)``, batch by batch."""

    def __init__(self, start: int, stop: int, global_batch: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.global_batch = start, stop, global_batch
        self.slots = rank_slots(global_batch, rank, world)

    def __iter__(self) -> Iterator[int]:
        for iteration in range(self.start, self.stop):
            for slot in self.slots:
                yield iteration * self.global_batch + slot

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * len(self.slots)


class TrainSamples(torch.utils.data.Dataset):
    """Position -> (image 3 x S x S uint8, label S x S int64, position): the augmented view."""

    def __init__(self, dataset: SemSegDataset, augmentation: AugmentConfig, seed: int):
        self.samples: tuple[Sample, ...] = tuple(dataset.samples())
        self.read_label = dataset.read_label
        self.ignore_label = dataset.ignore_label
        self.augmentation = augmentation
        self.seed = seed
        self.order = DataOrder(seed, len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def view(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[self.order.sample_index(position)]
        image = read_image(sample.image_path)
        label = self.read_label(sample.label_path)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"label {sample.label_path} is {label.shape[1]}x{label.shape[0]} but its image "
                               f"{sample.image_path} is {image.shape[1]}x{image.shape[0]}")
        key = mix_seed(self.seed, position, 0xA06)
        return augment(image, label, self.augmentation, self.ignore_label, np.random.default_rng(key),
                       random.Random(key))

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, label = self.view(int(position))
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(label.astype(np.int64)), int(position)


@dataclass
class Batch:
    """One rank's part of a global batch."""

    images: torch.Tensor  # B x 3 x S x S uint8
    labels: torch.Tensor  # B x S x S int64
    positions: torch.Tensor  # B stream positions


def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> Batch:
    images, labels, positions = zip(*items)
    return Batch(torch.stack(images), torch.stack(labels), torch.tensor(positions, dtype=torch.int64))


def batches(samples: TrainSamples, start: int, stop: int, global_batch: int, rank: int, world: int,
            workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """This rank's batches for iterations ``[start, stop)``, read by ``workers`` processes (the
    same batches whatever their number: a view depends on its position only)."""
    return torch.utils.data.DataLoader(
        samples, batch_size=global_batch // world, sampler=RankPositions(start, stop, global_batch, rank, world),
        num_workers=workers, collate_fn=collate, drop_last=False, persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None, pin_memory=pin_memory,
    )


# ----------------------------------------------------------------------------- checks


def fingerprint(dataset: SemSegDataset) -> str:
    """A hash of the dataset's sample list (ids and paths): a resumed run must see the same one."""
    digest = hashlib.sha256(f"{dataset.name}\n{dataset.ignore_label}\n".encode())
    digest.update("\n".join(dataset.class_names).encode())
    for s in dataset.samples():
        digest.update(f"\n{s.id}\t{s.image_path}\t{s.label_path}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only."""
    with Image.open(path) as image:
        w, h = image.size
        try:
            if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING:
                w, h = h, w
        except Exception:  # a damaged EXIF block: read_image ignores it too
            pass
    return h, w


def check_sample(sample: Sample, dataset: SemSegDataset) -> str | None:
    """Why ``sample`` cannot be trained on, or None: a missing or unreadable label or image, a
    size mismatch, or label values that are neither a class index nor the ignore value."""
    if not sample.label_path.exists():
        return f"image {sample.image_path} has no label: {sample.label_path} is missing"
    if not sample.image_path.exists():
        return f"label {sample.label_path} has no image: {sample.image_path} is missing"
    try:
        label = dataset.read_label(sample.label_path)
    except DatasetError as err:
        return str(err)
    values = np.unique(label)
    bad = values[((values < 0) | (values >= dataset.num_classes)) & (values != dataset.ignore_label)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5]) + (" ..." if bad.size > 5 else "")
        return (f"label {sample.label_path} has values {shown} outside the {dataset.num_classes} classes "
                f"(0..{dataset.num_classes - 1}, and {dataset.ignore_label} = ignore)")
    try:
        size = _image_size(sample.image_path)
    except Exception as err:  # noqa: BLE001 - any decoder failure is the file's fault
        return f"cannot read image {sample.image_path}: {type(err).__name__}: {err}"
    if size != label.shape:
        return (f"label {sample.label_path} is {label.shape[1]}x{label.shape[0]} but its image "
                f"{sample.image_path} is {size[1]}x{size[0]}")
    return None


def check_samples(dataset: SemSegDataset, indices: Sequence[int], workers: int = 4) -> list[str]:
    """Problems of the samples at ``indices`` (each sample read once, ``workers`` threads)."""
    samples = list(dataset.samples())
    picked = [samples[i] for i in indices]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [p for p in pool.map(lambda s: check_sample(s, dataset), picked) if p is not None]


def problems_message(problems: list[str], total: int) -> str:
    more = f" ({len(problems) - 1} more of {total} samples have problems)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}; fix the dataset before training"


def cached_check(cache: Path, key: str) -> bool:
    """Whether the dataset with fingerprint ``key`` passed its checks before (resumed runs)."""
    try:
        return json.loads(cache.read_text()).get("passed") == key
    except (OSError, ValueError, AttributeError):
        return False
