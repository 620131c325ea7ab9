"""Pictures of a comparison: a contact sheet per image (image | ground truth | each entry's
overlay, every panel titled, drawn with OpenCV) and a chart of each entry's per-class IoU (or,
without ground truth, of each class's share of the pixels), drawn with matplotlib's Agg backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from ..io.atomic import atomic_open
from ..io.images import read_image
from ..io.outputs import class_colors, read_label_png, render_overlay, write_rgb_png

PANEL_HEIGHT = 240
TITLE_HEIGHT = 28
GAP = 6
OTHER_COLOR = (128, 128, 128)
MAX_CHART_CLASSES = 60


def palette(class_names: Sequence[str]) -> np.ndarray:
    """The segment outputs' colours, plus grey for "other" (the value after the classes)."""
    return np.vstack([class_colors(len(class_names)), np.array([OTHER_COLOR], np.uint8)])


def panel_size(shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of a sheet panel for an image of ``shape``: :data:`PANEL_HEIGHT` tall."""
    h, w = shape[:2]
    return PANEL_HEIGHT, max(1, round(w * PANEL_HEIGHT / h))


def to_panel(image: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` (smoothly) and ``labels`` (nearest pixel) at the panel size, so that overlays
    and their class names are drawn at the size they are shown (not drawn small and blown up)."""
    height, width = panel_size(image.shape)
    h, w = image.shape[:2]
    scaled = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if h > height else cv2.INTER_LINEAR)
    if labels is not None:
        rows = np.minimum((np.arange(height) + 0.5) * h / height, h - 1).astype(np.int64)
        cols = np.minimum((np.arange(width) + 0.5) * w / width, w - 1).astype(np.int64)
        labels = labels[rows][:, cols]
    return scaled, labels


def titled(panel: np.ndarray, title: str) -> np.ndarray:
    """``panel`` scaled to the sheet's height under a dark strip with ``title`` in it."""
    height, width = panel_size(panel.shape)
    if panel.shape[:2] != (height, width):
        panel = cv2.resize(panel, (width, height), interpolation=cv2.INTER_AREA if panel.shape[0] > height
                           else cv2.INTER_LINEAR)
    text = title.encode("ascii", "replace").decode("ascii")
    (text_width, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    width = max(width, text_width + 12)  # room for the title
    out = np.full((TITLE_HEIGHT + PANEL_HEIGHT, width, 3), 32, np.uint8)
    out[TITLE_HEIGHT:, : panel.shape[1]] = panel
    cv2.putText(out, text, (6, TITLE_HEIGHT - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def contact_sheet(panels: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Titled panels side by side."""
    pieces = []
    for title, panel in panels:
        if pieces:
            pieces.append(np.full((TITLE_HEIGHT + PANEL_HEIGHT, GAP, 3), 255, np.uint8))
        pieces.append(titled(panel, title))
    return np.concatenate(pieces, axis=1)


def write_sheets(out_dir: Path, rows: Sequence[dict[str, Any]], labels: Sequence[str], class_names: Sequence[str],
                 ignore_label: int | None = None, limit: int | None = None,
                 truth_names: Sequence[str] | None = None) -> list[str]:
    """Each row's contact sheet (``row["sheet"]``, see :func:`~.summary.image_rows`) for the
    first ``limit`` images (all by default); returns their paths relative to ``out_dir``.
    ``truth_names`` name the ground truth's labels when they are not the predicted
    vocabulary's (open-vocabulary comparisons)."""
    names = list(class_names) + ["other"]
    colors = palette(class_names)
    truth_names = list(truth_names) if truth_names is not None else list(class_names)
    written = []
    for row in rows[:limit]:
        image = read_image(row["image"])
        shown, _ = to_panel(image)
        panels = [("image", shown)]
        if row.get("label"):
            from ..datasets import read_label

            truth = read_label(row["label"])
            truth = np.where((truth == ignore_label) | (truth < 0) | (truth >= len(truth_names)), -1, truth)
            panels.append(("ground truth", render_overlay(*to_panel(image, truth), truth_names, palette(truth_names))))
        for label in labels:
            pred = row["predictions"].get(label)
            if pred:
                panels.append((label, render_overlay(*to_panel(image, read_label_png(out_dir / pred)), names, colors)))
            else:
                panels.append((f"{label} (failed)", np.zeros_like(shown)))
        write_rgb_png(out_dir / row["sheet"], contact_sheet(panels))
        written.append(row["sheet"])
    return written


def class_chart(path: Path, entries: Sequence[dict[str, Any]], values_key: str, xlabel: str) -> str | None:
    """A horizontal bar chart, one group per class and one bar per entry, of each entry's
    ``values_key`` mapping (class -> value); None when there is nothing to draw. With many
    classes, those where the entries differ most are shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_entry = [e.get(values_key) or {} for e in entries]
    classes = [c for c in (per_entry[0] if per_entry else {}) if any(v.get(c) is not None for v in per_entry)]
    if not classes:
        return None
    note = ""
    if len(classes) > MAX_CHART_CLASSES:
        spread = {c: np.ptp([v.get(c) or 0.0 for v in per_entry]) for c in classes}
        classes = sorted(classes, key=lambda c: -spread[c])[:MAX_CHART_CLASSES]
        note = f" ({MAX_CHART_CLASSES} classes where the entries differ most)"
    height = 0.9 + 0.22 * len(classes) * max(1, len(entries)) ** 0.5
    fig, ax = plt.subplots(figsize=(8.5, max(2.5, height)), dpi=110)
    bar = 0.8 / len(entries)
    y = np.arange(len(classes))
    for i, (entry, values) in enumerate(zip(entries, per_entry)):
        ax.barh(y + i * bar, [values.get(c) or 0.0 for c in classes], height=bar, label=entry["label"])
    ax.set_yticks(y + bar * (len(entries) - 1) / 2, labels=classes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(f"{xlabel} per class{note}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, not over, the bars
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", bbox_inches="tight")
    plt.close(fig)
    return path.name
