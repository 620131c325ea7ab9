"""Semantic-segmentation metrics: detectron2's ``SemSegEvaluator`` numbers, streamed.

:class:`ConfusionMatrix` accumulates an int64 (C+1) x (C+1) matrix image by image with
``np.bincount``, exactly as detectron2 does: rows are predictions, columns ground truth,
the last column holds ignore pixels. The one extension is the last *row*: detectron2's
arg-max never leaves a pixel unlabelled, but some methods do (``UNLABELLED`` = -1), and
those pixels land there. They count as misses: they add to a class's ground-truth total
(lowering its accuracy and IoU) but to no class's predicted total. With no unlabelled
predictions every number equals detectron2's bit for bit (same integer sums, same float
operations in the same order).

For open vocabularies, :class:`WordClassTable` and :func:`semantic_similarity` score how
close each predicted word is to the true class in text-embedding space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

UNLABELLED = -1  # same value as ovss_cli.segmenter.UNLABELLED (kept local: no torch import)


# --------------------------------------------------------------------------- accumulation


def _pair_counts(
    pred: np.ndarray, gt: np.ndarray, num_pred: int, num_gt: int, ignore_label: int
) -> np.ndarray:
    """(num_pred+1) x (num_gt+1) int64 counts of (pred, gt) pixel pairs.

    ``pred`` values in [-1, num_pred-1] (-1 goes to the last row); ``gt`` values in
    [0, num_gt-1] or ``ignore_label`` (goes to the last column). Anything else raises
    ValueError naming the offending values, since silently binning them would corrupt
    every other class's counts.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if not (np.issubdtype(pred.dtype, np.integer) or pred.dtype == bool):
        raise ValueError(f"predictions must be integers, got {pred.dtype}")
    if not (np.issubdtype(gt.dtype, np.integer) or gt.dtype == bool):
        raise ValueError(f"ground truth must be integers, got {gt.dtype}")
    p = pred.reshape(-1).astype(np.int64, copy=False)
    g = gt.reshape(-1).astype(np.int64, copy=False)
    if p.size:
        bad_pred = (p < UNLABELLED) | (p >= num_pred)
        if bad_pred.any():
            values = np.unique(p[bad_pred])[:5].tolist()
            raise ValueError(f"prediction values {values} outside [{UNLABELLED}, {num_pred - 1}]")
        is_ignore = g == ignore_label
        bad_gt = ~is_ignore & ((g < 0) | (g >= num_gt))
        if bad_gt.any():
            values = np.unique(g[bad_gt])[:5].tolist()
            raise ValueError(
                f"ground-truth values {values} are neither a class in [0, {num_gt - 1}] "
                f"nor the ignore label {ignore_label}"
            )
        p = np.where(p == UNLABELLED, num_pred, p)
        g = np.where(is_ignore, num_gt, g)
    counts = np.bincount((num_gt + 1) * p + g, minlength=(num_pred + 1) * (num_gt + 1))
    return counts.astype(np.int64, copy=False).reshape(num_pred + 1, num_gt + 1)


