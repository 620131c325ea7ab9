"""``ovss compare``: methods and variants side by side on the same images.

Each entry (:mod:`.entries`) runs through ``evaluate`` or ``segment`` into its own folder
(:mod:`.run`); the comparison is then read back from those folders (:mod:`.summary`), drawn
(:mod:`.pictures`) and written as ``compare.json`` and a self-contained ``report.html``
(:mod:`.report`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ..runs.shards import Share
from .entries import Entry, parse_entries
from .pictures import class_chart, write_sheets
from .report import write_report
from .run import Source, run_entries
from .summary import image_rows, summarize, write_image_rows

__all__ = ["Entry", "Source", "compare", "parse_entries", "build_report"]


def compare(entries: Sequence[Entry], source: Source, out_dir: str | Path, *, share: Share = Share(),
            overwrite: bool = False, sheets: int | None = None, command: str = "", quiet: bool = True,
            progress: Callable | None = None) -> dict[str, Any]:
    """Run every entry on ``source`` and write the comparison under ``out_dir``; returns what
    ``compare.json`` holds. ``sheets`` caps the contact sheets (all images by default)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run_entries(entries, source, out_dir, share=share, overwrite=overwrite, quiet=quiet, progress=progress)
    folders = [e.folder_name for e in entries]
    rows = image_rows(out_dir, results, folders, source)
    write_image_rows(out_dir, rows)
    if source.vocabulary is not None:
        classes = source.vocabulary.names
    else:
        classes = source.dataset.class_names
    info = {
        "subject": (f"dataset {source.dataset.name}" if source.dataset is not None
                    else "images in " + ", ".join(source.paths or [])),
        "has_ground_truth": source.has_ground_truth, "classes": classes,
        "ground_truth_classes": source.dataset.class_names if source.dataset is not None else None,
        "ignore_label": source.dataset.ignore_label if source.dataset is not None else None,
        "shard": [share.index, share.count] if share.sharded else None, "command": command,
    }
    written = write_sheets(out_dir, rows, [r.label for r in results], classes,
                           ignore_label=info["ignore_label"], limit=sheets,
                           truth_names=info["ground_truth_classes"])
    return build_report(out_dir, results, folders, rows, info, written)


def build_report(out_dir: Path, results, folders: Sequence[str], rows, info: dict[str, Any],
                 sheets: Sequence[str]) -> dict[str, Any]:
    """``compare.json``, the chart and ``report.html`` from the entries' folders."""
    from ..about import version_report

    summary = summarize(out_dir, results, folders, rows, {**info, "sheets": list(sheets)})
    if info["has_ground_truth"] and any(e.get("per_class_iou") for e in summary["entries"]):
        chart = class_chart(out_dir / "chart.png", summary["entries"], "per_class_iou", "IoU (%)")
    else:
        chart = class_chart(out_dir / "chart.png", summary["entries"], "class_share", "share of pixels")
    write_report(out_dir, summary, sheets, chart, info.get("command", ""), version_report())
    summary["chart"] = chart
    return summary
