"""``ovss segment`` as a library function: images in, label PNGs / overlays / COCO / JSONL out.

Works with any :class:`~ovss_cli.segmenter.Segmenter`. A run is a pipeline: inputs are read
ahead in worker threads, segmented in batches under ``torch.inference_mode``, and written in a
writer thread (every file atomically; an image has all its outputs or none), so decoding and
writing overlap inference. An image that fails is recorded with its reason and the run goes on.

A run can be stopped at any moment and finishes by running the same command again: what is
done is kept under ``OUT/.ovss`` (:mod:`ovss_cli.runs.state`), inputs whose outputs are
complete are skipped, and ``manifest.jsonl`` / ``coco.json`` are written at the end from the
recorded rows in input order (deterministic ids), byte for byte what an uninterrupted run
writes. ``--shard i/n`` and torchrun ranks take a share of the inputs (:mod:`ovss_cli.runs`).
"""
from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .errors import InputError, UsageError, failure_reason
from .io.images import InputImage, InputWalk, output_stem, read_image_notes
from .io.outputs import (
    class_colors,
    coco_annotation,
    coco_categories,
    label_png_dtype,
    render_overlay,
    write_coco,
    write_jsonl,
    write_label_png,
    write_legend,
    write_rgb_png,
)
from .io.atomic import ensure_output_folder, storage_error
from .io.prefetch import prefetched
from .runs import state as run_state
from .runs.distributed import Distributed
from .runs.shards import Share
from .segmenter import OTHER, Prediction, Segment, Segmenter, predict_robustly
from .vocabulary import Vocabulary

FORMATS = ("png", "overlay", "coco", "jsonl")


def parse_formats(text: str) -> tuple[str, ...]:
    """``"png,overlay"`` -> ("png", "overlay"); unknown or empty -> UsageError."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--format is empty; choose from {','.join(FORMATS)}")
    bad = [n for n in names if n not in FORMATS]
    if bad:
        raise UsageError(f"unknown --format {bad[0]!r}; choose from {','.join(FORMATS)}")
    return tuple(dict.fromkeys(names))


@dataclass
class ImageResult:
    """What happened to one input (``reused``: its outputs were complete from an earlier run)."""

    input: InputImage
    ok: bool
    seconds: float = 0.0
    error: str | None = None
    class_fractions: dict[int, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    reused: bool = False

    @property
    def path(self) -> Path:
        return self.input.path


@dataclass
class SegmentSummary:
    """Totals for a run: counts, time, and how often each class appeared."""

    vocabulary: Vocabulary
    images_ok: int = 0
    images_failed: int = 0
    images_reused: int = 0  # complete from an earlier run, skipped
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, reason), first 100
    warnings: Counter = field(default_factory=Counter)  # note -> images (e.g. a CPU fallback, a GIF's first frame)
    class_images: Counter = field(default_factory=Counter)
    class_fraction_sum: Counter = field(default_factory=Counter)
    outputs: dict[str, str] = field(default_factory=dict)
    skipped: str = ""  # files the walk passed over as not images, e.g. "3 .heic, 1 .txt"
    excluded: str = ""  # the warning for inputs left out because they lie in the output folder

    @property
    def images(self) -> int:
        return self.images_ok + self.images_failed + self.images_reused

    def add(self, result: ImageResult) -> None:
        if result.reused:
            self.images_reused += 1
        elif result.ok:
            self.images_ok += 1
            self.warnings.update(result.warnings)
            for c, frac in result.class_fractions.items():
                self.class_images[c] += 1
                self.class_fraction_sum[c] += frac
        else:
            self.images_failed += 1
            if len(self.failures) < 100:
                self.failures.append((str(result.input.path), result.error or "failed"))

    def merge(self, other: "SegmentSummary") -> None:
        """Add another process's totals (torchrun ranks)."""
        self.images_ok += other.images_ok
        self.images_failed += other.images_failed
        self.images_reused += other.images_reused
        self.failures = (self.failures + other.failures)[:100]
        self.warnings.update(other.warnings)
        self.class_images.update(other.class_images)
        self.class_fraction_sum.update(other.class_fraction_sum)
        self.seconds = max(self.seconds, other.seconds)


OTHER_NAME = "other"
OTHER_COLOR = (128, 128, 128)


