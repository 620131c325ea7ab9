"""Writing what a run produces: label PNGs, a legend, overlays, COCO results, a manifest.

Every file is written atomically (see :mod:`ovss_cli.io.atomic`), and the two writers that
live for a whole run (:class:`RunningCocoWriter`, :class:`JsonlManifest`) keep memory flat
and keep completed work on disk, so a run over a million images neither grows nor loses
what it already did.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ..segmenter import UNLABELLED
from .atomic import atomic_open, atomic_write_bytes, atomic_write_text

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT_COLOUR = (255, 255, 255)
_OUTLINE_COLOUR = (16, 16, 16)
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
    atomic_write_text(path, json.dumps(legend, indent=2, ensure_ascii=False) + "\n")


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
        outline = thickness + 2
        (width, height), baseline = cv2.getTextSize(text, _FONT, scale, outline)
        x0 = centre_x - width // 2 - outline
        y0 = centre_y - (height + baseline) // 2 - outline
        x1, y1 = x0 + width + 2 * outline, y0 + height + baseline + 2 * outline
        inside = 0 <= x0 and 0 <= y0 and x1 <= region.shape[1] and y1 <= region.shape[0]
        if inside and region[y0:y1, x0:x1].all():
            origin = (left + x0 + outline, top + y0 + outline + height)
            cv2.putText(out, text, origin, _FONT, scale, _OUTLINE_COLOUR, outline, cv2.LINE_AA)
            cv2.putText(out, text, origin, _FONT, scale, _TEXT_COLOUR, thickness, cv2.LINE_AA)
            return
        scale *= 0.8


# --------------------------------------------------------------------------- COCO results


class RunningCocoWriter:
    """COCO-format results for a whole run, built without holding them in memory.

    Images and annotations are spooled as JSON lines to anonymous temp files beside the
    output; :meth:`close` streams them into the final JSON (atomically) and drops the
    spools. The file loads with ``pycocotools.coco.COCO`` and its ``annotations`` list
    works with ``COCO.loadRes``. A ``with`` block left by an exception discards the spools
    (:meth:`discard`): a file that looks complete is written only for a completed run.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        class_names: Sequence[str],
        class_synonyms: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if class_synonyms is not None and len(class_synonyms) != len(class_names):
            raise ValueError(
                f"{len(class_synonyms)} synonym lists for {len(class_names)} class names"
            )
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._categories = []
        for index, name in enumerate(class_names):
            category: dict[str, Any] = {"id": index + 1, "name": name, "supercategory": "ovss"}
            if class_synonyms is not None:
                category["synonyms"] = list(class_synonyms[index])
            self._categories.append(category)
        self._images = self._spool("images")
        self._annotations = self._spool("annotations")
        self._next_image_id = 1
        self._next_annotation_id = 1
        self._closed = False

    def _spool(self, kind: str) -> IO[str]:
        """An anonymous temp file next to the output (same disk, vanishes when closed)."""
        return tempfile.TemporaryFile(
            "w+", encoding="utf-8", newline="\n", dir=self.path.parent,
            prefix=f".{self.path.name}.", suffix=f".{kind}.jsonl",
        )

    def add_image(self, file_name: str, height: int, width: int,
                  regions: Sequence[tuple[int, np.ndarray, float]] = ()) -> int:
        """Add an image and its regions (class index, H x W mask, score) as RLE-encoded
        results; returns the image's COCO id (1, 2, ...), annotations are numbered on from 1.
        Every region is checked and encoded before anything is written, so an invalid one
        leaves no trace of the image."""
        self._check_open()
        image_id = self._next_image_id
        records = [self._annotation(image_id, (int(height), int(width)), *region) for region in regions]
        record = {"id": image_id, "file_name": str(file_name), "height": int(height), "width": int(width)}
        self._images.write(json.dumps(record, ensure_ascii=False) + "\n")
        for annotation in records:
            annotation["id"] = self._next_annotation_id
            self._next_annotation_id += 1
            self._annotations.write(json.dumps(annotation) + "\n")
        self._next_image_id += 1
        return image_id

    def _annotation(self, image_id: int, size: tuple[int, int], class_index: int, mask: np.ndarray,
                    score: float) -> dict[str, Any]:
        if not 0 <= class_index < len(self._categories):
            raise ValueError(f"class index {class_index} out of range 0..{len(self._categories) - 1}")
        mask = np.asarray(mask)
        if mask.shape != size:
            raise ValueError(f"mask shape {mask.shape} does not match image {image_id} size {size}")
        score = float(score)
        if not np.isfinite(score):
            raise ValueError(f"score must be finite, got {score}")
        rle = mask_utils.encode(np.asfortranarray((mask != 0).astype(np.uint8)))
        return {
            "id": 0,
            "image_id": int(image_id),
            "category_id": int(class_index) + 1,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "score": score,
            "iscrowd": 0,
        }

    def close(self) -> None:
        """Write the final JSON atomically and delete the spools; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            info = {
                "description": "ovss predictions",
                "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            with atomic_open(self.path, "w") as out:
                out.write('{"info": ' + json.dumps(info) + ',\n"images": [')
                _copy_json_lines(self._images, out)
                out.write('],\n"categories": ' + json.dumps(self._categories, ensure_ascii=False))
                out.write(',\n"annotations": [')
                _copy_json_lines(self._annotations, out)
                out.write("]}\n")
        finally:
            self._images.close()
            self._annotations.close()

    def discard(self) -> None:
        """Drop what was collected without writing the JSON; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._images.close()
        self._annotations.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"COCO writer for {self.path} is already closed")

    def __enter__(self) -> RunningCocoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def _copy_json_lines(spool: IO[str], out: IO[str]) -> None:
    """Stream a JSON-lines spool into ``out`` as the items of a JSON array."""
    spool.seek(0)
    separator = "\n"
    for line in spool:
        line = line.rstrip("\n")
        if line:
            out.write(separator + line)
            separator = ",\n"


# --------------------------------------------------------------------------- manifest


class JsonlManifest:
    """One JSON line per processed image, flushed as it is written.

    Lines go to ``<path>.part`` while the run is going; :meth:`close` renames it to
    ``path``. If the process dies, or a ``with`` block ends in an exception, the ``.part``
    stays with every completed line, and the missing final name shows the run did not end.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.part_path = self.path.with_name(self.path.name + ".part")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.part_path, "w", encoding="utf-8", newline="\n")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line and flush it to the OS."""
        if self._file is None:
            raise ValueError(f"manifest {self.path} is already closed")
        self._file.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Sync the ``.part`` and rename it to the final path; a second call does nothing."""
        if self._file is None:
            return
        handle, self._file = self._file, None
        with handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(self.part_path, self.path)

    def abandon(self) -> None:
        """Close without renaming: the ``.part`` stays as the record of an unfinished run."""
        if self._file is None:
            return
        handle, self._file = self._file, None
        with contextlib.suppress(OSError), handle:
            handle.flush()
            os.fsync(handle.fileno())

    def __enter__(self) -> JsonlManifest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def _json_default(value: Any) -> Any:
    """JSON for the values records commonly carry: numpy scalars and arrays, paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
