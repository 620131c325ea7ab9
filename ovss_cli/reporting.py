"""Terminal output: progress bars and summary tables on stderr (stdout stays for data)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .segment import SegmentSummary

stderr = Console(stderr=True)


@contextmanager
def image_progress(total: int | None, enabled: bool, label: str = "segmenting",
                   counter: Callable[[int, int, int], tuple[int, int, int]] | None = None) -> Iterator:
    """Yields a callback advancing a bar that shows images/s and the ETA (no-op when disabled).

    ``counter(done, failed, reused)`` counts finished inputs across processes (torchrun) and
    returns the totals so far: the bar then shows every rank's progress (and, once the block
    ends, the final totals), and ranks without a bar still count theirs."""

    def counts(result) -> tuple[int, int, int]:
        failed = int(result is not None and not result.ok)
        return 1, failed, int(bool(getattr(result, "reused", False)))

    if not enabled:
        yield (lambda result=None: counter(*counts(result))) if counter is not None else (lambda result=None: None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TextColumn("done before {task.fields[reused]}"),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    )
    with progress:
        task = progress.add_task(label, total=total, rate="-", failed=0, reused=0)
        totals = [0, 0, 0]  # completed, failed, reused (every rank's, under torchrun)

        def show(completed: int, failed: int, reused: int) -> None:
            totals[:] = [completed, failed, reused]
            elapsed = progress.tasks[0].elapsed
            done = completed - failed - reused
            rate = done / elapsed if elapsed and done > 0 else 0.0
            progress.update(task, completed=completed, rate=f"{rate:.2f}" if rate else "-", failed=failed,
                            reused=reused)

        def advance(result=None) -> None:
            """``result``: anything with ``ok``, ``path`` and ``error`` (a segment or evaluate
            result; ``reused`` when it was complete from an earlier run)."""
            if result is not None and not result.ok:
                progress.console.print(f"[red]failed[/red] {escape(str(result.path))}: {escape(str(result.error))}",
                                       markup=True, highlight=False)
            step = counts(result)
            show(*(counter(*step) if counter is not None else (t + s for t, s in zip(totals, step))))

        yield advance
        if counter is not None:  # the other ranks' last inputs, counted after rank 0's own
            show(*counter(0, 0, 0))


def print_plan(plan, walk, console: Console | None = None) -> int:
    """``--dry-run``: one ``status<TAB>input`` line per input on stdout, totals on stderr;
    returns the exit code (0)."""
    from collections import Counter

    counts: Counter = Counter()
    for status, item in plan:
        counts[status] += 1
        print(f"{status}\t{item.path}", flush=False)
    parts = [f"{counts[s]} {name}" for s, name in (("new", "new"), ("done", "done before"),
                                                    ("failed", "failed before (retried)")) if counts[s]]
    console = console or stderr
    console.print(f"dry run: {sum(counts.values())} inputs" + (f" ({', '.join(parts)})" if parts else ""),
                  highlight=False)
    if walk.skipped_text():
        console.print(f"skipped files that are not images: {walk.skipped_text()}", highlight=False)
    if walk.excluded_text():
        console.print(f"warning: {escape(walk.excluded_text())}", highlight=False)
    return 0


def print_segment_summary(summary: SegmentSummary, console: Console = stderr) -> None:
    """Counts, throughput, class frequencies and the first failures."""
    rate = summary.images_ok / summary.seconds if summary.seconds > 0 else 0.0
    head = Table(title="ovss segment", show_header=False)
    head.add_row("images", f"{summary.images_ok} ok, {summary.images_failed} failed"
                 + (f", {summary.images_reused} done before (skipped)" if summary.images_reused else ""))
    if summary.excluded:
        head.add_row("warning", summary.excluded)
    if summary.skipped:
        head.add_row("skipped", f"files that are not images: {summary.skipped}")
    if summary.warnings:  # per image in manifest.jsonl
        head.add_row("notes", "; ".join(f"{note} ({n} image{'s' if n > 1 else ''})"
                                        for note, n in summary.warnings.most_common()))
    head.add_row("time", f"{summary.seconds:.1f} s ({rate:.2f} images/s)")
    merged = summary.vocabulary.merged_distractors
    if merged:
        head.add_row("merged", "; ".join(f"{', '.join(names)} -> {cls}" for cls, names in merged.items()))
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
            name = summary.vocabulary.names[c] if c < len(summary.vocabulary) else "other"
            table.add_row(name, str(n), f"{100 * mean:.1f}%")
        console.print(table)
    if summary.failures:
        table = Table(title=f"failures ({summary.images_failed})")
        table.add_column("input")
        table.add_column("reason")
        for path, reason in summary.failures[:20]:
            table.add_row(path, reason)
        console.print(table)


def _pct(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN -> "-"


def print_evaluation(result, per_class: bool = False, paths: dict | None = None, console: Console | None = None) -> None:
    """The evaluation table (and per-class table) on stdout."""
    console = console or Console()
    seg = result.segmenter
    partial = f" (partial: {result.failed} failed)" if result.failed else ""
    table = Table(title=f"ovss evaluate: {result.dataset}{partial}")
    for col in ("dataset", "method", "model", "images"):
        table.add_column(col)
    if result.metrics is not None:
        for col in ("mIoU", "fwIoU", "mACC", "pACC"):
            table.add_column(col, justify="right")
    else:
        for col in ("sem. similarity", "rescaled"):
            table.add_column(col, justify="right")
    table.add_column("images/s", justify="right")
    row = [result.dataset, seg.get("method", ""), seg.get("model", ""),
           f"{result.images}" + (f" ({result.failed} failed)" if result.failed else "")]
    if result.metrics is not None:
        m = result.metrics
        row += [_pct(m.miou), _pct(m.fwiou), _pct(m.macc), _pct(m.pacc)]
    elif result.similarity is not None:
        row += [f"{result.similarity.mean:.4f}", f"{result.similarity.rescaled:.4f}"]
    else:
        row += ["-", "-"]
    row.append(f"{result.images_per_second:.2f}")
    table.add_row(*row)
    console.print(table)
    if per_class and result.metrics is not None:
        pc = Table(title="per class")
        for col, justify in (("class", "left"), ("IoU", "right"), ("ACC", "right")):
            pc.add_column(col, justify=justify)
        for name, iou, acc in zip(result.class_names, result.metrics.per_class_iou, result.metrics.per_class_acc):
            pc.add_row(name, _pct(float(iou)), _pct(float(acc)))
        console.print(pc)
    if per_class and result.similarity is not None:
        from .evaluate import word_class_rows

        wt = Table(title="predicted word -> ground-truth classes (pixels)")
        wt.add_column("word")
        wt.add_column("pixels", justify="right")
        wt.add_column("top classes")
        for r in word_class_rows(result.similarity.table, result.words, result.class_names):
            wt.add_row(r["word"], str(r["pixels"]), ", ".join(f"{c['class']} ({c['pixels']})" for c in r["classes"]))
        console.print(wt)
    if result.failed:
        console.print(f"[bold yellow]partial:[/bold yellow] {result.failed} of {result.images + result.failed} "
                      "images failed and are not in the metrics (listed in metrics.json)", highlight=False)
    for path, reason in result.failures[:20]:
        console.print(f"[red]failed[/red] {escape(path)}: {escape(reason)}", highlight=False)
    for path, note in result.warnings[:20]:
        console.print(f"[yellow]warning[/yellow] {escape(path)}: {escape(note)}", highlight=False)
    if len(result.warnings) > 20:
        console.print(f"... and {len(result.warnings) - 20} more warnings (listed in metrics.json)", highlight=False)
    for name, path in (paths or {}).items():
        console.print(f"{name}: {path}", highlight=False)


def print_datasets(rows: list[dict], root, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"datasets (root: {root})")
    for col in ("name", "classes", "found", "images", "path"):
        table.add_column(col, no_wrap=col != "path", overflow="fold")
    for r in rows:
        table.add_row(r["name"], str(r["classes"]), "yes" if r["found"] else "no",
                      "-" if r["images"] is None else str(r["images"]), str(r["path"]))
    console.print(table)


def print_zoo(rows: list[dict], cache, console: Console | None = None) -> None:
    console = console or Console()
    show_url = console.width >= 140  # URLs only where they fit on one line
    table = Table(title=f"ovss model zoo (cache: {cache})")
    for col in ("name", "kind", "size", "cached") + (("url",) if show_url else ()):
        table.add_column(col, no_wrap=True)
    for row in rows:
        cells = [row["name"], row["kind"], row["size"], "yes" if row["cached"] else "no"]
        table.add_row(*cells, *([row["url"]] if show_url else []))
    console.print(table)


def print_comparison(summary: dict, out_dir, console: Console | None = None) -> None:
    """`ovss compare`'s tables on stdout: one row per entry, the gains and losses between the
    first two, and (several entries) how often they label a pixel alike. A terminal too narrow
    for the entries' table (e.g. 80 columns) gets it as two: what each entry is and scores,
    then its speed and size; long names wrap instead of being cut."""
    from .compare.report import metric_columns, metric_value

    console = console or Console()
    entries = summary["entries"]

    def num(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    kinds = sorted({e["memory"] for e in entries})
    described = [("entry", lambda e: e["label"]), ("method", lambda e: e["method"]),
                 ("model", lambda e: str(e.get("model") or ""))]
    scores = [(title, lambda e, key=key: num(metric_value(e, key), 4 if key.startswith("similarity") else 2))
              for title, key in metric_columns(summary)]
    costs = [("images/s", lambda e: num(e["images_per_second"])), ("s/image", lambda e: num(e["seconds_per_image"], 3)),
             ("p95 s", lambda e: num(e["seconds_per_image_p95"], 3)),
             (f"peak MiB ({', '.join(kinds)})", lambda e: f"{e['peak_memory_mib']:.0f}"),
             ("params (M)", lambda e: f"{e['parameters'] / 1e6:.1f}"), ("failed", lambda e: str(e["failed"]))]

    def table(title: str, columns) -> Table:
        out = Table(title=title)
        rows = [[cell(e) for _, cell in columns] for e in entries]
        for i, (name, _) in enumerate(columns):
            numeric = (name, _) not in described
            # names and titles wrap; a number is never cut (its column is at least as wide)
            out.add_column(name, justify="right" if numeric else "left", overflow="fold",
                           min_width=max(len(r[i]) for r in rows) if numeric and rows else None)
        for row in rows:
            out.add_row(*row)
        return out

    title = f"ovss compare: {summary.get('subject', '')} ({summary['images']} images)"
    whole = table(title, described + scores + costs)
    if console.measure(whole, options=console.options.update_width(10_000)).maximum <= console.width:
        console.print(whole)
    else:
        console.print(table(title, described + scores))
        console.print(table("speed and size", described[:1] + costs))
    changes = summary.get("gains_and_losses")
    if changes and (changes["gains"] or changes["losses"]):
        diff = Table(title=f"IoU: {changes['second']} against {changes['first']}")
        for col, justify in (("class", "left"), ("change", "right"), (changes["first"], "right"),
                             (changes["second"], "right")):
            diff.add_column(col, justify=justify, overflow="fold")
        for c in changes["gains"] + changes["losses"]:
            colour = "green" if c["change"] > 0 else "red"
            diff.add_row(c["class"], f"[{colour}]{c['change']:+.2f}[/{colour}]", num(c["first"]), num(c["second"]))
        console.print(diff)
    agree = summary["agreement"]
    if len(agree["labels"]) > 1:
        same = Table(title="pixels labelled alike (%)")
        same.add_column("", overflow="fold")
        for label in agree["labels"]:
            same.add_column(label, justify="right", overflow="fold")
        for label, line in zip(agree["labels"], agree["fraction"]):
            same.add_row(label, *[num(None if v is None else 100 * v, 1) for v in line])
        console.print(same)
    console.print(f"report: {out_dir}/report.html", highlight=False)
