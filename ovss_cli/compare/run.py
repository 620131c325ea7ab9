"""Running a comparison: every entry over the same images through ``evaluate`` (with ground
truth) or ``segment`` (plain folders), each into its own folder under ``OUT/entries``, with
its time per image, peak memory and parameter count.

An entry whose folder already holds a complete result made with the same settings is not run
again, and a plain-folder entry resumes image by image (it is a ``segment`` run): an
interrupted comparison re-runs only what is missing.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch

from ..datasets import SemSegDataset
from ..io.atomic import atomic_write_text
from ..io.images import InputWalk
from ..runs.shards import Share
from ..segmenter import Segmenter, load_segmenter, segmenter_identity
from ..shared_models import sharing
from ..vocabulary import Vocabulary
from .entries import Entry

ENTRY_FILE = "entry.json"


@dataclass
class Source:
    """What the entries run on: a dataset (ground truth, scored as ``evaluate`` scores it) or
    images named by paths with a vocabulary (no ground truth)."""

    dataset: SemSegDataset | None = None
    paths: list[str] | None = None
    vocabulary: Vocabulary | None = None  # plain folders; for a dataset: another (open) vocabulary
    synonyms: str = "whole"
    distractors: Sequence[str] = ()
    limit: int | None = None
    subset: float | None = None

    @property
    def has_ground_truth(self) -> bool:
        return self.dataset is not None

    def identity(self) -> dict[str, Any]:
        return {"dataset": self.dataset.name if self.dataset else None,
                "dataset_size": len(self.dataset) if self.dataset else None,
                "paths": self.paths, "vocabulary": self.vocabulary.to_dict() if self.vocabulary else None,
                "synonyms": self.synonyms, "distractors": list(self.distractors), "limit": self.limit,
                "subset": self.subset}


@dataclass
class EntryResult:
    """An entry's outcome, as stored in its ``entry.json``."""

    label: str
    method: str
    describe: dict[str, Any]
    parameters: int
    images: int
    failed: int
    seconds: float  # wall time over the images (model loading excluded)
    image_seconds: list[float]  # per image
    peak_memory: int  # bytes: GPU memory allocated on CUDA, process RSS otherwise
    memory_kind: str  # "cuda" or "rss"
    load_seconds: float
    identity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class PeakMemory:
    """Peak memory over a block: CUDA's allocator peak on a GPU, else the process's resident set
    size sampled every few milliseconds (it includes what earlier entries left loaded)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @property
    def kind(self) -> str:
        return "cuda" if self.device.type == "cuda" else "rss"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True, name="ovss-memory")
            self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            try:
                with open("/proc/self/statm") as f:
                    self.peak = max(self.peak, int(f.read().split()[1]) * page)
            except OSError:  # not Linux: fall back to the lifetime maximum
                import resource

                self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if self._stop.wait(0.005):
                return

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()


def entry_identity(entry: Entry, source: Source, share: Share) -> dict[str, Any]:
    """What an entry's result depends on (a stored result is reused only for the same)."""
    options = {k: v for k, v in entry.options.items() if k != "progress"}
    return {"label": entry.label, "segmenter": segmenter_identity(entry.method, **options),
            "source": source.identity(), "shard": [share.index, share.count]}


def read_entry(folder: Path) -> EntryResult | None:
    path = folder / ENTRY_FILE
    if not path.is_file():
        return None
    return EntryResult(**json.loads(path.read_text(encoding="utf-8")))


def run_entries(entries: Sequence[Entry], source: Source, out_dir: Path, *, share: Share = Share(),
                overwrite: bool = False, quiet: bool = True,
                progress: Callable[[Entry, int | None], ContextManager[Callable]] | None = None) -> list[EntryResult]:
    """Run (or reuse) every entry; ``progress(entry, total)`` is a context giving a per-image
    callback (a progress bar per entry)."""
    results = []
    with sharing():  # variants of one network load it once
        for entry in entries:
            folder = out_dir / "entries" / entry.folder_name
            identity = entry_identity(entry, source, share)
            stored = read_entry(folder)
            if stored is not None and stored.identity == identity and not overwrite:
                results.append(stored)
                continue
            results.append(_run_entry(entry, source, folder, identity, share, overwrite, quiet, progress))
            gc.collect()
    return results


def _run_entry(entry: Entry, source: Source, folder: Path, identity: dict[str, Any], share: Share, overwrite: bool,
               quiet: bool, progress: Callable | None) -> EntryResult:
    from ..evaluate import evaluate_dataset, write_evaluation
    from ..segment import segment_images
    from ..runs import state as run_state

    t0 = time.perf_counter()
    segmenter: Segmenter = load_segmenter(entry.method, **{**entry.options, "progress": not quiet})
    load_seconds = time.perf_counter() - t0
    device = _device_of(segmenter)
    times: list[float] = []
    total = _count(source, share)
    bar = progress(entry, total) if progress else contextlib.nullcontext(None)

    with bar as advance, PeakMemory(device) as memory:
        def on_result(result) -> None:
            if not getattr(result, "reused", False) and result.ok:
                times.append(result.seconds)
            if advance is not None:
                advance(result)

        start = time.perf_counter()
        if source.has_ground_truth:
            result = evaluate_dataset(segmenter, source.dataset, vocabulary=source.vocabulary,
                                      synonyms=source.synonyms, distractors=source.distractors, limit=source.limit,
                                      subset=source.subset, predictions_dir=folder / "predictions", share=share,
                                      on_result=on_result)
            write_evaluation(result, folder)
            images, failed = result.images, result.failed
        else:
            summary = segment_images(segmenter, InputWalk(source.paths), source.vocabulary, folder,
                                     formats=("png", "jsonl"), share=share, overwrite=overwrite, on_result=on_result)
            images, failed = summary.images_ok + summary.images_reused, summary.images_failed
            final = run_state.read_final(folder)
            times = [r.seconds for r in run_state.records(folder, final[1], final[0]) if r.ok] if final else times
        seconds = time.perf_counter() - start
    stored = EntryResult(entry.label, entry.method, segmenter.describe(), segmenter.num_parameters(), images, failed,
                         seconds, times, memory.peak, memory.kind, load_seconds, identity)
    atomic_write_text(folder / ENTRY_FILE, json.dumps(stored.to_dict(), indent=2) + "\n")
    return stored


def _device_of(segmenter: Segmenter) -> torch.device:
    for net in segmenter.networks():
        for param in net.parameters():
            return param.device
    return torch.device("cpu")


def _count(source: Source, share: Share) -> int | None:
    from ..datasets import select_indices

    if source.dataset is not None:
        n = len(select_indices(len(source.dataset), limit=source.limit, subset=source.subset))
        return sum(1 for pos in range(n) if share.takes(pos))
    if "-" in (source.paths or []):
        return None
    return sum(1 for pos, _ in enumerate(InputWalk(source.paths)) if share.takes(pos))
