"""``report.html``: the comparison as one self-contained page that opens offline from its folder:
inline CSS, no script, no font or file from anywhere else; the chart and the contact sheets are
the PNGs beside it, referenced by relative path."""
from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from ..io.atomic import atomic_write_text

MAX_SHEETS_SHOWN = 60

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
p.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; max-width: 100%; }
th, td { border: 1px solid #d0d0d0; padding: 0.3em 0.5em; text-align: right; }
td { white-space: nowrap; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; vertical-align: bottom; } td.text, th.text { text-align: left; }
td.text { white-space: normal; overflow-wrap: anywhere; min-width: 4em; max-width: 18em; }
td.best { font-weight: bold; background: #eaf6ea; }
.up { color: #1a7f37; } .down { color: #b42318; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.85em; }
img { max-width: 100%; height: auto; border: 1px solid #e0e0e0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap;
      overflow-wrap: anywhere; }
div.wide { overflow-x: auto; }
.note { color: #666; font-size: 0.85em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _src(rel: str) -> str:
    return "/".join(quote(part) for part in rel.split("/"))


def _num(value: Any, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    head = "".join(f'<th class="text">{_e(h)}</th>' if i < text_columns else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell if cell.startswith("<td") else
                                    (f'<td class="text">{cell}</td>' if i < text_columns else f"<td>{cell}</td>")
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def metric_columns(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(column title, key in an entry row) of the accuracy columns this comparison has."""
    entries = summary["entries"]
    if any("mIoU" in e for e in entries):
        return [("mIoU", "mIoU"), ("fwIoU", "fwIoU"), ("mACC", "mACC"), ("pACC", "pACC")]
    if any("semantic_similarity" in e for e in entries):
        return [("sem. similarity", "similarity"), ("rescaled", "similarity_rescaled")]
    return []


def metric_value(entry: dict[str, Any], key: str) -> float | None:
    if key == "similarity":
        return (entry.get("semantic_similarity") or {}).get("mean_similarity")
    if key == "similarity_rescaled":
        return (entry.get("semantic_similarity") or {}).get("rescaled_similarity")
    return entry.get(key)


def write_report(out_dir: Path, summary: dict[str, Any], sheets: Sequence[str], chart: str | None,
                 command: str, versions: str) -> Path:
    """Write ``report.html`` from ``summary`` (see :mod:`.summary`)."""
    entries = summary["entries"]
    metrics = metric_columns(summary)
    parts = [f"<h1>ovss compare</h1><p class=\"meta\">{_e(summary.get('subject', ''))} · {summary['images']} images · "
             f"{len(entries)} entries · made {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>"]

    header = ["entry", "method", "model", *[t for t, _ in metrics], "images/s", "s/image", "p95 s/image",
              "peak memory (MiB)", "parameters (M)", "failed"]
    best = {k: max((metric_value(e, k) for e in entries if metric_value(e, k) is not None), default=None)
            for _, k in metrics}
    rows = []
    for e in entries:
        cells = [_e(e["label"]), _e(e["method"]), _e(e.get("model") or "")]
        for _, key in metrics:
            value = metric_value(e, key)
            digits = 4 if key.startswith("similarity") else 2
            cls = ' class="best"' if value is not None and value == best[key] and len(entries) > 1 else ""
            cells.append(f"<td{cls}>{_num(value, digits)}</td>")
        cells += [_num(e["images_per_second"]), _num(e["seconds_per_image"], 3), _num(e["seconds_per_image_p95"], 3),
                  f"{e['peak_memory_mib']:.0f} ({_e(e['memory'])})", f"{e['parameters'] / 1e6:.1f}", str(e["failed"])]
        rows.append(cells)
    parts.append("<h2>Summary</h2>" + _table(header, rows, text_columns=3))
    parts.append('<p class="note">Times are per image, model loading excluded; peak memory is the GPU memory '
                 "allocated on CUDA, otherwise the process's resident memory (which includes what earlier entries "
                 "left loaded).</p>")

    changes = summary.get("gains_and_losses")
    if changes and (changes["gains"] or changes["losses"]):
        rows = [[_e(c["class"]), f'<td class="up">+{c["change"]:.2f}</td>', _num(c["first"]), _num(c["second"])]
                for c in changes["gains"]]
        rows += [[_e(c["class"]), f'<td class="down">{c["change"]:.2f}</td>', _num(c["first"]), _num(c["second"])]
                 for c in changes["losses"]]
        parts.append(f"<h2>Largest IoU gains and losses: {_e(changes['second'])} against {_e(changes['first'])}</h2>"
                     + _table(["class", "change", changes["first"], changes["second"]], rows))

    agree = summary["agreement"]
    if len(agree["labels"]) > 1:
        rows = [[_e(a)] + [_num(None if v is None else 100 * v, 1, " %") for v in line]
                for a, line in zip(agree["labels"], agree["fraction"])]
        parts.append("<h2>Pixels labelled alike</h2>" + _table(["", *agree["labels"]], rows))

    if chart:
        parts.append(f'<h2>Per class</h2><figure><img src="{_src(chart)}" alt="per-class chart">'
                     "</figure>")
    if any(e.get("per_class_iou") for e in entries):
        classes = list(entries[0]["per_class_iou"])
        rows = [[_e(c)] + [_num((e.get("per_class_iou") or {}).get(c)) for e in entries] for c in classes
                if any((e.get("per_class_iou") or {}).get(c) is not None for e in entries)]
        parts.append("<details><summary>IoU of every class</summary>"
                     + _table(["class", *[e["label"] for e in entries]], rows) + "</details>")

    if sheets:
        parts.append("<h2>Images</h2>")
        for rel in sheets[:MAX_SHEETS_SHOWN]:
            name = Path(rel).relative_to("sheets").with_suffix("").as_posix()
            parts.append(f'<figure><img src="{_src(rel)}" alt="{_e(name)}" loading="lazy">'
                         f"<figcaption>{_e(name)}</figcaption></figure>")
        if len(sheets) > MAX_SHEETS_SHOWN:
            parts.append(f'<p class="note">{len(sheets) - MAX_SHEETS_SHOWN} more contact sheets are in the '
                         "sheets folder.</p>")

    parts.append(f"<h2>How this was made</h2><pre>{_e(command)}</pre><pre>{_e(versions)}</pre>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>ovss compare</title><style>{_CSS}</style></head><body>\n" + "\n".join(parts)
            + "\n</body></html>\n")
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
