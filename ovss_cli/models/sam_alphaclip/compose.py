"""Turning classified masks into a label map and per-class score maps.

Masks are painted in order of decreasing area, so smaller masks win where they overlap a
larger one; each pixel takes the class probabilities of the mask that owns it. Pixels no mask
covers stay unlabelled, or take the nearest mask's class with ``fill="nearest"``. A mask won
by a distractor, or whose best probability is below ``min_score``, is "other" (no segment).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from ...errors import UsageError
from ...segmenter import OTHER, UNLABELLED, Prediction, Segment

FILL_MODES = ("none", "nearest")


def owner_map(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """H x W int32: index of the mask owning each pixel (-1 = none); larger masks first."""
    owner = np.full(shape, -1, dtype=np.int32)
    areas = [int(m.sum()) for m in masks]
    for i in sorted(range(len(masks)), key=lambda k: -areas[k]):  # stable: ties keep order
        owner[masks[i]] = i
    return owner


def fill_nearest(owner: np.ndarray) -> np.ndarray:
    """Give every uncovered pixel the owner of the nearest covered pixel (L2 distance)."""
    uncovered = owner < 0
    if not uncovered.any() or uncovered.all():
        return owner
    # distanceTransformWithLabels labels each pixel with the index of its nearest zero pixel,
    # zero pixels numbered in row-major order starting at 1.
    _, nearest = cv2.distanceTransformWithLabels(
        uncovered.astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    covered_owners = owner[~uncovered]  # row-major order matches the label numbering
    filled = owner.copy()
    filled[uncovered] = covered_owners[nearest[uncovered] - 1]
    return filled


def compose(masks: list[np.ndarray], probs: np.ndarray, shape: tuple[int, int], num_classes: int | None = None,
            fill: str = "none", min_score: float = 0.0, with_scores: bool = False) -> Prediction:
    """Prediction from M masks and their M x G probabilities over the vocabulary's
    ``num_classes`` classes followed by its distractors. Each pixel's confidence is its owning
    mask's best probability; the dense C x H x W scores (each pixel: its mask's probabilities)
    are built only ``with_scores``."""
    if fill not in FILL_MODES:
        raise UsageError(f"unknown --fill {fill!r}; choose one of {', '.join(FILL_MODES)}")
    num_classes = probs.shape[1] if num_classes is None else num_classes
    if not masks:
        return Prediction(
            labels=np.full(shape, UNLABELLED, dtype=np.int32),
            scores=torch.zeros(num_classes, *shape) if with_scores else None,
            confidence=np.zeros(shape, np.float32),
            segments=[],
            warnings=["no mask found: every pixel is unlabelled"],
        )
    owner = owner_map(masks, shape)
    if fill == "nearest":
        owner = fill_nearest(owner)
    best = probs.argmax(axis=1)
    best_prob = probs[np.arange(len(masks)), best]
    classes = np.where((best < num_classes) & (best_prob >= min_score), best, OTHER).astype(np.int32)
    # index -1 -> the extra last entry (no mask: unlabelled, zero confidence and scores)
    labels = np.append(classes, UNLABELLED).astype(np.int32)[owner]
    confidence = np.append(best_prob, 0).astype(np.float32)[owner]
    scores = None
    if with_scores:
        table = np.vstack([probs[:, :num_classes], np.zeros((1, num_classes), dtype=probs.dtype)]).astype(np.float32)
        scores = torch.from_numpy(np.ascontiguousarray(table[owner].transpose(2, 0, 1)))
    segments = [Segment(int(classes[i]), float(best_prob[i]), masks[i]) for i in range(len(masks)) if classes[i] >= 0]
    return Prediction(labels=labels, scores=scores, confidence=confidence, segments=segments)