def output_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels as written to files: "other" becomes the value ``num_classes`` (the class after
    the vocabulary's), unlabelled stays -1."""
    return np.where(labels == OTHER, num_classes, labels) if (labels == OTHER).any() else labels


def class_fractions(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Fraction of the image's pixels given to each present class ("other" is ``num_classes``)."""
    labels = output_labels(labels, num_classes)
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=num_classes + 1)
    total = labels.size
    return {int(c): float(counts[c]) / total for c in np.flatnonzero(counts)}


def class_segments(prediction: Prediction) -> list[Segment]:
    """COCO segments: the method's own, or one per present class of the label map with the
    mean confidence over its pixels as the segment's score."""
    if prediction.segments is not None:
        return prediction.segments
    labels = prediction.labels
    segments = []
    for c in np.unique(labels[labels >= 0]):
        mask = labels == c
        score = float(prediction.confidence[mask].mean()) if prediction.confidence is not None else 1.0
        segments.append(Segment(int(c), score, mask))
    return segments


class OutputWriter:
    """Writes one image's files under ``out_dir`` (``labels/<rel>.png``, ``overlays/<rel>.png``)
    and its row for the run-wide files; :func:`write_run_files` writes ``classes.json``,
    ``coco.json`` and ``manifest.jsonl``."""

    def __init__(self, out_dir: Path, vocabulary: Vocabulary, formats: Sequence[str], other: bool = False):
        self.out_dir = Path(out_dir)
        self.vocabulary = vocabulary
        self.formats = set(formats)
        self.num_classes = len(vocabulary)
        # With "other" possible, label value num_classes is reserved for it.
        self.num_values = self.num_classes + 1 if other else self.num_classes
        self.names = vocabulary.names + [OTHER_NAME]
        self.colors = np.vstack([class_colors(self.num_classes), np.array([OTHER_COLOR], np.uint8)])

    def write(self, pos: int, item: InputImage, image: np.ndarray, prediction: Prediction,
              result: ImageResult) -> run_state.Record:
        """Write one image's files and return its row; if any write fails, the files already
        written are removed (an image has all its outputs or none) and the error propagates."""
        stem = output_stem(item.rel)
        labels = output_labels(prediction.labels, self.num_classes)
        annotations = None
        if "coco" in self.formats:  # encoded (and checked) before any file is written
            annotations = [coco_annotation(seg.class_index, seg.mask, seg.score, self.num_classes)
                           for seg in class_segments(prediction)]
        written: list[Path] = []
        try:
            if "png" in self.formats:
                path = self.out_dir / "labels" / stem.with_name(stem.name + ".png")  # keeps dots: frame.001
                write_label_png(path, labels, self.num_values)
                written.append(path)
            if "overlay" in self.formats:
                path = self.out_dir / "overlays" / stem.with_name(stem.name + ".png")  # keeps dots: frame.001
                write_rgb_png(path, render_overlay(image, labels, self.names, self.colors))
                written.append(path)
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        files = [p.relative_to(self.out_dir).as_posix() for p in written]
        result.outputs = dict(zip([f for f in ("png", "overlay") if f in self.formats], files))
        image_entry = None
        if annotations is not None:
            image_entry = {"file_name": item.rel.as_posix(), "height": int(labels.shape[0]),
                           "width": int(labels.shape[1])}
        return run_state.Record(item.rel.as_posix(), pos, "", True, files, self.manifest_line(result),
                                image_entry, annotations, result.seconds)

    def failed(self, pos: int, result: ImageResult) -> run_state.Record:
        """The row of an input that failed (retried when the run is resumed)."""
        return run_state.Record(result.input.rel.as_posix(), pos, "", False, [], self.manifest_line(result),
                                seconds=result.seconds)

    def manifest_line(self, result: ImageResult) -> dict[str, Any]:
        """The input's ``manifest.jsonl`` line: deterministic (no timings), output paths
        relative to the output folder."""
        rec: dict[str, Any] = {"input": str(result.input.path), "rel": result.input.rel.as_posix(), "ok": result.ok}
        if result.ok:
            rec["outputs"] = dict(result.outputs)
            rec["classes"] = [
                {"id": c, "name": self.names[c], "fraction": round(f, 6)}
                for c, f in sorted(result.class_fractions.items(), key=lambda kv: (-kv[1], kv[0]))
            ]
            if result.warnings:
                rec["warnings"] = result.warnings
        else:
            rec["error"] = result.error
        return rec


def write_legend_file(out_dir: Path, vocabulary: Vocabulary, other: bool, run_info: dict) -> Path:
    """``classes.json``: what each label value means, and the run's settings."""
    num_classes = len(vocabulary)
    path = Path(out_dir) / "classes.json"
    write_legend(
        path,
        vocabulary.names,
        [list(c.synonyms) for c in vocabulary.classes],
        label_png_dtype(num_classes + 1 if other else num_classes),
        extra={
            "other": num_classes if other else None,
            "other_means": "pixels won by a distractor name (or, for sam, masks below --min-score)",
            "distractors": list(vocabulary.distractors),
            # distractors naming the same thing as a class compete for it, not against it
            "distractors_merged": vocabulary.merged_distractors,
            "distractors_dropped": list(vocabulary.dropped_distractors),
            "run": run_info,
        },
    )
    return path


def write_run_files(out_dir: Path, vocabulary: Vocabulary, formats: Sequence[str], generation: str,
                    writers: list[str]) -> dict[str, str]:
    """``manifest.jsonl`` and ``coco.json`` from the rows of ``generation`` in input order, and
    the folder's ``final.json``; returns the paths written."""
    return _write_run_files(out_dir, [list(c.names) for c in vocabulary.classes], formats, generation, writers)


def write_run_files_from(out_dir: Path, identity: dict[str, Any], generation: str, writers: list[str]) -> dict[str, str]:
    """:func:`write_run_files` for a run known by its identity (``ovss merge``)."""
    return _write_run_files(out_dir, identity["vocabulary"]["classes"], identity["formats"], generation, writers)


def _write_run_files(out_dir: Path, class_names: list[list[str]], formats: Sequence[str], generation: str,
                     writers: list[str]) -> dict[str, str]:
    out_dir = Path(out_dir)
    paths = {}
    if "jsonl" in formats:
        write_jsonl(out_dir / "manifest.jsonl",
                    (r.manifest for r in run_state.records(out_dir, writers, generation)))
        paths["jsonl"] = str(out_dir / "manifest.jsonl")
    if "coco" in formats:
        categories = coco_categories([names[0] for names in class_names], [names[1:] for names in class_names])
        write_coco(out_dir / "coco.json", categories,
                   lambda: ((r.image, r.annotations) for r in run_state.records(out_dir, writers, generation)
                            if r.ok and r.image is not None))
        paths["coco"] = str(out_dir / "coco.json")
    run_state.write_final(out_dir, generation, writers)
    return paths


def run_identity(segmenter: dict[str, Any], vocabulary: Vocabulary, formats: Sequence[str]) -> dict[str, Any]:
    """What the outputs of a run depend on (``segmenter``: its identity, see
    :func:`~ovss_cli.segmenter.segmenter_identity`): a resumed run must match it."""
    return {"segmenter": segmenter, "vocabulary": vocabulary.to_dict(), "formats": sorted(formats)}


def plan_run(inputs: Iterable[InputImage], out_dir: str | Path, identity: dict[str, Any], *, overwrite: bool = False,
             share: Share = Share()) -> Iterator[tuple[str, InputImage]]:
    """What a run would do, without loading a model or writing anything: ``(status, input)``
    for this process's inputs, status ``new``, ``done`` (complete from an earlier run),
    ``failed`` (failed earlier: retried); a folder written with other settings is an error
    (unless ``overwrite``, where everything is new)."""
    out_dir = Path(out_dir)
    if isinstance(inputs, InputWalk) and out_dir not in inputs.exclude:
        inputs.exclude.append(out_dir)
    if not overwrite:
        run_state.check_identity(out_dir, identity)
    reader = None if overwrite else run_state.StateReader(out_dir)
    try:
        for pos, item in enumerate(inputs):
            if share.takes(pos):
                yield (reader.status(item.rel.as_posix()) if reader else "new"), item
    finally:
        if reader is not None:
            reader.close()


def _batches(items: Iterable[tuple[int, InputImage]], size: int) -> Iterator[list[tuple[int, InputImage]]]:
    batch: list[tuple[int, InputImage]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _load(item: InputImage) -> tuple[np.ndarray, list[str]] | BaseException:
    """The image and its notes (e.g. "first of 3 frames used"), or why it cannot be read."""
    try:
        if item.error is not None:
            raise InputError(item.error)
        return read_image_notes(item.path)
    except Exception as err:  # reported per image
        return err


class _Writer:
    """Writes finished images in a background thread (``threaded``) or inline, in order; the
    first unexpected error is raised in the calling thread at the next :meth:`put`/:meth:`close`."""

    def __init__(self, handle: Callable[[Any], None], threaded: bool, depth: int = 4):
        self.handle = handle
        self.error: BaseException | None = None
        self.queue: queue.Queue | None = queue.Queue(maxsize=depth) if threaded else None
        self.thread = threading.Thread(target=self._loop, name="ovss-write", daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error is None:
                try:
                    self.handle(job)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self.error = err

    def put(self, job: Any) -> None:
        self._raise()
        if self.queue is None:
            self.handle(job)
        else:
            self.queue.put(job)

    def close(self) -> None:
        """Finish every queued job (completed work is never dropped), then stop."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def default_workers() -> int:
    """Reader threads by default: the CPU cores the model leaves over, at most 4."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


def segment_images(
    segmenter: Segmenter,
    inputs: Iterable[InputImage],
    vocabulary: Vocabulary,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    batch_size: int = 1,
    workers: int | None = None,
    overwrite: bool = False,
    share: Share = Share(),
    dist: Distributed | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
) -> SegmentSummary:
    """Segment the inputs (this process's ``share`` of them) and write the requested outputs;
    returns the run's totals (all ranks' on rank 0 under torchrun).

    Inputs whose outputs are complete from an earlier run with the same settings are skipped
    (``overwrite`` redoes everything); a folder written with other settings is an error naming
    the difference. ``workers`` threads read ahead (0: read and write in this thread).
    ``on_result`` is called after each image (progress bars hook in here). Inputs holding no
    image at all are an :class:`~ovss_cli.errors.InputError` before anything is written.
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    dist = dist or Distributed()
    share = share.with_rank(dist.rank, dist.world)
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise UsageError("--workers must be 0 or more")
    out_dir = Path(out_dir)
    if isinstance(inputs, InputWalk) and out_dir not in inputs.exclude:
        inputs.exclude.append(out_dir)
    items = iter(inputs)
    first = next(items, None)
    if first is None:
        raise inputs.nothing_found() if isinstance(inputs, InputWalk) else InputError("no input images")
    ensure_output_folder(out_dir)
    other = segmenter.can_label_other(vocabulary)
    summary = SegmentSummary(vocabulary)
    start = time.perf_counter()
    writers = [share.with_rank(r, dist.world).writer_name for r in range(dist.world)]
    with run_state.locked(out_dir, enabled=dist.is_main):
        generation = None
        if dist.is_main:
            identity = run_identity(segmenter.identity or segmenter.describe(), vocabulary, formats)
            run_state.prepare(out_dir, identity, overwrite)
            run_state.create_writers(out_dir, writers)
            summary.outputs["classes"] = str(write_legend_file(out_dir, vocabulary, other, segmenter.describe()))
            generation = run_state.new_generation()
        generation = dist.broadcast(generation)  # also: no rank starts before the state is set up
        state = run_state.RunState(out_dir, share.writer_name, generation)
        try:
            _run(segmenter, itertools.chain([first], items), vocabulary, out_dir, formats, batch_size, workers,
                 share, state, OutputWriter(out_dir, vocabulary, formats, other), summary, dist, on_result)
            state.finish()
        finally:
            state.close()
            summary.seconds = time.perf_counter() - start
        dist.barrier()  # every rank's rows are in
        if dist.enabled:
            gathered = dist.all_gather(summary)
            if dist.is_main:
                _check_rank_rows(out_dir, writers, generation, [g.images for g in gathered])
                for other_summary in gathered[1:]:
                    summary.merge(other_summary)
        if dist.is_main:
            try:
                summary.outputs.update(write_run_files(out_dir, vocabulary, formats, generation, writers))
            except OSError as err:
                raise storage_error(err, out_dir) or err from None
        dist.barrier()
    if isinstance(inputs, InputWalk):
        summary.skipped = inputs.skipped_text()
        summary.excluded = inputs.excluded_text()
    return summary


def _check_rank_rows(out_dir: Path, writers: list[str], generation: str, expected: list[int]) -> None:
    """Rank 0 writes the run-wide files from every rank's state file: each must hold the rows
    its rank recorded, else (``--out`` not shared between machines) the run stops instead of
    publishing a manifest that silently lacks them."""
    from .errors import OutputError

    for rank, (writer, count) in enumerate(zip(writers, expected)):
        found = run_state.count_rows(out_dir, writer, generation)
        if found != count:
            raise OutputError(f"rank {rank} recorded {count} input(s) but {out_dir}/.ovss/{writer}.sqlite holds {found}: "
                              "under torchrun on several machines, --out must be a folder all of them share "
                              "(e.g. on NFS or Lustre); finished images are kept, run the same command again")


def _run(segmenter: Segmenter, inputs: Iterator[InputImage], vocabulary: Vocabulary, out_dir: Path,
         formats: Sequence[str], batch_size: int, workers: int, share: Share, state: run_state.RunState,
         writer: OutputWriter, summary: SegmentSummary, dist: Distributed,
         on_result: Callable[[ImageResult], None] | None) -> None:
    """The pipeline: select this process's inputs that are not done, read ahead, segment in
    batches, write behind."""

    lock = threading.Lock()  # results come from the reader (reused inputs) and the writer thread

    def report(result: ImageResult) -> None:
        with lock:
            summary.add(result)
            if on_result is not None:
                on_result(result)

    def selected() -> Iterator[tuple[int, InputImage]]:
        for pos, item in enumerate(inputs):
            if not share.takes(pos):
                continue
            if state.done(item.rel.as_posix(), pos):
                report(ImageResult(item, ok=True, reused=True))
                continue
            yield pos, item

    def store(job: tuple[int, InputImage, np.ndarray | None, Prediction | BaseException, float]) -> None:
        pos, item, image, prediction, seconds = job
        t0 = time.perf_counter()
        if isinstance(prediction, BaseException):
            result = ImageResult(item, ok=False, error=failure_reason(prediction), seconds=seconds)
            state.record(writer.failed(pos, result))
        else:
            result = ImageResult(item, ok=True, warnings=list(prediction.warnings))
            try:
                result.class_fractions = class_fractions(prediction.labels, len(vocabulary))
                result.seconds = seconds + time.perf_counter() - t0
                record = writer.write(pos, item, image, prediction, result)
            except Exception as err:  # this image's failure; the run goes on, unless the disk is full
                fatal = storage_error(err, out_dir)
                if fatal is not None:
                    raise fatal from None
                result = ImageResult(item, ok=False, error=f"cannot write outputs: {failure_reason(err)}",
                                     seconds=seconds)
                record = writer.failed(pos, result)
            state.record(record)
        report(result)

    output = _Writer(store, threaded=workers > 0)
    try:
        batches = _batches(selected(), batch_size)
        loaded = prefetched(batches, lambda batch: [_load(item) for _, item in batch], depth=max(1, workers),
                            workers=max(1, workers)) if workers > 0 else ((b, [_load(i) for _, i in b]) for b in batches)
        for batch, images in loaded:
            for job in _predict(segmenter, vocabulary, batch, images):
                output.put(job)
    except BaseException:
        with contextlib.suppress(BaseException):
            output.close()  # what was segmented is still written
        raise
    output.close()


def _predict(segmenter: Segmenter, vocabulary: Vocabulary, batch: list[tuple[int, InputImage]],
             loaded: list[tuple[np.ndarray, list[str]] | BaseException]):
    """(pos, item, image, prediction or error, seconds) per input of the batch (see
    :func:`~ovss_cli.segmenter.predict_robustly`: one bad or huge image does not fail its
    neighbours); notes from reading an image join its prediction's warnings."""
    good = [i for i in range(len(batch)) if not isinstance(loaded[i], BaseException)]
    predictions: dict[int, Prediction | BaseException] = {i: loaded[i] for i in range(len(batch)) if i not in good}
    t0 = time.perf_counter()
    if good:
        with torch.inference_mode():
            results = predict_robustly(segmenter, [loaded[i][0] for i in good], vocabulary)
        for i, prediction in zip(good, results):
            if isinstance(prediction, Prediction):
                prediction.warnings[:0] = loaded[i][1]
            predictions[i] = prediction
    per_image = (time.perf_counter() - t0) / max(len(good), 1)
    for i, (pos, item) in enumerate(batch):
        image = None if isinstance(loaded[i], BaseException) else loaded[i][0]
        yield pos, item, image, predictions[i], per_image if image is not None else 0.0
