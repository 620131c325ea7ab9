"""Reading ground-truth label maps: class indices, exactly as stored, as int64.

8-bit and 16-bit grayscale PNG/TIFF are read unchanged (no scaling), palette PNGs (the
official VOC ``SegmentationClass``) as their palette indices, not colours. This is what
detectron2's evaluator does (``np.asarray(Image.open(f), dtype=int)``); OpenCV is the
fallback for TIFF variants Pillow cannot open. Ignore values stay as they are.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError

# Modes whose pixels are one integer (or integral float) each: indices, not colours.
_INDEX_MODES = frozenset({"1", "L", "P", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def read_label(path: str | Path) -> np.ndarray:
    """An H x W int64 array of the label file's values; DatasetError if it is no label map."""
    p = Path(path)
    try:
        array = _read_with_pil(p)
    except DatasetError:
        raise
    except Exception as error:  # any decoder failure: try OpenCV, else the file's fault
        array = _read_with_cv2(p)
        if array is None:
            raise DatasetError(f"cannot read label {p}: {_reason(p, error)}") from None
    if array.ndim != 2:
        raise DatasetError(
            f"label {p} is not a single-channel image (shape {array.shape}); "
            "labels must be class indices (gray or palette)"
        )
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise DatasetError(f"label {p} holds non-integer values; labels must be class indices")
    return array.astype(np.int64)


def _read_with_pil(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        if image.mode not in _INDEX_MODES:
            raise DatasetError(
                f"label {path} has pixel mode {image.mode} (colour or alpha); labels must hold "
                "class indices (8/16-bit gray or palette)"
            )
        return np.asarray(image)


def _reason(path: Path, error: BaseException) -> str:
    if not path.exists():
        return "file not found"
    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image format"
    text = str(error).strip()
    return text.splitlines()[0][:120] if text else type(error).__name__


def _read_with_cv2(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    buffer = np.fromfile(str(path), dtype=np.uint8)
    if buffer.size == 0:
        return None
    return cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
