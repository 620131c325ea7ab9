"""The ``ovss`` command line: parse options, call a library function, map errors to exit codes.

Errors the user can cause (:class:`~ovss_cli.errors.OvssError`) print one line on stderr
without a traceback; ``--debug`` (or ``OVSS_DEBUG=1``) shows it.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from .errors import EXIT_SOME_FAILED, NotImplementedYet, OvssError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Open-vocabulary semantic segmentation: label every pixel with classes named in free text.",
)
_state = {"debug": os.environ.get("OVSS_DEBUG", "") not in ("", "0")}


def _fail(message: str, code: int) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run(fn: Callable[[], int]) -> None:
    """Run a command body; OvssError -> one line + its exit code; Ctrl-C -> 130."""
    try:
        code = fn()
    except OvssError as err:
        if _state["debug"]:
            traceback.print_exc()
        _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    else:
        raise typer.Exit(code)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    if debug:
        _state["debug"] = True


def _method_options(**options: Any) -> dict[str, Any]:
    """Options the user actually set (None = not given) are passed to the method's factory,
    which rejects those that do not apply to it."""
    return {k: v for k, v in options.items() if v is not None}


@app.command()
def segment(
    paths: List[str] = typer.Argument(..., help="Image files, folders (walked recursively), or - to read paths from stdin."),
    classes: Optional[str] = typer.Option(None, "--classes", "-c", help='Comma-separated class names, e.g. "cat,sofa,window".'),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", help="One class per line; 'name: synonym, synonym' for several names."),
    method: str = typer.Option("san", "--method", "-m", help="san | sam"),
    model: Optional[str] = typer.Option(None, "--model", help="Zoo model name (see `ovss models`), e.g. san-vit-b16."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local checkpoint to use instead of the zoo download."),
    clip_config: Optional[Path] = typer.Option(None, "--clip-config", help="open_clip model config JSON for a checkpoint on a non-standard CLIP."),
    out: Path = typer.Option(Path("ovss_out"), "--out", "-o", help="Output folder."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    precision: str = typer.Option("auto", "--precision", help="auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16 | fp16"),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="Images per forward pass."),
    formats: str = typer.Option("png,overlay,coco,jsonl", "--format", help="Any of png,overlay,coco,jsonl."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary; errors are still printed."),
    resize_short: Optional[int] = typer.Option(None, "--resize-short", help="[san] Short side the image is resized to (default 640; 0 keeps the input size)."),
    templates: Optional[str] = typer.Option(None, "--templates", help="Prompt templates: vild, photo, or a file with one template per line."),
    sam_model: Optional[str] = typer.Option(None, "--sam-model", help="[sam] SAM zoo model: sam-vit-b (default), sam-vit-l, sam-vit-h."),
    sam_weights: Optional[Path] = typer.Option(None, "--sam-weights", help="[sam] Local SAM checkpoint."),
    clip_weights: Optional[Path] = typer.Option(None, "--clip-weights", help="[sam] Local CLIP checkpoint (OpenAI/open_clip format) Alpha-CLIP builds on."),
    points_per_side: Optional[int] = typer.Option(None, "--points-per-side", help="[sam] Point grid per side (default 20)."),
    points_per_batch: Optional[int] = typer.Option(None, "--points-per-batch", help="[sam] Points decoded at once (default 64)."),
    pred_iou_thresh: Optional[float] = typer.Option(None, "--pred-iou-thresh", help="[sam] Predicted-IoU threshold (default 0.86)."),
    stability_score_thresh: Optional[float] = typer.Option(None, "--stability-score-thresh", help="[sam] Stability threshold (default 0.92)."),
    crop_n_layers: Optional[int] = typer.Option(None, "--crop-n-layers", help="[sam] Crop layers (default 0)."),
    min_mask_region_area: Optional[int] = typer.Option(None, "--min-mask-region-area", help="[sam] Minimum region area (default 100)."),
    region: Optional[str] = typer.Option(None, "--region", help="[sam] What Alpha-CLIP sees per mask: none | blur | black | crop (default) | ellipse."),
    no_alpha: bool = typer.Option(False, "--no-alpha", help="[sam] Feed an all-ones alpha (plain-CLIP ablation)."),
    no_filter: bool = typer.Option(False, "--no-filter", help="[sam] Keep masks whose box lies inside a larger mask's box."),
    fill: Optional[str] = typer.Option(None, "--fill", help="[sam] Uncovered pixels: none (unlabelled, default) | nearest (nearest mask's class)."),
    mask_batch_size: Optional[int] = typer.Option(None, "--mask-batch-size", help="[sam] Masks per Alpha-CLIP forward (default 32)."),
) -> None:
    """Segment images with a vocabulary; writes label PNGs, overlays, COCO JSON and a JSONL manifest."""

    def body() -> int:
        from .io.images import iter_inputs
        from .reporting import image_progress, print_segment_summary
        from .segment import parse_formats, segment_images
        from .segmenter import load_segmenter
        from .vocabulary import load_vocabulary

        # Cheap checks first: a typo should not cost a model download.
        vocabulary = load_vocabulary(classes, classes_file)
        fmt = parse_formats(formats)
        total = None if "-" in paths else sum(1 for _ in iter_inputs(paths))
        options = _method_options(
            precision=precision, templates=templates, progress=not quiet,
            sam_model=sam_model, sam_weights=str(sam_weights) if sam_weights else None,
            clip_weights=str(clip_weights) if clip_weights else None, points_per_side=points_per_side,
            points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh, crop_n_layers=crop_n_layers,
            min_mask_region_area=min_mask_region_area, region=region, no_alpha=True if no_alpha else None,
            containment_filter=False if no_filter else None, fill=fill, mask_batch_size=mask_batch_size,
        )
        if resize_short is not None:
            options["resize_short"] = resize_short or None  # 0 keeps the input size
        segmenter = load_segmenter(
            method,
            model=model,
            weights=str(weights) if weights else None,
            clip_config=str(clip_config) if clip_config else None,
            device=device,
            **options,
        )
        with image_progress(total, enabled=not quiet) as advance:
            summary = segment_images(
                segmenter, iter_inputs(paths), vocabulary, out, formats=fmt, batch_size=batch_size, on_result=advance
            )
        if not quiet:
            print_segment_summary(summary)
        elif summary.failures:
            for path, reason in summary.failures:
                print(f"failed: {path}: {reason}", file=sys.stderr)
        return EXIT_SOME_FAILED if summary.images_failed else 0

    _run(body)


@app.command()
def models() -> None:
    """List the model zoo and which checkpoints are already cached."""

    def body() -> int:
        from rich.console import Console
        from rich.table import Table

        from .weights import cache_dir, zoo_rows

        console = Console()
        show_url = console.width >= 140  # URLs only where they fit on one line
        table = Table(title=f"ovss model zoo (cache: {cache_dir()})")
        for col in ("name", "kind", "size", "cached") + (("url",) if show_url else ()):
            table.add_column(col, no_wrap=True)
        for row in zoo_rows():
            cells = [row["name"], row["kind"], row["size"], "yes" if row["cached"] else "no"]
            table.add_row(*cells, *([row["url"]] if show_url else []))
        console.print(table)
        return 0

    _run(body)


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _not_implemented(command: str) -> Callable[[], int]:
    def body() -> int:
        raise NotImplementedYet(f"`ovss {command}` is not implemented yet")

    return body


@app.command(context_settings=_PASS_THROUGH)
def evaluate(ctx: typer.Context) -> None:
    """Evaluate on a benchmark dataset (not implemented yet)."""
    _run(_not_implemented("evaluate"))


@app.command("train-san", context_settings=_PASS_THROUGH)
def train_san(ctx: typer.Context) -> None:
    """Train SAN (not implemented yet)."""
    _run(_not_implemented("train-san"))


@app.command(context_settings=_PASS_THROUGH)
def compare(ctx: typer.Context) -> None:
    """Compare methods on the same images (not implemented yet)."""
    _run(_not_implemented("compare"))


def main() -> None:
    app()
