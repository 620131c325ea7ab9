"""``ovss evaluate`` as a library function: a segmenter over a dataset, streamed, scored.

With the dataset's own classes the scores are detectron2's (mIoU, fwIoU, mACC, pACC from a
streaming confusion matrix). With another vocabulary (one file, or one per image) IoU is
undefined, so the score is the semantic similarity between predicted words and true classes.
Memory stays flat: one image (and its batch neighbours) at a time, int64 accumulators only.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .datasets import Sample, SemSegDataset
from .errors import DatasetError, InputError, UsageError, failure_reason
from .io.atomic import storage_error
from .io.atomic import atomic_open, atomic_write_text
from .io.images import read_image
from .io.prefetch import prefetched
from .io.text_files import read_user_text
from .io.outputs import read_label_png, write_label_png
from .metrics import ConfusionMatrix, SemanticSimilarity, SemSegMetrics, WordClassTable, cosine_similarity_matrix, semantic_similarity
from .runs.distributed import Distributed
from .runs.shards import Share
from .segmenter import OTHER, UNLABELLED, Prediction, Segmenter, predict_robustly
from .vocabulary import Vocabulary


@dataclass
class SampleResult:
    """One evaluated image (for progress reporting)."""

    sample: Sample
    ok: bool
    seconds: float = 0.0
    error: str | None = None
    reused: bool = False  # scored from the prediction an earlier run saved (reuse_predictions)

    @property
    def path(self) -> Path:
        return self.sample.image_path


@dataclass
class EvaluationResult:
    """Everything an evaluation produced."""

    dataset: str
    segmenter: dict[str, Any]
    class_names: list[str]
    images: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # every failed sample: (image, reason)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (image, note), e.g. a CPU fallback
    metrics: SemSegMetrics | None = None
    confusion: ConfusionMatrix | None = None
    similarity: SemanticSimilarity | None = None
    words: list[str] = field(default_factory=list)
    synonyms: str = "whole"
    word_counts: "WordCounts | None" = None  # open vocabularies: what the similarity is computed from
    similarity_rows: np.ndarray | None = None  # word x class cosine similarities of the text embeddings
    identity: dict[str, Any] = field(default_factory=dict)  # what shards must share to be merged
    shard: tuple[int, int] | None = None  # (index, count) when this is one shard of the dataset

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def partial(self) -> bool:
        """Whether some samples failed: the metrics then score only the others."""
        return self.failed > 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            **self.segmenter,
            "synonyms": self.synonyms,
            "images": self.images,
            "failed": self.failed,
            "partial": self.partial,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 4),
            "failures": [{"input": p, "error": e} for p, e in self.failures],
        }
        if self.warnings:
            out["warnings"] = [{"input": p, "warning": w} for p, w in self.warnings]
        if self.shard is not None:
            out["shard"] = {"index": self.shard[0], "count": self.shard[1]}
        if self.identity:
            out["run"] = self.identity
        if self.metrics is not None:
            out["metrics"] = self.metrics.to_dict(self.class_names)
        if self.similarity is not None:
            out["semantic_similarity"] = self.similarity.to_dict()
            out["word_class_pixels"] = word_class_rows(self.similarity.table, self.words, self.class_names)
        return out


class WordCounts:
    """Open-vocabulary tallies: for each predicted word (in order of first appearance), the
    pixels of each ground-truth class it covered, plus unlabelled pixels per class; mergeable
    across shards and ranks (memory grows with the vocabulary only)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.words: list[str] = []
        self._index: dict[str, int] = {}
        self.rows: list[np.ndarray] = []
        self.unlabelled = np.zeros(num_classes, np.int64)

    def add(self, word: str, counts: np.ndarray) -> None:
        if word not in self._index:
            self._index[word] = len(self.words)
            self.words.append(word)
            self.rows.append(np.zeros(self.num_classes, np.int64))
        self.rows[self._index[word]] += counts

    def merge(self, other: "WordCounts") -> "WordCounts":
        for word, row in zip(other.words, other.rows):
            self.add(word, row)
        self.unlabelled += other.unlabelled
        return self

    @property
    def table(self) -> np.ndarray:
        return np.stack(self.rows) if self.rows else np.zeros((0, self.num_classes), np.int64)


