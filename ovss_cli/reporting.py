"""Terminal output: progress bars and summary tables on stderr (stdout stays for data)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .segment import ImageResult, SegmentSummary

stderr = Console(stderr=True)


@contextmanager
def image_progress(total: int | None, enabled: bool, label: str = "segmenting") -> Iterator:
    """Yields a callback advancing a bar that shows images/s and the ETA (no-op when disabled)."""
    if not enabled:
        yield lambda result=None: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    )
    with progress:
        task = progress.add_task(label, total=total, rate="-", failed=0)
        failed = 0

        def advance(result: ImageResult | None = None) -> None:
            nonlocal failed
            if result is not None and not result.ok:
                failed += 1
                progress.console.print(f"[red]failed[/red] {result.input.path}: {result.error}", markup=True,
                                       highlight=False)
            progress.advance(task)
            t = progress.tasks[0]
            done = t.completed - failed
            rate = done / t.elapsed if t.elapsed and done > 0 else 0.0
            progress.update(task, rate=f"{rate:.2f}" if rate else "-", failed=failed)

        yield advance


def print_segment_summary(summary: SegmentSummary, console: Console = stderr) -> None:
    """Counts, throughput, class frequencies and the first failures."""
    rate = summary.images_ok / summary.seconds if summary.seconds > 0 else 0.0
    head = Table(title="ovss segment", show_header=False)
    head.add_row("images", f"{summary.images_ok} ok, {summary.images_failed} failed")
    head.add_row("time", f"{summary.seconds:.1f} s ({rate:.2f} images/s)")
    for name, path in summary.outputs.items():
        head.add_row(name, path)
    console.print(head)
    if summary.class_images:
        table = Table(title="classes")
        table.add_column("class")
        table.add_column("images", justify="right")
        table.add_column("mean area", justify="right")
        for c, n in summary.class_images.most_common():
            mean = summary.class_fraction_sum[c] / n
            table.add_row(summary.vocabulary.names[c], str(n), f"{100 * mean:.1f}%")
        console.print(table)
    if summary.failures:
        table = Table(title=f"failures ({summary.images_failed})")
        table.add_column("input")
        table.add_column("reason")
        for path, reason in summary.failures[:20]:
            table.add_row(path, reason)
        console.print(table)
