"""What a training run reports: ``OUT/log.jsonl``, the terminal display, and the loss plot.

``log.jsonl`` has one JSON object per line: ``{"iteration": i, "lr": ..., "loss": total,
"loss_ce": ..., ..., "seconds_per_iteration": ...}`` every ``--log-every`` iterations (the
mean over those iterations), and ``{"iteration": i, "eval": {...metrics...}}`` after each
evaluation. A resumed run first drops the lines of iterations it will run again.

On a terminal the display is a rich live panel (iteration, each loss term, lr, it/s, ETA);
elsewhere (a log file, a pipe) it prints one plain line per logged iteration; ``--quiet``
prints nothing but errors.
"""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

from ..io.atomic import atomic_write_bytes, atomic_write_text

LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"


class TrainLog:
    """Appends records to ``OUT/log.jsonl``."""

    def __init__(self, out: Path, resume_from: int | None):
        self.path = Path(out) / LOG_NAME
        if resume_from is None:
            atomic_write_text(self.path, "")
        else:  # keep what happened before the checkpoint; drop what will be redone
            kept = [r for r in read_log(self.path) if r.get("iteration", 0) < resume_from]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log (a torn last line, from a killed run, is skipped)."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def loss_text(losses: dict[str, float]) -> str:
    """``loss 12.3 | ce 1.2 mask 3.4 dice 2.1 | block 0: ce ... `` (final block first)."""
    groups: dict[str, list[str]] = {}
    for key, value in losses.items():
        if key == "loss":
            continue
        name, _, block = key.removeprefix("loss_").partition("_")
        groups.setdefault(block, []).append(f"{name} {value:.3f}")
    parts = [f"loss {losses.get('loss', float('nan')):.3f}", " ".join(groups.pop("", []))]
    parts += [f"aux {block}: " + " ".join(terms) for block, terms in groups.items()]
    return " | ".join(p for p in parts if p)


class TrainDisplay:
    """Progress on stderr: a rich live panel on a terminal, plain lines otherwise."""

    def __init__(self, total: int, start: int, *, enabled: bool, live: bool | None = None):
        self.total, self.start = total, start
        self.enabled = enabled
        self.live = sys.stderr.isatty() if live is None else live
        self._progress = None
        self._text = None

    def __enter__(self) -> "TrainDisplay":
        if self.enabled and self.live:
            from rich.console import Group
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.text import Text

            from ..reporting import stderr

            self._progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]} it/s"), TextColumn("lr {task.fields[lr]}"),
                                      TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), console=stderr)
            self._task = self._progress.add_task("train", total=self.total, completed=self.start, rate="-", lr="-",
                                                 eta="-")
            self._text = Text("")
            self._live = Live(Group(self._progress, self._text), console=stderr, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._live.__exit__(*exc)

    def update(self, iteration: int, losses: dict[str, float], lr: float, rate: float) -> None:
        """After ``iteration`` (0-based) finished: its losses, the lr, iterations per second."""
        if not self.enabled:
            return
        remaining = (self.total - iteration - 1) / rate if rate > 0 else float("inf")
        if self._progress is not None:
            self._progress.update(self._task, completed=iteration + 1, rate=f"{rate:.2f}", lr=f"{lr:.2e}",
                                  eta=format_duration(remaining))
            self._text.plain = loss_text(losses)
        else:
            print(f"iter {iteration + 1}/{self.total}  {loss_text(losses)}  lr {lr:.2e}  {rate:.2f} it/s  "
                  f"ETA {format_duration(remaining)}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)


def loss_figure(records: Iterable[dict[str, Any]]):
    """The loss curves (total and each term, log scale) over iterations done and, when the log
    has evaluations, their mIoU below on the same axis. Points are marked while there are few of
    them, so a short run (one logged point when ``--iters`` < ``--log-every``) still shows its
    losses."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import LogFormatter, MaxNLocator

    records = list(records)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if isinstance(r.get("eval"), dict) and "miou" in r["eval"]]
    keys = sorted({k for r in steps for k in r if k.startswith("loss_")}, key=lambda k: (k.count("_") > 1, k))
    terms = sorted({k.split("_")[1] for k in keys})
    colours = {term: f"C{i}" for i, term in enumerate(terms)}
    marker = "o" if len(steps) <= 40 else None
    rows = 2 if evals else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 4.5 * rows), squeeze=False, sharex=True)
    ax = axes[0][0]
    x = [r["iteration"] + 1 for r in steps]
    ax.plot(x, [r["loss"] for r in steps], color="black", linewidth=2, marker=marker, markersize=4, label="total")
    for key in keys:
        ax.plot(x, [r.get(key, float("nan")) for r in steps], linewidth=1, color=colours[key.split("_")[1]],
                linestyle="-" if key.count("_") == 1 else "--", marker=marker, markersize=3,
                label=key.removeprefix("loss_"))
    ax.set_ylabel("loss (weighted)")
    ax.set_yscale("log")
    # plain numbers (2, 3, 10, 1e+06 rather than 2 x 10^0); in-between values only over a short range
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("SAN training loss (solid: last block, dashed: earlier blocks)")
    if evals:
        ax2 = axes[1][0]
        ax2.plot([r["iteration"] + 1 for r in evals], [r["eval"]["miou"] for r in evals], marker="o")
        ax2.set_ylabel("mIoU (%)")
        ax2.grid(True, alpha=0.3)
        ax2.set_title(f"evaluation: {evals[-1]['eval'].get('dataset', '')}")
    bottom = axes[-1][0]
    bottom.set_xlabel("iterations done")
    last = max([*x, *(r["iteration"] + 1 for r in evals), 1])
    bottom.set_xlim(0, last * 1.03)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_log(records: Iterable[dict[str, Any]], path: Path) -> Path:
    """Write :func:`loss_figure` of the log's records as a PNG (atomically)."""
    from matplotlib import pyplot as plt

    fig = loss_figure(records)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
