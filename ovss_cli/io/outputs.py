"""Writing what a run produces: label PNGs, a legend, overlays, COCO results, a manifest.

Every file is written atomically (see :mod:`ovss_cli.io.atomic`). The run-wide files (COCO
results, the JSONL manifest) are written in one go from streamed entries, so memory stays flat
however many images a run has, and the same entries always give the same bytes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ..segmenter import UNLABELLED
from .atomic import atomic_open, atomic_write_bytes, atomic_write_text
from .jsontext import dumps

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT_COLOUR = (255, 255, 255)
_OUTLINE_DARKEN = 0.2
_BOUNDARY_DARKEN = 0.45
_MIN_FONT_SCALE = 0.35


# --------------------------------------------------------------------------- colours


def class_colors(n: int) -> np.ndarray:
    """``n`` x 3 uint8 RGB colours, the same every run.

    Class ``i`` gets the colour whose bits interleave the bits of ``i + 1`` across R, G
    and B from the most significant bit down (the scheme of the PASCAL VOC palette),
    so neighbouring indices differ strongly and black is never used.
    """
    if n < 0:
        raise ValueError(f"number of colours must be >= 0, got {n}")
    codes = np.arange(1, n + 1, dtype=np.int64)
    colours = np.zeros((n, 3), dtype=np.int64)
    for bit in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((codes >> channel) & 1) << bit
        codes >>= 3
    return colours.astype(np.uint8)


# --------------------------------------------------------------------------- label maps


def label_png_dtype(num_values: int) -> np.dtype:
    """uint8 if labels 0..num_values-1 all fit below the reserved 255, else uint16."""
    if num_values < 0:
        raise ValueError(f"number of label values must be >= 0, got {num_values}")
    if num_values <= 255:
        return np.dtype(np.uint8)
    if num_values <= 65535:
        return np.dtype(np.uint16)
    raise ValueError(f"{num_values} classes do not fit in a 16-bit label PNG (max 65535)")


def unlabelled_value(dtype: np.dtype | str | type) -> int:
    """The PNG value for unlabelled pixels: the dtype's maximum (255 or 65535)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ValueError(f"label PNGs are uint8 or uint16, not {dtype}")
    return int(np.iinfo(dtype).max)


def encode_label_map(labels: np.ndarray, num_values: int) -> np.ndarray:
    """Integer labels (``UNLABELLED`` = -1 allowed) -> the label PNG's dtype and values."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    dtype = label_png_dtype(num_values)
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < UNLABELLED or high >= num_values:
            raise ValueError(
                f"label values must lie in [{UNLABELLED}, {num_values - 1}], got [{low}, {high}]"
            )
    encoded = np.where(labels == UNLABELLED, unlabelled_value(dtype), labels)
    return np.ascontiguousarray(encoded.astype(dtype))


def write_label_png(path: str | os.PathLike[str], labels: np.ndarray, num_values: int) -> None:
    """Write H x W labels as a single-channel 8- or 16-bit PNG (see :func:`encode_label_map`)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be H x W, got shape {labels.shape}")
    atomic_write_bytes(path, _encode_png(encode_label_map(labels, num_values)))


def read_label_png(path: str | os.PathLike[str]) -> np.ndarray:
    """A label PNG written by :func:`write_label_png` as int64 labels, the unlabelled value
    (255 or 65535) back to ``UNLABELLED``; a file that is not one raises ``ValueError``."""
    # via numpy's file reading: OpenCV crashes on paths that are not valid UTF-8
    raw = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 2 or raw.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path} is not a single-channel 8- or 16-bit label PNG")
    labels = raw.astype(np.int64)
    return np.where(raw == unlabelled_value(raw.dtype), UNLABELLED, labels)


def write_rgb_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an H x W x 3 uint8 RGB array as a PNG."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected H x W x 3 uint8 RGB, got {image.dtype} {image.shape}")
    atomic_write_bytes(path, _encode_png(cv2.cvtColor(image, cv2.COLOR_RGB2BGR)))


