"""Hungarian matching of predicted masks to ground-truth class masks (MaskFormer / SAN).

Per image, each ground-truth mask is assigned to one query by minimising
``2 * class cost + 5 * sigmoid-BCE cost + 5 * dice cost``, the costs measured on 12,544 points
(for 640-pixel crops) drawn uniformly from the image, the same points for every mask. The assignment problem is
solved by :func:`linear_sum_assignment`, our own shortest-augmenting-path solver (scipy is not a
dependency), which returns what ``scipy.optimize.linear_sum_assignment`` returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .points import point_sample


def linear_sum_assignment(cost: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a minimum-cost assignment of a rectangular cost matrix.

    Every row is assigned when there are at most as many rows as columns, else every column;
    the result is sorted by row, as scipy's. Solved with potentials and one Dijkstra-like
    shortest augmenting path per row (Jonker-Volgenant style), O(n^2 m) with the inner loop over
    columns vectorised.
    """
    c = np.asarray(cost.detach().cpu() if isinstance(cost, Tensor) else cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"cost matrix must be 2-D, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("cost matrix contains NaN or infinite entries")
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    # 1-based columns with a virtual column 0; row_of[j] = row (1-based) matched to column j.
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    row_of = np.zeros(m + 1, dtype=np.int64)
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        min_slack = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            free = ~used
            free[0] = False
            slack = c[i0 - 1] - u[i0] - v[1:]
            better = free[1:] & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            way[1:][better] = j0
            candidates = np.where(free[1:], min_slack[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            min_slack[free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # augment along the path
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    cols = np.nonzero(row_of[1:])[0]
    rows = row_of[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows, kind="stable")
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def batch_sigmoid_ce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """N x M mean binary cross-entropy of each of N point-logit rows against each of M point-
    target rows (all P points).

    ``BCE(x, t) = t softplus(-x) + (1 - t) softplus(x) = softplus(x) - t x``, so one softplus per
    point serves every target (the official code computes both terms)."""
    points = logits.shape[1]
    return (F.softplus(logits).sum(-1)[:, None] - torch.einsum("np,mp->nm", logits, targets)) / points


def batch_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """N x M dice loss ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` between each prediction row
    (sigmoid of the logits) and each target row."""
    probs = logits.sigmoid()
    numerator = 2 * torch.einsum("np,mp->nm", probs, targets)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


@dataclass(frozen=True)
class HungarianMatcher:
    """The matching costs' weights and how many points they are measured on."""

    cost_class: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    num_points: int = 112 * 112

    def cost_matrix(self, class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
        """Q x T cost of giving each of T targets (``labels``, ``masks``: T x H x W) to each of
        Q queries (``class_logits``: Q x (K+1), ``mask_logits``: Q x h x w), in fp32."""
        probs = class_logits.float().softmax(-1)
        cost_class = -probs[:, labels]
        coords = torch.rand(1, self.num_points, 2, device=mask_logits.device, generator=generator)
        with torch.autocast(mask_logits.device.type, enabled=False):
            tgt = point_sample(masks[:, None].float(), coords.expand(masks.shape[0], -1, -1)).squeeze(1)
            out = point_sample(mask_logits[:, None].float(), coords.expand(mask_logits.shape[0], -1, -1)).squeeze(1)
            cost_mask = batch_sigmoid_ce_cost(out, tgt)
            cost_dice = batch_dice_cost(out, tgt)
        return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    @torch.no_grad()
    def match(self, class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(query indices, target indices) of one image's optimal assignment."""
        if labels.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty.clone()
        cost = self.cost_matrix(class_logits, mask_logits, labels, masks, generator)
        rows, cols = linear_sum_assignment(cost.cpu())
        return torch.from_numpy(rows), torch.from_numpy(cols)
