"""Training augmentation of MaskFormer's semantic dataset mapper, as SAN configures it.

In order: resize the short side to a random choice of 0.5, 0.6, ..., 1.5 x the crop size (the
long side at most 4 x, i.e. 2560 for 640), a random crop of crop x crop (the whole side where the
image is smaller), the SSD photometric jitter, a horizontal flip with probability 1/2, and
padding to crop x crop (pixels 128, labels the ignore value). Images resize with PIL bilinear,
labels with nearest neighbour (``F.interpolate``, as detectron2 resizes label maps).

Every random choice comes from the generators passed in, so a sample's augmentation is a
function of its seed alone (no process, worker or batch-position dependence).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from ..models.san.segmenter import resize_image, shortest_edge_size

PAD_PIXEL = 128  # the official mapper pads images with 128 before normalisation


@dataclass(frozen=True)
class AugmentConfig:
    """SAN's ``INPUT`` settings, scaled by the crop size (640 in the official recipe)."""

    crop_size: int = 640
    single_category_max_area: float = 1.0  # 1.0: plain random crop (SAN's setting)
    color_aug: bool = True
    flip: bool = True

    @property
    def short_sides(self) -> tuple[int, ...]:
        """``[int(x * 0.1 * crop) for x in range(5, 16)]``: 320, 384, ..., 960 for 640."""
        return tuple(int(x * 0.1 * self.crop_size) for x in range(5, 16))

    @property
    def max_size(self) -> int:
        return 4 * self.crop_size


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an H x W label map (``F.interpolate(mode="nearest")``)."""
    if label.shape == size:
        return label
    t = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float64))[None, None]
    return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy().astype(label.dtype)


def random_resize(image: np.ndarray, label: np.ndarray, cfg: AugmentConfig,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ResizeShortestEdge with "choice" sampling."""
    short = int(rng.choice(cfg.short_sides))
    size = shortest_edge_size(image.shape[0], image.shape[1], short, cfg.max_size)
    return resize_image(image, size), resize_label(label, size)


def crop_window(label: np.ndarray, cfg: AugmentConfig, ignore_label: int,
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of an absolute crop; with ``single_category_max_area < 1`` up to 10 tries
    for a window where no class (ignore aside) covers more than that share."""
    h, w = label.shape
    ch, cw = min(cfg.crop_size, h), min(cfg.crop_size, w)
    if cfg.single_category_max_area >= 1.0:
        return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
    for _ in range(10):
        y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        values, counts = np.unique(label[y0:y0 + ch, x0:x0 + cw], return_counts=True)
        counts = counts[values != ignore_label]
        if len(counts) > 1 and counts.max() < counts.sum() * cfg.single_category_max_area:
            break
    return y0, x0, ch, cw


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def color_jitter_ssd(image: np.ndarray, rnd: random.Random, brightness: float = 32, contrast=(0.5, 1.5),
                     saturation=(0.5, 1.5), hue: int = 18) -> np.ndarray:
    """SSD photometric distortion of an RGB uint8 image: random brightness, then contrast before
    or after saturation and hue (each step taken with probability 1/2), computed in BGR/HSV as
    detectron2's ``ColorAugSSDTransform``."""
    img = image[:, :, ::-1]
    if rnd.randrange(2):
        img = _convert(img, beta=rnd.uniform(-brightness, brightness))

    def do_contrast(x: np.ndarray) -> np.ndarray:
        return _convert(x, alpha=rnd.uniform(*contrast)) if rnd.randrange(2) else x

    def do_saturation(x: np.ndarray) -> np.ndarray:
        if rnd.randrange(2):
            hsv = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_BGR2HSV)
            hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rnd.uniform(*saturation))
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        return x

    def do_hue(x: np.ndarray) -> np.ndarray:
        if rnd.randrange(2):
            hsv = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_BGR2HSV)
            hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rnd.randint(-hue, hue)) % 180
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        return x

    if rnd.randrange(2):
        img = do_hue(do_saturation(do_contrast(img)))
    else:
        img = do_contrast(do_hue(do_saturation(img)))
    return np.ascontiguousarray(img[:, :, ::-1])


def pad_to(image: np.ndarray, label: np.ndarray, size: int, ignore_label: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to size x size: pixels 128, labels ``ignore_label``."""
    h, w = label.shape
    if (h, w) == (size, size):
        return image, label
    out_image = np.full((size, size, 3), PAD_PIXEL, dtype=np.uint8)
    out_image[:h, :w] = image
    out_label = np.full((size, size), ignore_label, dtype=label.dtype)
    out_label[:h, :w] = label
    return out_image, out_label


def augment(image: np.ndarray, label: np.ndarray, cfg: AugmentConfig, ignore_label: int,
            rng: np.random.Generator, rnd: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """One training view of (H x W x 3 uint8 RGB, H x W int64 label): crop x crop, padded."""
    image, label = random_resize(image, label, cfg, rng)
    y0, x0, ch, cw = crop_window(label, cfg, ignore_label, rng)
    image, label = image[y0:y0 + ch, x0:x0 + cw], label[y0:y0 + ch, x0:x0 + cw]
    if cfg.color_aug:
        image = color_jitter_ssd(image, rnd)
    if cfg.flip and rng.uniform(0.0, 1.0) < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return pad_to(np.ascontiguousarray(image), np.ascontiguousarray(label), cfg.crop_size, ignore_label)
