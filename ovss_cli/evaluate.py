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

from .datasets import Sample, SemSegDataset
from .errors import InputError, UsageError, failure_reason
from .io.atomic import atomic_open, atomic_write_text
from .io.images import read_image
from .io.prefetch import prefetched
from .io.text_files import read_user_text
from .io.outputs import write_label_png
from .metrics import ConfusionMatrix, SemanticSimilarity, SemSegMetrics, WordClassTable, cosine_similarity_matrix, semantic_similarity
from .segmenter import OTHER, UNLABELLED, Prediction, Segmenter
from .vocabulary import Vocabulary


@dataclass
class SampleResult:
    """One evaluated image (for progress reporting)."""

    sample: Sample
    ok: bool
    seconds: float = 0.0
    error: str | None = None

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
    metrics: SemSegMetrics | None = None
    confusion: ConfusionMatrix | None = None
    similarity: SemanticSimilarity | None = None
    words: list[str] = field(default_factory=list)
    synonyms: str = "whole"

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
        if self.metrics is not None:
            out["metrics"] = self.metrics.to_dict(self.class_names)
        if self.similarity is not None:
            out["semantic_similarity"] = self.similarity.to_dict()
            out["word_class_pixels"] = word_class_rows(self.similarity.table, self.words, self.class_names)
        return out


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
    strict: bool = False,
    on_result: Callable[[SampleResult], None] | None = None,
) -> EvaluationResult:
    """Run ``segmenter`` over ``dataset`` and score it (see the module docstring).

    ``vocabulary`` / ``per_image_vocabulary`` switch to open-vocabulary scoring;
    ``distractors`` compete with the classes (pixels they win count as misses);
    ``predictions_dir`` saves each prediction as a label PNG named after the sample id.
    A sample that cannot be read, segmented or saved is a failure: it is left out of the
    metrics, listed, and the result is marked partial; ``strict`` makes the first failure an
    :class:`~ovss_cli.errors.InputError` instead.
    """
    if vocabulary is not None and per_image_vocabulary is not None:
        raise UsageError("give either --vocabulary-file or --per-image-vocabulary, not both")
    open_vocab = vocabulary is not None or per_image_vocabulary is not None
    result = EvaluationResult(dataset.name, segmenter.describe(), dataset.class_names, synonyms=synonyms)
    bench_vocab = Vocabulary.for_benchmark(dataset.class_names, synonyms)
    confusion = ConfusionMatrix(dataset.num_classes, dataset.ignore_label) if not open_vocab else None
    words: list[str] = []
    word_ids: dict[str, int] = {}
    counts: list[np.ndarray] = []  # per word: pixels per gt class (grows with the vocabulary only)
    unlabelled = np.zeros(dataset.num_classes, np.int64)

    start = time.perf_counter()
    samples = dataset.samples(limit=limit, subset=subset)

    def fail(sample: Sample, err: BaseException) -> None:
        reason = failure_reason(err)
        if strict:
            raise InputError(f"{sample.image_path}: {reason} (--strict stops at the first failed sample)")
        result.failed += 1
        result.failures.append((str(sample.image_path), reason))
        if on_result is not None:
            on_result(SampleResult(sample, ok=False, error=reason))

    for sample, loaded in prefetched(samples, lambda s: _read(s, dataset), depth=2):
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
        try:
            prediction: Prediction = segmenter.predict(image, vocab)
            predicted = np.where(prediction.labels == OTHER, UNLABELLED, prediction.labels)  # "other" is a miss
            if predictions_dir is not None:
                saved = Path(predictions_dir) / f"{sample.id}.png"
                write_label_png(saved, predicted, len(vocab))
            # both accumulators check the whole sample before adding any of it
            if confusion is not None:
                confusion.update(predicted, label)
            else:
                table = WordClassTable(len(vocab), dataset.num_classes, dataset.ignore_label)
                table.update(predicted, label)
                unlabelled += table.unlabelled
                for i, name in enumerate(vocab.names):
                    if name not in word_ids:
                        word_ids[name] = len(words)
                        words.append(name)
                        counts.append(np.zeros(dataset.num_classes, np.int64))
                    counts[word_ids[name]] += table.counts[i]
        except Exception as err:
            if saved is not None:
                saved.unlink(missing_ok=True)
            fail(sample, err)
            continue
        result.images += 1
        if on_result is not None:
            on_result(SampleResult(sample, ok=True, seconds=time.perf_counter() - t0))
    result.seconds = time.perf_counter() - start

    if confusion is not None:
        result.confusion = confusion
        result.metrics = confusion.compute()
    elif words:
        word_emb = segmenter.embed_names(words).cpu().numpy()
        class_emb = segmenter.embed_names(bench_vocab.names).cpu().numpy()
        sim = cosine_similarity_matrix(word_emb, class_emb)
        result.words = words
        result.similarity = semantic_similarity(np.stack(counts), sim, unlabelled)
    return result


def write_evaluation(result: EvaluationResult, out_dir: str | Path) -> dict[str, str]:
    """``metrics.json`` (everything) and, for closed vocabularies, ``confusion.npy``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": str(out / "metrics.json")}
    atomic_write_text(out / "metrics.json", json.dumps(result.to_dict(), indent=2) + "\n")
    if result.confusion is not None:
        with atomic_open(out / "confusion.npy", "wb") as handle:
            np.save(handle, result.confusion.matrix)
        paths["confusion"] = str(out / "confusion.npy")
    return paths
