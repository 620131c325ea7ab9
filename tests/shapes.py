"""A synthetic segmentation dataset of coloured shapes on a textured background, in the generic
layout (images/, labels/, classes.txt), for training tests and benchmarks."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SHAPE_CLASSES = ["background", "red disk", "green square", "blue triangle"]
_COLOURS = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 70, 230)}


def shapes_sample(seed: int, size: tuple[int, int] = (96, 128)) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 RGB image, H x W uint8 label): 1-3 shapes, label 255 on a thin border."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = (rng.normal(120, 25, (h, w, 1)) + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8)
    label = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, 4))
        r = int(rng.integers(min(h, w) // 8, min(h, w) // 3))
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        mask = np.zeros((h, w), np.uint8)
        if cls == 1:
            cv2.circle(mask, (cx, cy), r, 1, -1)
        elif cls == 2:
            cv2.rectangle(mask, (cx - r, cy - r), (cx + r, cy + r), 1, -1)
        else:
            points = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
            cv2.fillPoly(mask, [points], 1)
        colour = np.array(_COLOURS[cls]) + rng.integers(-20, 21, 3)
        image[mask > 0] = colour.clip(0, 255)
        label[mask > 0] = cls
    if rng.random() < 0.3:
        label[:2] = 255
    return image, label


def write_shapes_dataset(root: Path, count: int, seed: int = 0, size: tuple[int, int] = (96, 128)) -> Path:
    """``root/images/*.png``, ``root/labels/*.png``, ``root/classes.txt``; returns ``root``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, label = shapes_sample(seed * 100_003 + i, size)
        assert cv2.imwrite(str(root / "images" / f"s{i:04d}.png"), image[:, :, ::-1])
        assert cv2.imwrite(str(root / "labels" / f"s{i:04d}.png"), label)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in SHAPE_CLASSES))
    return root
