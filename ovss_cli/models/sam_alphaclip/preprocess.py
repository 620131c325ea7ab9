"""CLIP's image preprocessing for Alpha-CLIP, applied identically to pixels and alpha.

Pixels: resize the short side to S (PIL bicubic, long side ``int(S * long / short)`` as
torchvision does), centre-crop S x S, scale to [0, 1], CLIP mean/std. The alpha (a 0/1 mask)
takes the same resize (bilinear, antialiased) and crop, then ``(a - 0.5) / 0.26``. The official
recipe resizes the alpha straight to S x S, which misaligns it with the cropped pixels on
non-square images; here mask and pixels stay aligned.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
ALPHA_MEAN, ALPHA_STD = 0.5, 0.26


def resize_crop_geometry(height: int, width: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized h, w), (crop top, left)) of torchvision ``Resize(size)`` + ``CenterCrop(size)``."""
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return (new_h, new_w), (top, left)


def preprocess_pixels(image: np.ndarray, size: int) -> Tensor:
    """H x W x 3 uint8 RGB -> 3 x S x S normalised float tensor."""
    (new_h, new_w), (top, left) = resize_crop_geometry(*image.shape[:2], size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    crop = resized[top : top + size, left : left + size]
    x = torch.tensor(crop).permute(2, 0, 1).float().div_(255.0)
    return (x - CLIP_MEAN) / CLIP_STD


def preprocess_alpha(masks: Tensor, size: int) -> Tensor:
    """N x H x W bool/0-1 masks -> N x 1 x S x S normalised alpha (same geometry as the pixels)."""
    (new_h, new_w), (top, left) = resize_crop_geometry(masks.shape[-2], masks.shape[-1], size)
    a = F.interpolate(masks[:, None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    a = a[:, :, top : top + size, left : left + size]
    return (a - ALPHA_MEAN) / ALPHA_STD


def full_alpha(count: int, size: int) -> Tensor:
    """All-ones alpha (``--no-alpha``: Alpha-CLIP sees the whole image, as plain CLIP)."""
    return torch.full((count, 1, size, size), (1.0 - ALPHA_MEAN) / ALPHA_STD)
