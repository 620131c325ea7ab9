"""Point sampling (PointRend), how MaskFormer / SAN measure mask losses without full-size masks.

Coordinates are in [0, 1] x [0, 1] (x, y) over the whole map, read with bilinear interpolation
(``grid_sample``, ``align_corners=False``), so a 40 x 40 prediction and a 640 x 640 target are
compared at the same places.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """N x C x P values of ``maps`` (N x C x H x W) at ``coords`` (N x P x 2, x then y in [0, 1])."""
    return F.grid_sample(maps, 2.0 * coords[:, :, None, :] - 1.0, align_corners=False).squeeze(3)


def uncertainty(logits: Tensor) -> Tensor:
    """How undecided a mask logit is: ``-|logit|`` (largest at the decision boundary)."""
    return -logits.abs()


def uncertain_points(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """N x P point coordinates per mask (``logits``: N x 1 x H x W): of ``oversample_ratio * P``
    uniform candidates the ``importance_sample_ratio * P`` most uncertain, the rest uniform."""
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError("oversample_ratio must be >= 1 and importance_sample_ratio in [0, 1]")
    n = logits.shape[0]
    sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, sampled, 2, device=logits.device, generator=generator)
    scores = uncertainty(point_sample(logits, coords))  # N x 1 x sampled
    important = int(importance_sample_ratio * num_points)
    idx = torch.topk(scores[:, 0, :], k=important, dim=1)[1]
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_points - important > 0:
        extra = torch.rand(n, num_points - important, 2, device=logits.device, generator=generator)
        chosen = torch.cat([chosen, extra], dim=1)
    return chosen