def word_class_rows(table: np.ndarray, words: Sequence[str], classes: Sequence[str], top: int = 5) -> list[dict]:
    """For each predicted word, the ground-truth classes it covered most (pixel counts)."""
    rows = []
    for w in np.flatnonzero(table.sum(axis=1)):
        counts = table[w]
        best = np.argsort(-counts)[:top]
        rows.append({"word": words[w], "pixels": int(counts.sum()),
                     "classes": [{"class": classes[c], "pixels": int(counts[c])} for c in best if counts[c] > 0]})
    return sorted(rows, key=lambda r: -r["pixels"])


def load_per_image_vocabulary(path: str | Path) -> dict[str, list[str]]:
    """JSON mapping image (id, file name or stem) -> class names, e.g. nouns from captions."""
    p = Path(path)
    try:
        data = json.loads(read_user_text(p, "per-image vocabulary"))
    except json.JSONDecodeError as err:
        raise UsageError(f"cannot read per-image vocabulary {p}: {err}") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and v and all(isinstance(w, str) and w.strip() for w in v) for v in data.values()
    ):
        raise UsageError(f"{p}: expected a JSON object mapping each image to a non-empty list of class names")
    return {str(k): [w.strip() for w in v] for k, v in data.items()}


def _vocab_for(sample: Sample, table: Mapping[str, list[str]]) -> list[str]:
    for key in (sample.id, sample.image_path.name, sample.image_path.stem, Path(sample.id).name):
        if key in table:
            return table[key]
    raise UsageError(f"the per-image vocabulary has no entry for image {sample.id!r} ({sample.image_path})")


def _read(sample: Sample, dataset: SemSegDataset) -> tuple[np.ndarray, np.ndarray] | BaseException:
    try:
        if not sample.label_path.exists():
            raise DatasetError(f"image {sample.image_path} has no label: {sample.label_path} is missing")
        image = read_image(sample.image_path)
        label = dataset.read_label(sample.label_path)
        if label.shape != image.shape[:2]:
            raise UsageError(f"label {sample.label_path} is {label.shape[1]}x{label.shape[0]} but its image is "
                             f"{image.shape[1]}x{image.shape[0]}")
        return image, label
    except Exception as err:  # reported per sample
        return err


