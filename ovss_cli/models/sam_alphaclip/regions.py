"""What Alpha-CLIP sees for each mask: the background handling modes.

Each mode maps (image, mask) to the (pixels, mask) pair to classify:

- ``none``: the whole image;
- ``blur``: the image Gaussian-blurred (15 x 15 kernel) outside the mask;
- ``black``: the image with everything outside the mask set to zero;
- ``crop``: a square crop around the mask's box, padded by 15% of the box's longer side,
  clipped to the image (pixels and mask cropped alike);
- ``ellipse``: a red ellipse (semi-axes 0.75 x the box's width and height, 4 px thick)
  drawn around the box centre.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from ...errors import UsageError

REGION_MODES = ("none", "blur", "black", "crop", "ellipse")
BLUR_KERNEL = (15, 15)
CROP_PAD = 0.15
ELLIPSE_SCALE = 0.75
ELLIPSE_THICKNESS = 4
RED = (255, 0, 0)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box (x0, y0, x1, y1) of a non-empty mask, end-exclusive."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def blur_image(image: np.ndarray) -> np.ndarray:
    """The blurred background used by ``blur`` (compute once per image)."""
    return cv2.GaussianBlur(image, BLUR_KERNEL, 0)


def square_crop_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The ``crop`` window (x0, y0, x1, y1), end-exclusive, clipped to the image."""
    x0, y0, x1, y1 = mask_box(mask)
    side = max(x1 - x0, y1 - y0)
    half = side * (1.0 + 2.0 * CROP_PAD) / 2.0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    h, w = mask.shape
    return (max(0, int(round(cx - half))), max(0, int(round(cy - half))),
            min(w, int(round(cx + half))), min(h, int(round(cy + half))))


def draw_ellipse(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of ``image`` with the red ellipse around ``mask``'s box."""
    x0, y0, x1, y1 = mask_box(mask)
    centre = (int(round((x0 + x1) / 2.0)), int(round((y0 + y1) / 2.0)))
    axes = (int(round(ELLIPSE_SCALE * (x1 - x0))), int(round(ELLIPSE_SCALE * (y1 - y0))))
    out = np.ascontiguousarray(image.copy())
    cv2.ellipse(out, centre, axes, 0, 0, 360, RED, thickness=ELLIPSE_THICKNESS)
    return out


def cv_mask(mask: np.ndarray) -> np.ndarray:
    """``mask`` as the uint8 array OpenCV's masked operations take (a bool mask is viewed, not
    copied)."""
    return mask.view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).astype(np.uint8)


def check_region(mode: str) -> str:
    """``mode`` if it is a known region mode, else a UsageError listing them."""
    if mode not in REGION_MODES:
        raise UsageError(f"unknown --region {mode!r}; choose one of {', '.join(REGION_MODES)}")
    return mode


def region_fn(mode: str, image: np.ndarray, blurred: np.ndarray | None = None) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The per-mask function for ``mode`` on one image. Image-wide work (the blur) is done
    by the caller once and passed in as ``blurred``."""
    image = np.ascontiguousarray(image)
    if mode == "none":
        return lambda mask: (image, mask)
    if mode == "blur":
        background = blurred if blurred is not None else blur_image(image)

        def blur(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            out = background.copy()
            cv2.copyTo(image, cv_mask(mask), out)  # the image where the mask is set
            return out, mask
        return blur
    if mode == "black":
        return lambda mask: (cv2.bitwise_and(image, image, mask=cv_mask(mask)), mask)
    if mode == "crop":
        def crop(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x0, y0, x1, y1 = square_crop_box(mask)
            return image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        return crop
    check_region(mode)
    return lambda mask: (draw_ellipse(image, mask), mask)
