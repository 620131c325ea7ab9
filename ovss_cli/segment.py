"""``ovss segment`` as a library function: images in, label PNGs / overlays / COCO / JSONL out.

Works with any :class:`~ovss_cli.segmenter.Segmenter`. Images stream through in batches
(decoding runs one batch ahead in a background thread), every file is written atomically,
and an image that fails is recorded with its reason without stopping the others.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import InputError, UsageError, failure_reason
from .io.images import InputImage, InputWalk, output_stem, read_image
from .io.prefetch import prefetched
from .io.outputs import (
    JsonlManifest,
    RunningCocoWriter,
    class_colors,
    label_png_dtype,
    render_overlay,
    write_label_png,
    write_legend,
    write_rgb_png,
)
from .segmenter import OTHER, Prediction, Segment, Segmenter
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
    """What happened to one input."""

    input: InputImage
    ok: bool
    seconds: float = 0.0
    error: str | None = None
    class_fractions: dict[int, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.input.path


@dataclass
class SegmentSummary:
    """Totals for a run: counts, time, and how often each class appeared."""

    vocabulary: Vocabulary
    images_ok: int = 0
    images_failed: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, reason), first 100
    class_images: Counter = field(default_factory=Counter)
    class_fraction_sum: Counter = field(default_factory=Counter)
    outputs: dict[str, str] = field(default_factory=dict)
    skipped: str = ""  # files the walk passed over as not images, e.g. "3 .heic, 1 .txt"

    @property
    def images(self) -> int:
        return self.images_ok + self.images_failed

    def add(self, result: ImageResult) -> None:
        if result.ok:
            self.images_ok += 1
            for c, frac in result.class_fractions.items():
                self.class_images[c] += 1
                self.class_fraction_sum[c] += frac
        else:
            self.images_failed += 1
            if len(self.failures) < 100:
                self.failures.append((str(result.input.path), result.error or "failed"))


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
    """Writes one run's files under ``out_dir``: ``labels/<rel>.png``,
    ``overlays/<rel>.png``, ``classes.json``, ``coco.json``, ``manifest.jsonl``."""

    def __init__(self, out_dir: Path, vocabulary: Vocabulary, formats: Sequence[str], run_info: dict,
                 other: bool = False):
        self.out_dir = Path(out_dir)
        self.vocabulary = vocabulary
        self.formats = set(formats)
        self.num_classes = len(vocabulary)
        # With "other" possible, label value num_classes is reserved for it.
        self.num_values = self.num_classes + 1 if other else self.num_classes
        self.names = vocabulary.names + [OTHER_NAME]
        self.colors = np.vstack([class_colors(self.num_classes), np.array([OTHER_COLOR], np.uint8)])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.legend_path = self.out_dir / "classes.json"
        write_legend(
            self.legend_path,
            vocabulary.names,
            [list(c.synonyms) for c in vocabulary.classes],
            label_png_dtype(self.num_values),
            extra={
                "other": self.num_classes if other else None,
                "other_means": "pixels won by a distractor name (or, for sam, masks below --min-score)",
                "distractors": list(vocabulary.distractors),
                # distractors naming the same thing as a class compete for it, not against it
                "distractors_merged": vocabulary.merged_distractors,
                "distractors_dropped": list(vocabulary.dropped_distractors),
                "run": run_info,
            },
        )
        self.coco = RunningCocoWriter(self.out_dir / "coco.json", vocabulary.names,
                                      [list(c.synonyms) for c in vocabulary.classes]) if "coco" in self.formats else None
        self.manifest = JsonlManifest(self.out_dir / "manifest.jsonl") if "jsonl" in self.formats else None

    def paths(self) -> dict[str, str]:
        out = {"classes": str(self.legend_path)}
        if self.coco is not None:
            out["coco"] = str(self.out_dir / "coco.json")
        if self.manifest is not None:
            out["jsonl"] = str(self.out_dir / "manifest.jsonl")
        return out

    def write(self, item: InputImage, image: np.ndarray, prediction: Prediction, result: ImageResult) -> None:
        """Write one image's files; if any write fails, the ones already written are removed
        (an image has all its outputs or none) and the error propagates."""
        stem = output_stem(item.rel)
        labels = output_labels(prediction.labels, self.num_classes)
        segments = class_segments(prediction) if self.coco is not None else []
        written: list[Path] = []
        try:
            if "png" in self.formats:
                path = self.out_dir / "labels" / stem.with_suffix(".png")
                write_label_png(path, labels, self.num_values)
                written.append(path)
                result.outputs["png"] = str(path)
            if "overlay" in self.formats:
                path = self.out_dir / "overlays" / stem.with_suffix(".png")
                write_rgb_png(path, render_overlay(image, labels, self.names, self.colors))
                written.append(path)
                result.outputs["overlay"] = str(path)
            if self.coco is not None:
                image_id = self.coco.add_image(item.rel.as_posix(), *prediction.labels.shape,
                                               [(seg.class_index, seg.mask, seg.score) for seg in segments])
                result.outputs["coco_image_id"] = str(image_id)
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            result.outputs.clear()
            raise

    def record(self, result: ImageResult) -> None:
        if self.manifest is None:
            return
        rec: dict = {"input": str(result.input.path), "rel": result.input.rel.as_posix(), "ok": result.ok}
        if result.ok:
            rec["outputs"] = {k: v for k, v in result.outputs.items() if k != "coco_image_id"}
            rec["classes"] = [
                {"id": c, "name": self.names[c], "fraction": round(f, 6)}
                for c, f in sorted(result.class_fractions.items(), key=lambda kv: -kv[1])
            ]
            if result.warnings:
                rec["warnings"] = result.warnings
        else:
            rec["error"] = result.error
        rec["seconds"] = round(result.seconds, 4)
        self.manifest.write(rec)

    def close(self) -> None:
        """Publish ``coco.json`` and ``manifest.jsonl``: the run completed."""
        if self.coco is not None:
            self.coco.close()
        if self.manifest is not None:
            self.manifest.close()

    def abandon(self) -> None:
        """The run did not complete (interrupted, crashed): publish nothing that would look
        finished; ``manifest.jsonl.part`` keeps the record of every completed image."""
        if self.coco is not None:
            self.coco.discard()
        if self.manifest is not None:
            self.manifest.abandon()


def _batches(items: Iterable[InputImage], size: int) -> Iterator[list[InputImage]]:
    batch: list[InputImage] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _load(batch: list[InputImage]) -> list[np.ndarray | BaseException]:
    out: list[np.ndarray | BaseException] = []
    for item in batch:
        try:
            if item.error is not None:
                raise InputError(item.error)
            out.append(read_image(item.path))
        except Exception as err:  # reported per image
            out.append(err)
    return out


def segment_images(
    segmenter: Segmenter,
    inputs: Iterable[InputImage],
    vocabulary: Vocabulary,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    batch_size: int = 1,
    on_result: Callable[[ImageResult], None] | None = None,
) -> SegmentSummary:
    """Segment every input and write the requested outputs; returns the run's totals.

    ``on_result`` is called after each image (progress bars hook in here). Inputs holding no
    image at all are an :class:`~ovss_cli.errors.InputError` before anything is written (an
    :class:`~ovss_cli.io.images.InputWalk` says what it skipped). ``coco.json`` and
    ``manifest.jsonl`` are published only when the run completes.
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    items = iter(inputs)
    first = next(items, None)
    if first is None:
        raise inputs.nothing_found() if isinstance(inputs, InputWalk) else InputError("no input images")
    writer = OutputWriter(Path(out_dir), vocabulary, formats, run_info=segmenter.describe(),
                          other=segmenter.can_label_other(vocabulary))
    summary = SegmentSummary(vocabulary, outputs=writer.paths())
    start = time.perf_counter()
    try:
        # the next batch is decoded while this one is segmented
        for batch, images in prefetched(_batches(itertools.chain([first], items), batch_size), _load):
            for result in _run_batch(segmenter, writer, vocabulary, batch, images):
                summary.add(result)
                writer.record(result)
                if on_result is not None:
                    on_result(result)
    except BaseException:
        writer.abandon()
        raise
    finally:
        summary.seconds = time.perf_counter() - start
    writer.close()
    if isinstance(inputs, InputWalk):
        summary.skipped = inputs.skipped_text()
    return summary


