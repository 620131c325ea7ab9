"""SAN's training loss (MaskFormer's set criterion), term by term.

For each deep-supervision output (the last side-adapter block first, then the earlier ones),
queries are matched to the image's class masks (:mod:`.matcher`), then:

- ``loss_ce``: cross-entropy of every query's class logits; unmatched queries target the extra
  "no object" column with weight 0.1;
- ``loss_mask``: sigmoid BCE of the matched masks on 12,544 points per mask, 3/4 of them the
  most uncertain of 3 x 12,544 uniform candidates (importance sampling), 1/4 uniform (with
  ``--crop-size`` other than 640 the point count scales with the crop's area);
- ``loss_dice``: dice loss on the same points.

Weighted 2 / 5 / 5; the earlier outputs' terms get suffixes ``_0``, ``_1``, ... Mask terms are
normalised by the number of target masks averaged over processes (as the official code), and
the cross-entropy by its weight total averaged the same way, so that under DistributedDataParallel
(which averages gradients) a run gives the gradients of one process seeing the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from .matcher import HungarianMatcher
from .points import point_sample, uncertain_points


@dataclass(frozen=True)
class CriterionConfig:
    """The official loss settings (``MODEL.SAN.*`` of MendelXu/SAN ``san/config.py``)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 112 * 112
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


def points_for_crop(crop_size: int) -> int:
    """Points per mask: 112 x 112 for the official 640-pixel crops, scaled with the crop's area
    for smaller or larger ones (``--crop-size``), so the points cover masks as densely."""
    return max(16, round(112 * 112 * (crop_size / 640) ** 2))


@dataclass
class Target:
    """One image's ground truth: the classes present (T) and their binary masks (T x H x W)."""

    labels: Tensor
    masks: Tensor


def build_target(label: Tensor, ignore_label: int) -> Target:
    """Per-class binary masks of an H x W label map; ignored pixels belong to no mask."""
    classes = torch.unique(label)
    classes = classes[classes != ignore_label]
    masks = label[None] == classes[:, None, None]
    return Target(classes.to(torch.int64), masks)


@dataclass(frozen=True)
class LossNorms:
    """Denominators shared by all processes: the number of target masks, and the total
    cross-entropy weight of a batch, each averaged over processes (one process: the batch's)."""

    num_masks: float
    class_weight_total: float


def class_weight_total(targets: list[Target], num_queries: int, no_object_weight: float) -> float:
    """The cross-entropy weight of a batch: matched queries weigh 1, the others the no-object
    weight (the matching assigns min(Q, T) queries per image)."""
    total = 0.0
    for t in targets:
        matched = min(num_queries, int(t.labels.numel()))
        total += matched + (num_queries - matched) * no_object_weight
    return total


def classification_loss(class_logits: Tensor, matches: list[tuple[Tensor, Tensor]], targets: list[Target],
                        empty_weight: Tensor, weight_total: float) -> Tensor:
    """Weighted cross-entropy of B x Q x (K+1) logits, divided by ``weight_total`` (the weighted
    mean of ``F.cross_entropy(..., weight)`` when that is this batch's weight sum)."""
    logits = class_logits.float()
    b, q, k1 = logits.shape
    target_classes = torch.full((b, q), k1 - 1, dtype=torch.int64, device=logits.device)
    for i, ((src, tgt), t) in enumerate(zip(matches, targets)):
        target_classes[i, src.to(logits.device)] = t.labels[tgt.to(t.labels.device)].to(logits.device)
    nll = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")
    weights = empty_weight.to(logits.device)[target_classes]
    return (weights * nll).sum() / weight_total


def sigmoid_ce_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """Mean BCE over each mask's points, summed over masks, divided by ``num_masks``."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks


def dice_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` per mask (p = sigmoid), summed, divided by ``num_masks``."""
    probs = logits.sigmoid().flatten(1)
    numerator = 2 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class SanCriterion:
    """Matching plus the three loss terms over every deep-supervision output."""

    def __init__(self, num_classes: int, config: CriterionConfig = CriterionConfig()):
        self.config = config
        self.num_classes = num_classes
        self.matcher = HungarianMatcher(config.class_weight, config.mask_weight, config.dice_weight, config.num_points)
        self.empty_weight = torch.ones(num_classes + 1)
        self.empty_weight[-1] = config.no_object_weight
        self.weights = {"loss_ce": config.class_weight, "loss_mask": config.mask_weight,
                        "loss_dice": config.dice_weight}

    def point_losses(self, mask_logits: Tensor, matches: list[tuple[Tensor, Tensor]], targets: list[Target],
                     num_masks: float, generators: list[torch.Generator | None]) -> tuple[Tensor, Tensor]:
        """Sigmoid BCE and dice of the matched masks on importance-sampled points."""
        cfg = self.config
        logits, labels = [], []
        for i, ((src, tgt), t, gen) in enumerate(zip(matches, targets, generators)):
            if src.numel() == 0:
                continue
            pred = mask_logits[i, src.to(mask_logits.device)][:, None].float()  # n x 1 x h x w
            with torch.no_grad():
                coords = uncertain_points(pred.detach(), cfg.num_points, cfg.oversample_ratio,
                                          cfg.importance_sample_ratio, gen)
                true = t.masks[tgt.to(t.masks.device)][:, None].to(pred.dtype)
                labels.append(point_sample(true, coords).squeeze(1))
            logits.append(point_sample(pred, coords).squeeze(1))
        if not logits:  # no target mask in the batch: zero, still attached to the graph
            zero = mask_logits.sum() * 0.0
            return zero, zero
        point_logits, point_labels = torch.cat(logits), torch.cat(labels)
        return sigmoid_ce_loss(point_logits, point_labels, num_masks), dice_loss(point_logits, point_labels, num_masks)

    def __call__(self, mask_logits: list[Tensor], class_logits: list[Tensor], targets: list[Target],
                 norms: LossNorms, generators: list[torch.Generator | None] | None = None) -> dict[str, Tensor]:
        """Weighted loss terms for the outputs of :meth:`SanModel.forward` with ``all_outputs``
        (earliest block first): ``loss_ce``, ``loss_mask``, ``loss_dice`` for the last block,
        ``loss_ce_0`` ... for the earlier ones. ``generators``: one per image, so that the points
        drawn for an image do not depend on which process or batch slot it is in."""
        generators = generators if generators is not None else [None] * len(targets)
        outputs = list(zip(mask_logits, class_logits))
        ordered = [("", outputs[-1])] + [(f"_{i}", out) for i, out in enumerate(outputs[:-1])]
        losses: dict[str, Tensor] = {}
        for suffix, (masks, logits) in ordered:
            matches = [self.matcher.match(logits[i].detach(), masks[i].detach(), t.labels, t.masks, gen)
                       for i, (t, gen) in enumerate(zip(targets, generators))]
            ce = classification_loss(logits, matches, targets, self.empty_weight, norms.class_weight_total)
            bce, dice = self.point_losses(masks, matches, targets, norms.num_masks, generators)
            losses[f"loss_ce{suffix}"] = ce * self.weights["loss_ce"]
            losses[f"loss_mask{suffix}"] = bce * self.weights["loss_mask"]
            losses[f"loss_dice{suffix}"] = dice * self.weights["loss_dice"]
        return losses
