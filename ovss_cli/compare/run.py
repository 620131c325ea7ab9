"""Running a comparison: every entry over the same images through ``evaluate`` (with ground
truth) or ``segment`` (plain folders), each into its own folder under ``OUT/entries``, with
its time per image, peak memory and parameter count.

An entry whose folder already holds a complete result made with the same settings on the same
data is not run again, and an unfinished one resumes image by image: a plain-folder entry is
a ``segment`` run, a dataset entry scores the predictions its interrupted run saved instead of
segmenting those images again. So an interrupted comparison re-runs only what is missing.
An entry's folder holds:

- ``started.json``: the identity (settings and data) its run started with; a run with another
  identity (or ``--overwrite``) clears the folder and starts afresh;
- ``timings.jsonl``: one line per image its runs segmented (seconds, and the run's elapsed
  wall time when it finished), so speeds stay right across interruptions;
- ``entry.json``: the finished result (:class:`EntryResult`).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch

from ..datasets import SemSegDataset, select_indices
from ..io.atomic import atomic_write_text
from ..io.images import InputImage, InputWalk
from ..runs.shards import Share
from ..segmenter import Segmenter, load_segmenter, segmenter_identity
from ..shared_models import sharing
from ..vocabulary import Vocabulary
from .entries import Entry

ENTRY_FILE = "entry.json"
STARTED_FILE = "started.json"
TIMINGS_FILE = "timings.jsonl"


@dataclass
class Source:
    """What the entries run on: a dataset (ground truth, scored as ``evaluate`` scores it) or
    images named by paths with a vocabulary (no ground truth). ``limit`` / ``subset`` select
    images the same way for both (:func:`~ovss_cli.datasets.select_indices`)."""

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

    def inputs(self, exclude: Sequence[str | Path] = ()) -> list[InputImage]:
        """Plain folders: the images the walk of ``paths`` finds (nothing inside ``exclude``,
        the comparison's own folder), then the ``subset`` / ``limit`` selection."""
        walk = InputWalk(self.paths or [], exclude=list(exclude))
        found = list(walk)
        if not found:
            raise walk.nothing_found()
        return [found[i] for i in select_indices(len(found), limit=self.limit, subset=self.subset)]

    def identity(self, inputs: Sequence[InputImage] | None = None) -> dict[str, Any]:
        """What the data is: the selection, and a fingerprint of its files (paths, sizes,
        modification times), so results made on other or changed files are not reused.
        ``inputs``: the selected plain-folder images (see :meth:`inputs`)."""
        selection = {"synonyms": self.synonyms, "distractors": list(self.distractors), "limit": self.limit,
                     "subset": self.subset,
                     "vocabulary": self.vocabulary.to_dict() if self.vocabulary else None}
        if self.dataset is not None:
            samples = list(self.dataset.samples(limit=self.limit, subset=self.subset))
            files = [p for s in samples for p in (s.image_path, s.label_path)]
            return {"dataset": self.dataset.name, "classes": self.dataset.class_names,
                    "ignore_label": self.dataset.ignore_label, "images": len(samples),
                    "files": files_fingerprint(files), **selection}
        inputs = list(inputs) if inputs is not None else self.inputs()
        return {"paths": [os.path.abspath(p) for p in self.paths or []], "images": len(inputs),
                "files": files_fingerprint([i.path for i in inputs]), **selection}


def files_fingerprint(paths: Iterable[str | Path]) -> str:
    """A cheap fingerprint of files: each one's absolute path, size and modification time
    (no reading), so it changes when a file is added, removed, replaced or edited."""
    digest = hashlib.sha256()
    for path in paths:
        name = os.fsencode(os.path.abspath(path))
        try:
            stat = os.stat(path)
            digest.update(name + b"\0%d\0%d\0" % (stat.st_size, stat.st_mtime_ns))
        except OSError:
            digest.update(name + b"\0missing\0")
    return digest.hexdigest()


@dataclass
class EntryResult:
    """An entry's outcome, as stored in its ``entry.json``."""

    label: str
    method: str
    describe: dict[str, Any]
    parameters: int
    images: int
    failed: int
    seconds: float  # wall time of the runs that segmented ``image_seconds``' images (loading excluded)
    image_seconds: list[float]  # per image segmented (not those reused from an earlier run)
    peak_memory: int  # bytes: GPU memory allocated on CUDA, process RSS otherwise
    memory_kind: str  # "cuda" or "rss"
    load_seconds: float
    identity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def images_per_second(self) -> float | None:
        """Images segmented per second of wall time (images reused from an earlier run, which
        cost nothing, are not counted)."""
        return len(self.image_seconds) / self.seconds if self.image_seconds and self.seconds > 0 else None


def resident_bytes() -> int:
    """This process's resident set now, in bytes (Linux's /proc; OSError elsewhere)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
        while True:
            try:
                self.peak = max(self.peak, resident_bytes())
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


def entry_identity(entry: Entry, source_identity: dict[str, Any], share: Share) -> dict[str, Any]:
    """What an entry's result depends on (a stored result is reused only for the same)."""
    options = {k: v for k, v in entry.options.items() if k != "progress"}
    return {"label": entry.label, "segmenter": segmenter_identity(entry.method, **options),
            "source": source_identity, "shard": [share.index, share.count]}


def read_entry(folder: Path) -> EntryResult | None:
    path = folder / ENTRY_FILE
    if not path.is_file():
        return None
    return EntryResult(**json.loads(path.read_text(encoding="utf-8")))


def run_entries(entries: Sequence[Entry], source: Source, out_dir: Path, *, share: Share = Share(),
                overwrite: bool = False, quiet: bool = True,
                progress: Callable[[Entry, int | None], ContextManager[Callable]] | None = None) -> list[EntryResult]:
    """Run (or reuse, or resume) every entry; ``progress(entry, total)`` is a context giving a
    per-image callback (a progress bar per entry)."""
    inputs = None if source.has_ground_truth else source.inputs(exclude=[out_dir])
    source_identity = source.identity(inputs)
    results = []
    with sharing():  # variants of one network load it once
        for entry in entries:
            folder = out_dir / "entries" / entry.folder_name
            identity = _as_json(entry_identity(entry, source_identity, share))  # as stored
            stored = read_entry(folder)
            if stored is not None and stored.identity == identity and not overwrite:
                results.append(stored)
                continue
            results.append(_run_entry(entry, source, inputs, folder, identity, share, overwrite, quiet, progress))
            gc.collect()
    return results


def _run_entry(entry: Entry, source: Source, inputs: list[InputImage] | None, folder: Path,
               identity: dict[str, Any], share: Share, overwrite: bool, quiet: bool,
               progress: Callable | None) -> EntryResult:
    from ..evaluate import evaluate_dataset, write_evaluation
    from ..segment import segment_images

    if overwrite or _read_json(folder / STARTED_FILE) != identity:  # other settings or data: afresh
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / STARTED_FILE, json.dumps(identity, indent=2) + "\n")

    t0 = time.perf_counter()
    segmenter: Segmenter = load_segmenter(entry.method, **{**entry.options, "progress": not quiet})
    load_seconds = time.perf_counter() - t0
    device = _device_of(segmenter)
    total = sum(1 for pos in range(_selected(source, inputs)) if share.takes(pos))
    bar = progress(entry, total) if progress else contextlib.nullcontext(None)
    run = secrets.token_hex(8)

    with bar as advance, PeakMemory(device) as memory, open(folder / TIMINGS_FILE, "a", encoding="utf-8") as log:
        start = time.perf_counter()

        def on_result(result) -> None:
            if result.ok and not result.reused:  # an image this run segmented
                log.write(json.dumps({"image": str(result.path), "seconds": result.seconds, "run": run,
                                      "elapsed": time.perf_counter() - start}) + "\n")
                log.flush()
            if advance is not None:
                advance(result)

        if source.has_ground_truth:
            result = evaluate_dataset(segmenter, source.dataset, vocabulary=source.vocabulary,
                                      synonyms=source.synonyms, distractors=source.distractors, limit=source.limit,
                                      subset=source.subset, predictions_dir=folder / "predictions",
                                      reuse_predictions=True, share=share, on_result=on_result)
            write_evaluation(result, folder)
            images, failed = result.images, result.failed
        else:
            summary = segment_images(segmenter, inputs, source.vocabulary, folder, formats=("png", "jsonl"),
                                     share=share, on_result=on_result)
            images, failed = summary.images_ok + summary.images_reused, summary.images_failed
    times, seconds = read_timings(folder)
    stored = EntryResult(entry.label, entry.method, segmenter.describe(), segmenter.num_parameters(), images, failed,
                         seconds, times, memory.peak, memory.kind, load_seconds, identity)
    atomic_write_text(folder / ENTRY_FILE, json.dumps(stored.to_dict(), indent=2) + "\n")
    return stored


def read_timings(folder: Path) -> tuple[list[float], float]:
    """(seconds per image segmented, wall seconds) from an entry's ``timings.jsonl``: every run
    that segmented images counts its wall time up to its last one (an image segmented twice
    counts once, its last time; a line a killed run left half-written is skipped)."""
    per_image: dict[str, float] = {}
    wall: dict[str, float] = {}
    path = folder / TIMINGS_FILE
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    for line in lines:
        try:
            row = json.loads(line)
            per_image[row["image"]] = float(row["seconds"])
            wall[row["run"]] = max(wall.get(row["run"], 0.0), float(row["elapsed"]))
        except (ValueError, KeyError, TypeError):
            continue
    return list(per_image.values()), sum(wall.values())


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _device_of(segmenter: Segmenter) -> torch.device:
    for net in segmenter.networks():
        for param in net.parameters():
            return param.device
    return torch.device("cpu")


def _selected(source: Source, inputs: list[InputImage] | None) -> int:
    """How many images the comparison covers (before sharding)."""
    if source.dataset is not None:
        return len(select_indices(len(source.dataset), limit=source.limit, subset=source.subset))
    return len(inputs or [])