def _run_batch(segmenter: Segmenter, writer: OutputWriter, vocabulary: Vocabulary,
               batch: list[InputImage], images: list[np.ndarray | BaseException]) -> list[ImageResult]:
    results = {i: ImageResult(item, ok=False, error=failure_reason(images[i]))
               for i, item in enumerate(batch) if isinstance(images[i], BaseException)}
    good = [i for i in range(len(batch)) if i not in results]
    t0 = time.perf_counter()
    predictions: dict[int, Prediction | BaseException] = {}
    if good:
        try:
            preds = segmenter.predict_batch([images[i] for i in good], vocabulary)  # type: ignore[misc]
            predictions = dict(zip(good, preds))
        except Exception:
            # Find the culprit: retry one by one so one bad image does not fail its batch.
            for i in good:
                try:
                    predictions[i] = segmenter.predict(images[i], vocabulary)  # type: ignore[arg-type]
                except Exception as err:
                    predictions[i] = err
    per_image = (time.perf_counter() - t0) / max(len(good), 1)
    for i in good:
        item, pred = batch[i], predictions[i]
        t1 = time.perf_counter()
        if isinstance(pred, BaseException):
            results[i] = ImageResult(item, ok=False, error=failure_reason(pred))
            continue
        result = ImageResult(item, ok=True, warnings=list(pred.warnings))
        try:
            result.class_fractions = class_fractions(pred.labels, len(vocabulary))
            writer.write(item, images[i], pred, result)  # type: ignore[arg-type]
        except Exception as err:  # this image's failure; the run goes on
            result = ImageResult(item, ok=False, error=f"cannot write outputs: {failure_reason(err)}")
        result.seconds = per_image + time.perf_counter() - t1
        results[i] = result
    return [results[i] for i in range(len(batch))]