def evaluate_dataset(
    segmenter: Segmenter,
    dataset: SemSegDataset,
    *,
    vocabulary: Vocabulary | None = None,
    per_image_vocabulary: Mapping[str, list[str]] | None = None,
    synonyms: str = "whole",
    distractors: Sequence[str] = (),
    limit: int | None = None,
    subset: float | None = None,
    predictions_dir: str | Path | None = None,
    reuse_predictions: bool = False,
    strict: bool = False,
    share: Share = Share(),
    dist: Distributed | None = None,
    workers: int | None = None,
    on_result: Callable[[SampleResult], None] | None = None,
) -> EvaluationResult:
    """Run ``segmenter`` over ``dataset`` and score it (see the module docstring).

    ``vocabulary`` / ``per_image_vocabulary`` switch to open-vocabulary scoring;
    ``distractors`` compete with the classes (pixels they win count as misses);
    ``predictions_dir`` saves each prediction as a label PNG named after the sample id; with
    ``reuse_predictions`` a prediction already saved there is scored instead of segmenting its
    image again (an interrupted run resumes image by image: the caller makes sure the folder
    was written with the same settings).
    A sample that cannot be read, segmented or saved is a failure: it is left out of the
    metrics, listed, and the result is marked partial; ``strict`` makes the first failure an
    :class:`~ovss_cli.errors.InputError` instead. ``share`` evaluates one shard of the samples
    (``ovss merge`` sums shards); under torchrun (``dist``) each rank takes its part and the
    counts are summed over ranks, so every rank returns the whole evaluation. ``workers``
    threads read samples ahead (0: read in this thread; default from the CPU count).
    """
    if vocabulary is not None and per_image_vocabulary is not None:
        raise UsageError("give either --vocabulary-file or --per-image-vocabulary, not both")
    dist = dist or Distributed()
    mine = share.with_rank(dist.rank, dist.world)
    open_vocab = vocabulary is not None or per_image_vocabulary is not None
    result = EvaluationResult(dataset.name, segmenter.describe(), dataset.class_names, synonyms=synonyms,
                              shard=(share.index, share.count) if share.sharded else None)
    result.identity = {
        "dataset": dataset.name, "classes": dataset.class_names, "synonyms": synonyms,
        "segmenter": segmenter.identity or segmenter.describe(),
        "vocabulary": None if vocabulary is None else vocabulary.to_dict(),
        "per_image_vocabulary": None if per_image_vocabulary is None else dict(per_image_vocabulary),
        "distractors": list(distractors), "limit": limit, "subset": subset,
    }
    bench_vocab = Vocabulary.for_benchmark(dataset.class_names, synonyms)
    confusion = ConfusionMatrix(dataset.num_classes, dataset.ignore_label) if not open_vocab else None
    word_counts = WordCounts(dataset.num_classes) if open_vocab else None

    start = time.perf_counter()
    samples = (s for pos, s in enumerate(dataset.samples(limit=limit, subset=subset)) if mine.takes(pos))

    def fail(sample: Sample, err: BaseException) -> None:
        reason = failure_reason(err)
        if strict:
            raise InputError(f"{sample.image_path}: {reason} (--strict stops at the first failed sample)")
        result.failed += 1
        result.failures.append((str(sample.image_path), reason))
        if on_result is not None:
            on_result(SampleResult(sample, ok=False, error=reason))

    from .segment import default_workers

    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise UsageError("--workers must be 0 or more")
    read = (lambda s: _read(s, dataset))
    loading = prefetched(samples, read, depth=2 * workers, workers=workers) if workers > 0 else \
        ((s, read(s)) for s in samples)
    for sample, loaded in loading:
        t0 = time.perf_counter()
        if isinstance(loaded, BaseException):
            fail(sample, loaded)
            continue
        image, label = loaded
        if per_image_vocabulary is not None:
            vocab = Vocabulary.for_benchmark(_vocab_for(sample, per_image_vocabulary), "whole")
        else:
            vocab = vocabulary or bench_vocab
        if distractors:
            vocab = vocab.with_distractors(distractors)
        saved: Path | None = None
        earlier = _saved_prediction(predictions_dir, sample, label.shape) if reuse_predictions else None
        try:
            if earlier is not None:
                predicted = earlier
            else:
                with torch.inference_mode():
                    prediction = predict_robustly(segmenter, [image], vocab)[0]
                if isinstance(prediction, BaseException):
                    raise prediction
                result.warnings += [(str(sample.image_path), note) for note in prediction.warnings]
                predicted = np.where(prediction.labels == OTHER, UNLABELLED, prediction.labels)  # "other" is a miss
                if predictions_dir is not None:
                    saved = Path(predictions_dir) / f"{sample.id}.png"
                    write_label_png(saved, predicted, len(vocab))
            # both accumulators check the whole sample before adding any of it
            try:
                if confusion is not None:
                    confusion.update(predicted, label)
                else:
                    table = WordClassTable(len(vocab), dataset.num_classes, dataset.ignore_label)
                    table.update(predicted, label)
            except ValueError as err:  # values outside the classes: the label file's fault
                raise DatasetError(f"label {sample.label_path}: {err}") from None
            if confusion is None:
                word_counts.unlabelled += table.unlabelled
                for i, name in enumerate(vocab.names):
                    word_counts.add(name, table.counts[i])
        except Exception as err:
            if saved is not None:
                saved.unlink(missing_ok=True)
            fatal = storage_error(err, predictions_dir or "the predictions folder")
            if fatal is not None:  # a full disk fails every later sample too: stop
                raise fatal from None
            fail(sample, err)
            continue
        result.images += 1
        if on_result is not None:
            on_result(SampleResult(sample, ok=True, seconds=time.perf_counter() - t0, reused=earlier is not None))
    result.seconds = time.perf_counter() - start

    if dist.enabled:  # every rank ends with the whole evaluation
        if confusion is not None:
            confusion = ConfusionMatrix.from_matrix(dist.all_reduce_sum(confusion.matrix.copy()), dataset.ignore_label)
        parts = dist.all_gather((result.images, result.failed, result.failures, result.seconds, word_counts,
                                 result.warnings))
        result.images = sum(p[0] for p in parts)
        result.failed = sum(p[1] for p in parts)
        result.failures = [f for p in parts for f in p[2]]
        result.seconds = max(p[3] for p in parts)
        result.warnings = [w for p in parts for w in p[5]]
        if word_counts is not None:
            word_counts = WordCounts(dataset.num_classes)
            for p in parts:
                word_counts.merge(p[4])
    finish_evaluation(result, confusion, word_counts, segmenter.embed_names, bench_vocab.names)
    return result


