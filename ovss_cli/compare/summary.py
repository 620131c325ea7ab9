"""What a comparison found: one row per entry (accuracy, speed, memory, size), the classes the
second entry gains and loses against the first, and how often entries agree pixel by pixel.

Everything is read back from the entries' folders (``metrics.json``, ``entry.json``, the saved
label maps), so a merged comparison summarises exactly as a single one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..io.atomic import atomic_write_text
from ..io.outputs import read_label_png, write_jsonl
from .run import EntryResult

IMAGES_FILE = "images.jsonl"


def image_rows(out_dir: Path, results: Sequence[EntryResult], folders: Sequence[str], source) -> list[dict[str, Any]]:
    """One row per compared image, in input order: its key, image and ground-truth files, each
    entry's label map (relative to ``out_dir``; None where the entry failed on it) and where
    its contact sheet goes."""
    rows: list[dict[str, Any]] = []
    if source.has_ground_truth:
        for pos, sample in enumerate(source.dataset.samples(limit=source.limit, subset=source.subset)):
            preds = {}
            for result, folder in zip(results, folders):
                rel = Path("entries") / folder / "predictions" / f"{sample.id}.png"
                preds[result.label] = rel.as_posix() if (out_dir / rel).is_file() else None
            if any(preds.values()):
                rows.append({"pos": pos, "key": sample.id, "image": str(sample.image_path),
                             "label": str(sample.label_path), "predictions": preds,
                             "sheet": (Path("sheets") / f"{sample.id}.png").as_posix()})  # ids may hold dots
    else:
        per_entry = []
        for folder in folders:
            manifest = out_dir / "entries" / folder / "manifest.jsonl"
            lines = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
            per_entry.append({r["rel"]: r for r in lines})
        for pos, (rel, first) in enumerate(per_entry[0].items()):
            preds = {}
            for result, folder, records in zip(results, folders, per_entry):
                record = records.get(rel)
                ok = record is not None and record["ok"]
                preds[result.label] = (Path("entries") / folder / record["outputs"]["png"]).as_posix() if ok else None
            rows.append({"pos": pos, "key": rel, "image": first["input"], "label": None, "predictions": preds,
                         "sheet": (Path("sheets") / rel).with_suffix(".png").as_posix()})  # the walk keeps these unique
    return rows


def write_image_rows(out_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_jsonl(out_dir / IMAGES_FILE, rows)


def read_image_rows(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / IMAGES_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def pixel_statistics(out_dir: Path, rows: Sequence[dict[str, Any]], labels: Sequence[str],
                     num_values: int) -> tuple[list[list[float | None]], list[np.ndarray]]:
    """How often each pair of entries gives a pixel the same label (over the images both
    labelled), and each entry's pixel count per label value (0..num_values-1), streaming one
    image at a time."""
    n = len(labels)
    same = np.zeros((n, n), np.int64)
    total = np.zeros((n, n), np.int64)
    counts = [np.zeros(num_values, np.int64) for _ in labels]
    for row in rows:
        maps = [read_label_png(out_dir / row["predictions"][label]) if row["predictions"][label] else None
                for label in labels]
        for i in range(n):
            if maps[i] is None:
                continue
            valid = maps[i][(maps[i] >= 0) & (maps[i] < num_values)]
            counts[i] += np.bincount(valid.ravel(), minlength=num_values)
            for j in range(i, n):
                if maps[j] is not None:
                    same[i, j] += int((maps[i] == maps[j]).sum())
                    total[i, j] += maps[i].size
                    same[j, i], total[j, i] = same[i, j], total[i, j]
    fractions = [[float(same[i, j] / total[i, j]) if total[i, j] else None for j in range(n)] for i in range(n)]
    return fractions, counts


def _p95(values: Sequence[float]) -> float | None:
    return float(np.percentile(values, 95)) if len(values) else None


def entry_row(out_dir: Path, result: EntryResult, folder: str) -> dict[str, Any]:
    """An entry's line of the table (and of compare.json, with its per-class results)."""
    times = result.image_seconds
    row: dict[str, Any] = {
        "label": result.label, "method": result.method, "model": result.describe.get("model"),
        "settings": result.describe, "images": result.images, "failed": result.failed,
        "images_per_second": result.images_per_second,
        "seconds_per_image": float(np.mean(times)) if times else None, "seconds_per_image_p95": _p95(times),
        "peak_memory_mib": result.peak_memory / 2**20, "memory": result.memory_kind,
        "parameters": result.parameters, "load_seconds": result.load_seconds, "folder": f"entries/{folder}",
    }
    metrics_path = out_dir / "entries" / folder / "metrics.json"
    if metrics_path.is_file():
        report = json.loads(metrics_path.read_text(encoding="utf-8"))
        if "metrics" in report:
            m = report["metrics"]
            row.update({k: m[k] for k in ("mIoU", "fwIoU", "mACC", "pACC")})
            row["per_class_iou"] = {c["class"]: c["iou"] for c in m["per_class"]}
        if "semantic_similarity" in report:
            row["semantic_similarity"] = report["semantic_similarity"]
    return row


def gains_and_losses(first: dict[str, Any], second: dict[str, Any], top: int = 5) -> dict[str, Any]:
    """The classes whose IoU the second entry raises (lowers) most against the first."""
    a, b = first.get("per_class_iou") or {}, second.get("per_class_iou") or {}
    deltas = [(c, b[c] - a[c], a[c], b[c]) for c in a if a[c] is not None and b.get(c) is not None]
    deltas.sort(key=lambda d: d[1])
    as_rows = lambda items: [{"class": c, "change": d, "first": x, "second": y} for c, d, x, y in items]  # noqa: E731
    return {"first": first["label"], "second": second["label"],
            "gains": as_rows([d for d in reversed(deltas) if d[1] > 0][:top]),
            "losses": as_rows([d for d in deltas if d[1] < 0][:top])}


def summarize(out_dir: Path, results: Sequence[EntryResult], folders: Sequence[str], rows: Sequence[dict[str, Any]],
              info: dict[str, Any]) -> dict[str, Any]:
    """Everything in the report, written as ``compare.json``; ``info["classes"]`` names the
    label values (value ``len(classes)`` is "other")."""
    entries = [entry_row(out_dir, r, f) for r, f in zip(results, folders)]
    labels = [r.label for r in results]
    classes = list(info["classes"]) + ["other"]
    fractions, counts = pixel_statistics(out_dir, rows, labels, len(classes))
    for entry, count in zip(entries, counts):
        pixels = int(count.sum())
        entry["class_share"] = {c: (float(n) / pixels if pixels else None) for c, n in zip(classes, count) if n}
    summary: dict[str, Any] = {**info, "entries": entries, "agreement": {"labels": labels, "fraction": fractions},
                               "images": len(rows)}
    if len(entries) >= 2 and entries[0].get("per_class_iou"):
        summary["gains_and_losses"] = gains_and_losses(entries[0], entries[1])
    atomic_write_text(out_dir / "compare.json", json.dumps(summary, indent=2) + "\n")
    return summary