def _check_ignore(num_classes: int, ignore_label: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if 0 <= ignore_label < num_classes:
        raise ValueError(f"ignore_label {ignore_label} is also a class index (0..{num_classes - 1})")


# --------------------------------------------------------------------------- metrics


@dataclass
class SemSegMetrics:
    """detectron2's semantic-segmentation metrics; every number is in percent (x100).

    ``per_class_iou`` / ``per_class_acc`` are NaN for classes absent from the ground
    truth (those are left out of the means, as in detectron2). ``num_pixels`` counts the
    non-ignore ground-truth pixels, ``num_unlabelled`` those of them predicted unlabelled,
    ``per_class_pixels`` the ground-truth pixels of each class.
    """

    miou: float
    fwiou: float
    macc: float
    pacc: float
    per_class_iou: np.ndarray
    per_class_acc: np.ndarray
    per_class_pixels: np.ndarray
    num_pixels: int
    num_unlabelled: int = 0

    def to_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        """JSON-ready: the four means, pixel counts and one row per class (NaN -> None)."""
        if len(class_names) != len(self.per_class_iou):
            raise ValueError(
                f"{len(class_names)} class names for {len(self.per_class_iou)} classes"
            )
        return {
            "mIoU": _json_float(self.miou),
            "fwIoU": _json_float(self.fwiou),
            "mACC": _json_float(self.macc),
            "pACC": _json_float(self.pacc),
            "num_pixels": int(self.num_pixels),
            "num_unlabelled": int(self.num_unlabelled),
            "per_class": [
                {
                    "class": name,
                    "iou": _json_float(iou),
                    "acc": _json_float(acc),
                    "pixels": int(pixels),
                }
                for name, iou, acc, pixels in zip(
                    class_names, self.per_class_iou, self.per_class_acc, self.per_class_pixels
                )
            ],
        }


def _json_float(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


class ConfusionMatrix:
    """Streaming (C+1) x (C+1) int64 confusion matrix: rows = prediction (last row =
    unlabelled), columns = ground truth (last column = ignore)."""

    def __init__(self, num_classes: int, ignore_label: int = 255) -> None:
        _check_ignore(num_classes, ignore_label)
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self._matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    @property
    def matrix(self) -> np.ndarray:
        """A read-only view of the accumulated counts."""
        view = self._matrix.view()
        view.flags.writeable = False
        return view

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, ignore_label: int = 255) -> "ConfusionMatrix":
        """A matrix with these counts (e.g. summed over processes, or read from a file)."""
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
            raise ValueError(f"expected a (C+1) x (C+1) matrix, got shape {matrix.shape}")
        out = cls(matrix.shape[0] - 1, ignore_label)
        out._matrix += matrix.astype(np.int64)
        return out

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image (or any same-shaped batch) of predictions and ground truth."""
        self._matrix += _pair_counts(pred, gt, self.num_classes, self.num_classes, self.ignore_label)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (e.g. from another worker); returns self."""
        if other.num_classes != self.num_classes or other.ignore_label != self.ignore_label:
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_label}) "
                f"into a {self.num_classes}-class one (ignore {self.ignore_label})"
            )
        self._matrix += other._matrix
        return self

    def compute(self) -> SemSegMetrics:
        """mIoU, fwIoU, mACC, pACC and per-class IoU/accuracy, as detectron2 defines them.

        tp = diagonal; pos_gt = column sums over non-ignore columns *including* the
        unlabelled row; pos_pred = row sums over non-ignore columns excluding it. A class
        enters mACC where pos_gt > 0, and mIoU/fwIoU where also pos_gt + pos_pred - tp > 0;
        fwIoU weights IoU by pos_gt / sum(pos_gt); pACC = sum(tp) / sum(pos_gt). With no
        non-ignore pixels at all every mean is NaN.
        """
        n = self.num_classes
        conf = self._matrix
        acc = np.full(n, np.nan, dtype=float)
        iou = np.full(n, np.nan, dtype=float)
        tp = conf.diagonal()[:-1].astype(float)
        pos_gt_int = np.sum(conf[:, :-1], axis=0)
        pos_gt = pos_gt_int.astype(float)
        pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            class_weights = pos_gt / np.sum(pos_gt)
            acc_valid = pos_gt > 0
            acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
            union = pos_gt + pos_pred - tp
            iou_valid = np.logical_and(acc_valid, union > 0)
            iou[iou_valid] = tp[iou_valid] / union[iou_valid]
            macc = np.sum(acc[acc_valid]) / np.sum(acc_valid)
            miou = np.sum(iou[iou_valid]) / np.sum(iou_valid)
            fiou = np.sum(iou[iou_valid] * class_weights[iou_valid])
            pacc = np.sum(tp) / np.sum(pos_gt)
        num_pixels = int(pos_gt_int.sum())
        if num_pixels == 0:
            fiou = np.nan  # detectron2 would give 0.0 from an empty sum; nothing was measured
        return SemSegMetrics(
            miou=float(100 * miou),
            fwiou=float(100 * fiou),
            macc=float(100 * macc),
            pacc=float(100 * pacc),
            per_class_iou=100 * iou,
            per_class_acc=100 * acc,
            per_class_pixels=pos_gt_int.astype(np.int64),
            num_pixels=num_pixels,
            num_unlabelled=int(conf[-1, :-1].sum()),
        )


# --------------------------------------------------------------------------- open vocabulary