def _saved_prediction(predictions_dir: str | Path | None, sample: Sample,
                      shape: tuple[int, ...]) -> np.ndarray | None:
    """The prediction an earlier run saved for ``sample`` (labels, -1 unlabelled), or None
    when there is none, or it is unreadable or not the label's size (then it is made again)."""
    if predictions_dir is None:
        return None
    path = Path(predictions_dir) / f"{sample.id}.png"
    if not path.is_file():
        return None
    try:
        labels = read_label_png(path)
    except (OSError, ValueError):
        return None
    return labels if labels.shape == tuple(shape) else None


def finish_evaluation(result: EvaluationResult, confusion: ConfusionMatrix | None, word_counts: WordCounts | None,
                      embed_names: Callable[[Sequence[str]], Any] | None, class_names: Sequence[str],
                      similarity_rows: np.ndarray | None = None) -> None:
    """Turn the counts into metrics: detectron2's from the confusion matrix, or the semantic
    similarity of the predicted words (``similarity_rows``: word x class cosine similarities,
    computed with ``embed_names`` when not given)."""
    if confusion is not None:
        result.confusion = confusion
        result.metrics = confusion.compute()
    elif word_counts is not None and word_counts.words:
        if similarity_rows is None:
            word_emb = embed_names(word_counts.words).cpu().numpy()
            class_emb = embed_names(list(class_names)).cpu().numpy()
            similarity_rows = cosine_similarity_matrix(word_emb, class_emb)
        result.words = list(word_counts.words)
        result.word_counts = word_counts
        result.similarity_rows = similarity_rows
        result.similarity = semantic_similarity(word_counts.table, similarity_rows, word_counts.unlabelled)


def write_evaluation(result: EvaluationResult, out_dir: str | Path) -> dict[str, str]:
    """``metrics.json`` (everything) and what ``ovss merge`` sums: ``confusion.npy`` for
    closed vocabularies, ``word_counts.npz`` (words, counts, similarities) for open ones."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": str(out / "metrics.json")}
    atomic_write_text(out / "metrics.json", json.dumps(result.to_dict(), indent=2) + "\n")
    if result.confusion is not None:
        with atomic_open(out / "confusion.npy", "wb") as handle:
            np.save(handle, result.confusion.matrix)
        paths["confusion"] = str(out / "confusion.npy")
    if result.word_counts is not None and result.similarity_rows is not None:
        with atomic_open(out / "word_counts.npz", "wb") as handle:
            np.savez(handle, words=np.array(result.word_counts.words, dtype=str), counts=result.word_counts.table,
                     unlabelled=result.word_counts.unlabelled, similarity=result.similarity_rows)
        paths["word_counts"] = str(out / "word_counts.npz")
    return paths