def _encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an array OpenCV can write (channels in BGR order)."""
    ok, buffer = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.dtype} {array.shape} array as PNG")
    return buffer.tobytes()


def write_legend(
    path: str | os.PathLike[str],
    class_names: list[str],
    class_synonyms: list[list[str]] | None,
    dtype: np.dtype | str | type,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``classes.json``: what each label value means and how it is drawn."""
    if class_synonyms is not None and len(class_synonyms) != len(class_names):
        raise ValueError(
            f"{len(class_synonyms)} synonym lists for {len(class_names)} class names"
        )
    colours = class_colors(len(class_names))
    classes = [
        {
            "id": index,
            "name": name,
            "names": list(class_synonyms[index]) if class_synonyms is not None else [name],
            "color": [int(value) for value in colours[index]],
        }
        for index, name in enumerate(class_names)
    ]
    legend: dict[str, Any] = {
        "classes": classes,
        "unlabelled": unlabelled_value(dtype),
        "png_dtype": np.dtype(dtype).name,
        **(extra or {}),
    }
    atomic_write_text(path, dumps(legend, indent=2) + "\n")


# --------------------------------------------------------------------------- overlays


def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    colors: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend class colours into ``image`` and name each class on its largest region.

    Unlabelled pixels keep their original values; region borders are darkened; a name is
    drawn only where its whole text box fits inside the region, so small regions stay
    unlabelled rather than covered by text that hides them.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected H x W x 3 uint8 RGB, got {image.dtype} {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match image {image.shape[:2]}")
    palette = class_colors(len(class_names)) if colors is None else np.asarray(colors, np.uint8)
    if labels.size and int(labels.max()) >= min(len(class_names), len(palette)):
        raise ValueError(f"label {int(labels.max())} has no class name or colour")

    out = image.copy()
    labelled = labels >= 0
    if labelled.any():
        tint = palette[labels[labelled]].astype(np.float32)
        blended = (1.0 - alpha) * image[labelled].astype(np.float32) + alpha * tint
        out[labelled] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    border = _region_borders(labels) & labelled
    out[border] = (out[border].astype(np.float32) * _BOUNDARY_DARKEN).astype(np.uint8)

    base_scale = float(np.clip(min(labels.shape) / 700.0, 0.45, 2.0))
    for class_index in np.unique(labels[labelled]):
        _draw_class_name(out, labels == class_index, str(class_names[class_index]), base_scale)
    return out


def _region_borders(labels: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from the pixel left of or above them, thickened for big images."""
    border = np.zeros(labels.shape, dtype=bool)
    border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    border[1:, :] |= labels[1:, :] != labels[:-1, :]
    thickness = max(1, round(max(labels.shape) / 800))
    if thickness > 1:
        kernel = np.ones((thickness, thickness), np.uint8)
        border = cv2.dilate(border.astype(np.uint8), kernel).astype(bool)
    return border


def _draw_class_name(out: np.ndarray, mask: np.ndarray, name: str, base_scale: float) -> None:
    """Write ``name`` centred on the deepest point of the class's largest component."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    top, left = int(rows[0]), int(cols[0])
    # Crop to the class's bounding box with a zero border so image edges count as edges.
    crop = np.pad(mask[top : rows[-1] + 1, left : cols[-1] + 1], 1).astype(np.uint8)
    count, components, stats, centroids = cv2.connectedComponentsWithStats(crop, connectivity=8)
    if count < 2:
        return
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    # Narrow to that component's box, keeping a one-pixel zero border (the crop padding
    # guarantees it exists).
    x, y, w, h = (int(v) for v in stats[largest, :4])
    region = (components[y - 1 : y + h + 1, x - 1 : x + w + 1] == largest).astype(np.uint8)
    top, left = top + y - 2, left + x - 2  # image coordinates of region[0, 0]
    depth = cv2.distanceTransform(region, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # Deepest point; along a ridge (long regions) take the one nearest the centroid.
    ridge_y, ridge_x = np.nonzero(depth >= depth.max() - 1.0)
    mean_x, mean_y = centroids[largest] - (x - 1, y - 1)
    nearest = int(np.argmin((ridge_x - mean_x) ** 2 + (ridge_y - mean_y) ** 2))
    centre_y, centre_x = int(ridge_y[nearest]), int(ridge_x[nearest])

    text = name.encode("ascii", "replace").decode("ascii")  # Hershey fonts are ASCII-only
    scale = base_scale
    while scale >= _MIN_FONT_SCALE:
        thickness = max(1, round(scale * 1.5))
        halo = 2  # outline width around the letters
        (width, height), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
        x0 = centre_x - width // 2 - halo
        y0 = centre_y - (height + baseline) // 2 - halo
        x1, y1 = x0 + width + 2 * halo, y0 + height + baseline + 2 * halo
        inside = 0 <= x0 and 0 <= y0 and x1 <= region.shape[1] and y1 <= region.shape[0]
        if inside and region[y0:y1, x0:x1].all():
            # the letters once, as coverage; the outline is that coverage grown by `halo` (drawing
            # the text again with a thicker stroke would space thin letters differently)
            ink = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.putText(ink, text, (halo, halo + height), _FONT, scale, 255, thickness, cv2.LINE_AA)
            grown = cv2.dilate(ink, np.ones((2 * halo + 1, 2 * halo + 1), np.uint8)) > 0
            box = out[top + y0 : top + y1, left + x0 : left + x1]
            box[grown] = (box[grown] * _OUTLINE_DARKEN).astype(np.uint8)  # a dark shade of what is under it
            cover = (ink.astype(np.float32) / 255.0)[..., None]
            box[...] = np.rint(box * (1.0 - cover) + np.array(_TEXT_COLOUR, np.float32) * cover).astype(np.uint8)
            return
        scale *= 0.8


# --------------------------------------------------------------------------- COCO results


def coco_categories(class_names: Sequence[str], class_synonyms: Sequence[Sequence[str]] | None = None) -> list[dict]:
    """COCO ``categories``: id = class index + 1, with each class's names as synonyms."""
    if class_synonyms is not None and len(class_synonyms) != len(class_names):
        raise ValueError(f"{len(class_synonyms)} synonym lists for {len(class_names)} class names")
    categories = []
    for index, name in enumerate(class_names):
        category: dict[str, Any] = {"id": index + 1, "name": name, "supercategory": "ovss"}
        if class_synonyms is not None:
            category["synonyms"] = list(class_synonyms[index])
        categories.append(category)
    return categories


def coco_annotation(class_index: int, mask: np.ndarray, score: float, num_classes: int) -> dict[str, Any]:
    """One region as a COCO result (RLE mask, area, bbox, score), without ``id``/``image_id``
    (numbered when the file is written)."""
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class index {class_index} out of range 0..{num_classes - 1}")
    score = float(score)
    if not np.isfinite(score):
        raise ValueError(f"score must be finite, got {score}")
    rle = mask_utils.encode(np.asfortranarray((np.asarray(mask) != 0).astype(np.uint8)))
    return {
        "category_id": int(class_index) + 1,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "score": score,
        "iscrowd": 0,
    }


def write_coco(path: str | os.PathLike[str], categories: list[dict],
               entries: Callable[[], Iterable[tuple[dict[str, Any], list[dict[str, Any]]]]]) -> None:
    """Write COCO results atomically from ``entries()``: (image without id, its annotations
    without ids) in order; images are numbered 1, 2, ... in that order and annotations 1, 2, ...
    across them, so the same entries always give the same bytes. ``entries`` is called twice
    (images, then annotations), so nothing is held in memory. The file loads with
    ``pycocotools.coco.COCO`` and its ``annotations`` work with ``COCO.loadRes``."""
    with atomic_open(path, "w") as out:
        out.write('{"info": {"description": "ovss predictions"},\n"images": [')
        separator = "\n"
        for image_id, (image, _) in enumerate(entries(), start=1):
            out.write(separator + dumps({"id": image_id, **image}))
            separator = ",\n"
        out.write('],\n"categories": ' + dumps(categories) + ',\n"annotations": [')
        separator, annotation_id = "\n", 0
        for image_id, (_, annotations) in enumerate(entries(), start=1):
            for annotation in annotations:
                annotation_id += 1
                out.write(separator + json.dumps({"id": annotation_id, "image_id": image_id, **annotation}))
                separator = ",\n"
        out.write("]}\n")


# --------------------------------------------------------------------------- manifest


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically, streaming ``records``."""
    with atomic_open(path, "w") as out:
        for record in records:
            out.write(dumps(record, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    """JSON for the values records commonly carry: numpy scalars and arrays, paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