class WordClassTable:
    """Streaming int64 pixel counts of (predicted word, ground-truth class) pairs.

    ``counts[w, c]`` is the number of non-ignore pixels of class ``c`` predicted as word
    ``w``; ``unlabelled[c]`` the number of class-``c`` pixels left unlabelled (-1).
    """

    def __init__(self, num_words: int, num_classes: int, ignore_label: int = 255) -> None:
        if num_words < 1:
            raise ValueError(f"num_words must be >= 1, got {num_words}")
        _check_ignore(num_classes, ignore_label)
        self.num_words = num_words
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self._table = np.zeros((num_words + 1, num_classes + 1), dtype=np.int64)

    @property
    def counts(self) -> np.ndarray:
        """num_words x num_classes pixel counts (ignore pixels and unlabelled excluded)."""
        return self._table[:-1, :-1].copy()

    @property
    def unlabelled(self) -> np.ndarray:
        """Per ground-truth class, the pixels predicted unlabelled."""
        return self._table[-1, :-1].copy()

    def update(self, pred_words: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: predicted word ids in [-1, num_words-1] vs ground-truth class ids."""
        self._table += _pair_counts(pred_words, gt, self.num_words, self.num_classes, self.ignore_label)

    def merge(self, other: "WordClassTable") -> "WordClassTable":
        """Add another table's counts; returns self."""
        if (other.num_words, other.num_classes, other.ignore_label) != (
            self.num_words,
            self.num_classes,
            self.ignore_label,
        ):
            raise ValueError("cannot merge word/class tables of different shapes or ignore labels")
        self._table += other._table
        return self


@dataclass
class SemanticSimilarity:
    """Pixel-weighted text-embedding similarity of predicted words to true classes.

    ``mean`` is a cosine similarity (in [-1, 1], not percent); ``rescaled`` is in [0, 1].
    ``table`` is the num_words x num_classes pixel table behind them.
    """

    mean: float
    rescaled: float
    table: np.ndarray
    num_pixels: int
    num_unlabelled: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_similarity": _json_float(self.mean),
            "rescaled_similarity": _json_float(self.rescaled),
            "num_pixels": int(self.num_pixels),
            "num_unlabelled": int(self.num_unlabelled),
        }


def cosine_similarity_matrix(word_embeddings: np.ndarray, class_embeddings: np.ndarray) -> np.ndarray:
    """num_words x num_classes cosine similarities between two sets of row embeddings."""
    words = np.asarray(word_embeddings, dtype=np.float64)
    classes = np.asarray(class_embeddings, dtype=np.float64)
    words = words / np.linalg.norm(words, axis=1, keepdims=True)
    classes = classes / np.linalg.norm(classes, axis=1, keepdims=True)
    return words @ classes.T


def semantic_similarity(
    table: WordClassTable | np.ndarray,
    similarity: np.ndarray,
    unlabelled: np.ndarray | None = None,
) -> SemanticSimilarity:
    """Pixel-weighted mean similarity of predicted word to true class, raw and rescaled.

    With ``N[w, c]`` the pixels of ground-truth class ``c`` predicted as word ``w``,
    ``U[c]`` those left unlabelled and ``S[w, c]`` the cosine similarity of their text
    embeddings:

    * ``mean = (sum_wc N[w,c] S[w,c] + sum_c U[c] min_w S[w,c]) / (sum N + sum U)``
    * ``rescaled`` is the same with ``S`` replaced by ``R[w, c] = (S[w,c] - min_w S[w,c]) /
      (max_w S[w,c] - min_w S[w,c])``: each class's column rescaled to [0, 1] over the
      words, so 1 means "the closest word to this class", 0 "the farthest". A class
      whose words are all equally similar (max == min) gets R = 1 for every word.

    Unlabelled pixels score as the worst word for their class: ``min_w S[w,c]`` in
    ``mean`` and 0 in ``rescaled`` (the "unlabelled is a miss" rule of the confusion
    matrix). Both are NaN when no pixel counted.
    ``unlabelled`` is taken from a :class:`WordClassTable`; pass it with a bare array.
    """
    if isinstance(table, WordClassTable):
        counts = table.counts
        unl = table.unlabelled if unlabelled is None else np.asarray(unlabelled, dtype=np.int64)
    else:
        counts = np.asarray(table, dtype=np.int64)
        unl = np.zeros(counts.shape[1], np.int64) if unlabelled is None else np.asarray(unlabelled, np.int64)
    sim = np.asarray(similarity, dtype=np.float64)
    if counts.ndim != 2 or sim.shape != counts.shape:
        raise ValueError(f"similarity shape {sim.shape} differs from table shape {counts.shape}")
    if unl.shape != (counts.shape[1],):
        raise ValueError(f"unlabelled counts shape {unl.shape}, expected ({counts.shape[1]},)")
    low = sim.min(axis=0)
    span = sim.max(axis=0) - low
    flat = span <= 0
    rescaled_sim = np.where(flat, 1.0, (sim - low) / np.where(flat, 1.0, span))
    total = int(counts.sum() + unl.sum())
    if total == 0:
        mean = rescaled = float("nan")
    else:
        mean = float((np.sum(counts * sim) + np.sum(unl * low)) / total)
        rescaled = float(np.sum(counts * rescaled_sim) / total)  # unlabelled add 0
    return SemanticSimilarity(
        mean=mean, rescaled=rescaled, table=counts, num_pixels=total, num_unlabelled=int(unl.sum())
    )
