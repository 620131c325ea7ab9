"""The ``ovss`` command line: parse options, call a library function, map errors to exit codes.

Errors the user can cause (:class:`~ovss_cli.errors.OvssError`) print one line on stderr
without a traceback; ``--debug`` (or ``OVSS_DEBUG=1``) shows it.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional, get_type_hints

import typer

from .errors import EXIT_SOME_FAILED, OvssError, OvssWarning
from .io.atomic import check_output_folder, ensure_output_folder

app = typer.Typer(
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Open-vocabulary semantic segmentation: label every pixel with classes named in free text.",
)
_state = {"debug": False}


def _debug_from_env() -> bool:
    return os.environ.get("OVSS_DEBUG", "") not in ("", "0")


def _fail(message: str, code: int) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so a run stops as cleanly as on Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings as one ``warning:`` line, under torchrun from rank 0 only (they concern the
    settings and the vocabulary, which every rank shares); others as Python prints them."""
    if issubclass(category, OvssWarning):
        from .runs.distributed import launched_by_torchrun

        if not launched_by_torchrun() or os.environ.get("RANK", "0") == "0":
            print(f"warning: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _run(fn: Callable[[], int]) -> None:
    """Run a command body; OvssError -> one line + its exit code; Ctrl-C -> 130, SIGTERM -> 143
    (completed work is kept and nothing is left half-written: writes are atomic)."""
    warnings.showwarning = _show_warning
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        code = fn()
    except OvssError as err:
        if _state["debug"]:
            traceback.print_exc()
        _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Terminated:
        _fail("terminated", 143)
    else:
        raise typer.Exit(code)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        warnings.showwarning = _python_showwarning


def _print_version(value: bool) -> None:
    if value:
        from .about import version_report

        typer.echo(version_report())
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version,
        help="Print the versions of ovss, Python, torch (and CUDA), open_clip, segment_anything, ... and exit.",
    ),
) -> None:
    _state["debug"] = debug or _debug_from_env()


# --- options shared by every command that builds a segmenter ------------------------------

_MODEL_OPTIONS: list[tuple[str, Any, Any]] = [
    ("method", str, typer.Option("san", "--method", "-m", help="san | sam")),
    ("model", Optional[str], typer.Option(None, "--model", help="Zoo model (see `ovss models`): san-vit-b16 / san-vit-l14 for san, an Alpha-CLIP entry for sam.")),
    ("weights", Optional[Path], typer.Option(None, "--weights", help="Local checkpoint instead of the zoo download (SAN, or the Alpha-CLIP visual checkpoint for sam).")),
    ("clip_config", Optional[Path], typer.Option(None, "--clip-config", help="open_clip model config JSON for a checkpoint on a non-standard CLIP.")),
    ("device", str, typer.Option("auto", "--device", help="auto | cpu | cuda")),
    ("precision", str, typer.Option("auto", "--precision", help="auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16 | fp16")),
    ("templates", Optional[str], typer.Option(None, "--templates", help="Prompt templates: vild, photo, or a file with one template per line.")),
    ("resize_short", Optional[int], typer.Option(None, "--resize-short", help="[san] Short side the image is resized to (default 640; 0 keeps the input size).")),
    ("sam_model", Optional[str], typer.Option(None, "--sam-model", help="[sam] SAM zoo model: sam-vit-b (default), sam-vit-l, sam-vit-h.")),
    ("sam_weights", Optional[Path], typer.Option(None, "--sam-weights", help="[sam] Local SAM checkpoint.")),
    ("clip_weights", Optional[Path], typer.Option(None, "--clip-weights", help="[sam] Local CLIP checkpoint (OpenAI/open_clip format) Alpha-CLIP builds on.")),
    ("points_per_side", Optional[int], typer.Option(None, "--points-per-side", help="[sam] Point grid per side (default 20).")),
    ("points_per_batch", Optional[int], typer.Option(None, "--points-per-batch", help="[sam] Points decoded at once (default 64).")),
    ("pred_iou_thresh", Optional[float], typer.Option(None, "--pred-iou-thresh", help="[sam] Predicted-IoU threshold (default 0.86).")),
    ("stability_score_thresh", Optional[float], typer.Option(None, "--stability-score-thresh", help="[sam] Stability threshold (default 0.92).")),
    ("crop_n_layers", Optional[int], typer.Option(None, "--crop-n-layers", help="[sam] Crop layers (default 0).")),
    ("min_mask_region_area", Optional[int], typer.Option(None, "--min-mask-region-area", help="[sam] Minimum region area (default 100).")),
    ("amg", Optional[str], typer.Option(None, "--amg", help="[sam] Automatic mask generator: ovss (default: segment_anything's masks, computed faster in bounded memory) | stock (segment_anything's own).")),
    ("region", Optional[str], typer.Option(None, "--region", help="[sam] What Alpha-CLIP sees per mask: none | blur | black | crop (default) | ellipse.")),
    ("no_alpha", bool, typer.Option(False, "--no-alpha", help="[sam] Feed an all-ones alpha (plain-CLIP ablation).")),
    ("no_filter", bool, typer.Option(False, "--no-filter", help="[sam] Keep masks whose box lies inside a larger mask's box.")),
    ("fill", Optional[str], typer.Option(None, "--fill", help="[sam] Uncovered pixels: none (unlabelled, default) | nearest (nearest mask's class).")),
    ("mask_batch_size", Optional[int], typer.Option(None, "--mask-batch-size", help="[sam] Masks per Alpha-CLIP forward (default 8 on CPU, 64 on CUDA).")),
    ("min_score", Optional[float], typer.Option(None, "--min-score", help="[sam] A mask whose best class probability is below this is 'other' (default 0.2; 0 turns it off).")),
    ("tta", bool, typer.Option(False, "--tta", help="[san] Test-time augmentation: short sides 320..1120, each also flipped, scores averaged.")),
]


def with_model_options(func: Callable) -> Callable:
    """Give a command the shared model options; its body receives them as ``model_options``."""
    signature = inspect.signature(func)
    hints = get_type_hints(func)
    own = [p for p in signature.parameters.values() if p.name != "model_options"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, kind, option in _MODEL_OPTIONS]

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        shared = {name: kwargs.pop(name) for name, _, _ in _MODEL_OPTIONS}
        return func(**kwargs, model_options=shared)

    command.__signature__ = signature.replace(parameters=own + extra)  # type: ignore[attr-defined]
    command.__annotations__ = {**{k: v for k, v in hints.items() if k != "model_options"},
                               **{name: kind for name, kind, _ in _MODEL_OPTIONS}}
    return command


def segmenter_arguments(options: dict[str, Any], quiet: bool) -> tuple[str, dict[str, Any]]:
    """The method and ``load_segmenter`` keywords from the shared options; method-specific ones
    are passed only when set, and the method's factory rejects those that do not apply to it."""
    o = dict(options)
    method_options = {
        "precision": o["precision"], "templates": o["templates"], "progress": not quiet,
        "sam_model": o["sam_model"], "points_per_side": o["points_per_side"],
        "points_per_batch": o["points_per_batch"], "pred_iou_thresh": o["pred_iou_thresh"],
        "stability_score_thresh": o["stability_score_thresh"], "crop_n_layers": o["crop_n_layers"],
        "min_mask_region_area": o["min_mask_region_area"], "amg": o["amg"], "region": o["region"], "fill": o["fill"],
        "mask_batch_size": o["mask_batch_size"], "min_score": o["min_score"],
        "tta": True if o["tta"] else None,
        "sam_weights": str(o["sam_weights"]) if o["sam_weights"] else None,
        "clip_weights": str(o["clip_weights"]) if o["clip_weights"] else None,
        "no_alpha": True if o["no_alpha"] else None,
        "containment_filter": False if o["no_filter"] else None,
        "resize_short": o["resize_short"],
    }
    method_options = {k: v for k, v in method_options.items() if v is not None}
    if "resize_short" in method_options:
        method_options["resize_short"] = method_options["resize_short"] or None  # 0 keeps the input size
    return o["method"], dict(
        model=o["model"],
        weights=str(o["weights"]) if o["weights"] else None,
        clip_config=str(o["clip_config"]) if o["clip_config"] else None,
        device=o["device"],
        **method_options,
    )


def build_segmenter(options: dict[str, Any], quiet: bool):
    """A segmenter from the shared options (see :func:`segmenter_arguments`)."""
    from .segmenter import load_segmenter

    method, kwargs = segmenter_arguments(options, quiet)
    return load_segmenter(method, **kwargs)


def start_distributed(options: dict[str, Any]):
    """Under torchrun, join the process group; ``--device`` becomes the rank's own device."""
    from .runs.distributed import start

    dist = start(options["device"])
    options["device"] = dist.device(options["device"])
    return dist


# --- commands --------------------------------------------------------------------------------


@app.command()
@with_model_options
def segment(
    paths: List[str] = typer.Argument(..., help="Image files, folders (walked recursively), or - to read paths from stdin."),
    classes: Optional[str] = typer.Option(None, "--classes", "-c", help='Comma-separated class names, e.g. "cat,sofa,window".'),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", help="One class per line; 'name: synonym, synonym' for several names."),
    out: Path = typer.Option(Path("ovss_out"), "--out", "-o", help="Output folder."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="Images per forward pass."),
    formats: str = typer.Option("png,overlay,coco,jsonl", "--format", help="Any of png,overlay,coco,jsonl."),
    distractors: str = typer.Option("coco-all", "--distractors", help="Names that compete with your classes; what they win is 'other': coco-all | coco-stuff | none | FILE."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every image (default: skip those whose outputs are complete from an earlier run with the same settings)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Process shard i of n (0-based, e.g. 0/4): a deterministic share of the inputs; join shards with `ovss merge`."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Threads reading images ahead (0: read and write in the main thread; default from the CPU count)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be processed (new, done, failed before) and what is skipped, without loading a model."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary; errors are still printed."),
    model_options: dict = None,  # type: ignore[assignment]
) -> None:
    """Segment images with a vocabulary; writes label PNGs, overlays, COCO JSON and a JSONL manifest.

    Re-running the same command resumes: images whose outputs are complete are skipped. Under
    torchrun (`torchrun --nproc-per-node K -m ovss_cli segment ...`) each process takes its share.
    """

    def body() -> int:
        from .io.images import InputWalk
        from .reporting import image_progress, print_plan, print_segment_summary
        from .distractors import distractor_names
        from .runs.shards import parse_shard
        from .runs.state import RunLock, check_identity
        from .segment import parse_formats, plan_run, run_identity, segment_images
        from .segmenter import segmenter_identity
        from .vocabulary import load_vocabulary

        # Cheap checks first: a typo should not cost a model download.
        vocabulary = load_vocabulary(classes, classes_file).with_distractors(distractor_names(distractors))
        fmt = parse_formats(formats)
        share = parse_shard(shard)
        walk = InputWalk(paths, exclude=[out])
        method, kwargs = segmenter_arguments(model_options, quiet)
        identity = run_identity(segmenter_identity(method, **kwargs), vocabulary, fmt)
        if dry_run:
            return print_plan(plan_run(walk, out, identity, overwrite=overwrite, share=share), walk)
        # a listing-only walk (nothing decoded) gives the progress bar its total and ETA, and
        # finds an input without images before a model is loaded
        total = None if "-" in paths else sum(1 for pos, _ in enumerate(walk) if share.takes(pos))
        if total == 0 and next(iter(walk), None) is None:
            raise walk.nothing_found()
        # a read-only or mistyped --out, or one another run is writing, fails before a model
        # loads (nothing is created yet: stdin may still turn out to hold no image)
        check_output_folder(out)
        dist = start_distributed(model_options)
        try:
            if dist.is_main:  # rank 0 takes the lock for all ranks
                RunLock(out).check_free()
                if not overwrite:  # outputs of other settings: refused before a model loads
                    check_identity(out, identity)
            segmenter = build_segmenter(model_options, quiet or not dist.is_main)
            with image_progress(total, enabled=not quiet and dist.is_main,
                                counter=dist.add_progress if dist.enabled else None) as advance:
                summary = segment_images(segmenter, walk, vocabulary, out, formats=fmt, batch_size=batch_size,
                                         workers=workers, overwrite=overwrite, share=share, dist=dist,
                                         on_result=advance)
        finally:
            dist.stop()
        if not dist.is_main:  # rank 0 reports every rank's failures and sets the exit code; an
            return 0          # early non-zero exit here would make torchrun stop rank 0 mid-write
        if not quiet:
            print_segment_summary(summary)
        else:
            if summary.excluded:
                print(f"warning: {summary.excluded}", file=sys.stderr)
            for path, reason in summary.failures:
                print(f"failed: {path}: {reason}", file=sys.stderr)
        return dist.exit_code(EXIT_SOME_FAILED if summary.images_failed else 0)

    _run(body)


@app.command()
@with_model_options
def evaluate(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="ade150 | ade847 | pc59 | pc459 | voc20 | voc21 | cocostuff171 (see `ovss datasets`)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root (default $DETECTRON2_DATASETS, else ./datasets)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Generic layout: folder of images."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Generic layout: folder of label PNGs/TIFFs (same relative names)."),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", help="Generic layout: class names, one per line, label i = line i."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N images."),
    subset: Optional[float] = typer.Option(None, "--subset", help="Evaluate an evenly spread fraction of the images, e.g. 0.1."),
    vocabulary_file: Optional[Path] = typer.Option(None, "--vocabulary-file", help="Segment with this vocabulary instead of the dataset's classes (scored by semantic similarity)."),
    per_image_vocabulary: Optional[Path] = typer.Option(None, "--per-image-vocabulary", help="JSON mapping image -> class names (scored by semantic similarity)."),
    synonyms: str = typer.Option("whole", "--synonyms", help="whole: a comma-separated class name is one prompt (as the official evaluation); split: its names are synonyms."),
    distractors: str = typer.Option("none", "--distractors", help="Extra competing names (coco-all | coco-stuff | none | FILE); pixels they win count as misses."),
    per_class: bool = typer.Option(False, "--per-class", help="Print per-class IoU and accuracy."),
    save_predictions: bool = typer.Option(False, "--save-predictions", help="Write each prediction as a label PNG under OUT/predictions."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first sample that fails (default: leave it out, report it, mark the metrics partial)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Evaluate shard i of n (0-based, e.g. 0/4); `ovss merge` sums the shards' folders into the whole dataset's metrics."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Threads reading samples ahead (0: read in the main thread; default from the CPU count)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder for metrics.json (default ovss_eval/<dataset>)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables."),
    model_options: dict = None,  # type: ignore[assignment]
) -> None:
    """Evaluate on a benchmark (mIoU, fwIoU, mACC, pACC as detectron2), or with open vocabularies.

    Under torchrun each process evaluates its share and the counts are summed over processes.
    """

    def body() -> int:
        from .datasets import dataset_root, generic_dataset, open_dataset, read_class_names, select_indices
        from .runs.shards import parse_shard
        from .distractors import distractor_names
        from .errors import UsageError
        from .evaluate import evaluate_dataset, load_per_image_vocabulary, write_evaluation
        from .reporting import image_progress, print_evaluation
        from .vocabulary import read_class_file

        if (dataset is None) == (images is None):
            raise UsageError("give --dataset NAME, or --images DIR --labels DIR --classes-file F")
        if dataset is not None:
            data = open_dataset(dataset, dataset_root(str(data_root) if data_root else None))
        else:
            if labels is None or classes_file is None:
                raise UsageError("--images needs --labels DIR and --classes-file F")
            data = generic_dataset(images, labels, read_class_names(classes_file))
        vocab = read_class_file(vocabulary_file) if vocabulary_file else None
        per_image = load_per_image_vocabulary(per_image_vocabulary) if per_image_vocabulary else None
        out_dir = out or Path("ovss_eval") / data.name
        share = parse_shard(shard)
        ensure_output_folder(out_dir)
        if save_predictions:
            ensure_output_folder(out_dir / "predictions")
        dist = start_distributed(model_options)
        try:
            show = not (quiet or as_json) and dist.is_main
            segmenter = build_segmenter(model_options, not show)
            total = sum(1 for pos in range(len(select_indices(len(data), limit=limit, subset=subset)))
                        if share.takes(pos))
            with image_progress(total, enabled=show, label=f"evaluating {data.name}",
                                counter=dist.add_progress if dist.enabled else None) as advance:
                result = evaluate_dataset(
                    segmenter, data, vocabulary=vocab, per_image_vocabulary=per_image, synonyms=synonyms,
                    distractors=distractor_names(distractors), limit=limit, subset=subset, on_result=advance,
                    predictions_dir=out_dir / "predictions" if save_predictions else None, strict=strict,
                    share=share, dist=dist, workers=workers,
                )
        finally:
            dist.stop()
        if not dist.is_main:  # rank 0 writes and prints the whole evaluation, and sets the exit
            return 0          # code (a non-zero exit here would make torchrun stop rank 0 mid-write)
        paths = write_evaluation(result, out_dir)
        if as_json:
            print(json.dumps(result.to_dict(), indent=2))
        elif not quiet:
            print_evaluation(result, per_class=per_class, paths=paths)
        return dist.exit_code(EXIT_SOME_FAILED if result.failed else 0)

    _run(body)


@app.command()
def merge(
    folders: List[Path] = typer.Argument(..., help="The shards' output folders (all from `segment`, or all from `evaluate`)."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary."),
) -> None:
    """Join the folders written by `--shard i/n` runs into the folder one run would have written."""

    def body() -> int:
        from .runs.merge import merge_folders

        result = merge_folders(folders, out)
        if not quiet:
            print(f"merged {result.sources} {result.kind} folders: {result.images} images"
                  f" ({result.failed} failed) -> {out}", file=sys.stderr)
        return EXIT_SOME_FAILED if result.failed else 0

    _run(body)


@app.command()
def datasets(
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root (default $DETECTRON2_DATASETS, else ./datasets)."),
) -> None:
    """List the benchmark datasets and whether each is found under the dataset root."""

    def body() -> int:
        from .datasets import dataset_root, list_datasets
        from .reporting import print_datasets

        root = dataset_root(str(data_root) if data_root else None)
        print_datasets(list_datasets(root), root)
        return 0

    _run(body)


models_app = typer.Typer(
    invoke_without_command=True,
    help="List the model zoo and what is cached; `ovss models download` fetches checkpoints ahead of time.",
)
app.add_typer(models_app, name="models")


@models_app.callback()
def models(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the zoo as JSON (name, kind, size, cached path or null, source)."),
) -> None:
    """List the model zoo and which checkpoints are already cached."""
    if ctx.invoked_subcommand is not None:
        return

    def body() -> int:
        from .weights import cache_description, zoo_json, zoo_rows

        if as_json:
            print(json.dumps(zoo_json(), indent=2))
        else:
            from .reporting import print_zoo

            print_zoo(zoo_rows(), cache_description())
        return 0

    _run(body)


def _complete_model_name(incomplete: str) -> list[str]:
    from .zoo import ZOO

    return [name for name in ZOO if name.startswith(incomplete)]


@models_app.command("download")
def models_download(
    names: Optional[List[str]] = typer.Argument(None, autocompletion=_complete_model_name, help="Zoo models to fetch (see `ovss models`); an Alpha-CLIP model brings its CLIP."),
    all_models: bool = typer.Option(False, "--all", help="Every model in the zoo (of --method's kinds, if given)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="san | sam: alone, the checkpoints that method uses by default."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Do not re-hash checkpoints that are already cached."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; one line per model."),
) -> None:
    """Download and verify checkpoints now (e.g. on a login node), for runs with OVSS_OFFLINE=1 later."""

    def body() -> int:
        from .errors import WeightsError
        from .weights import prefetch
        from .zoo import select_entries

        chosen = select_entries(names or [], all_entries=all_models, method=method)
        failed: list[str] = []
        for entry in chosen:
            try:
                done = prefetch(entry, progress=not quiet, verify=not no_verify)
            except WeightsError as error:
                failed.append(entry.name)
                typer.echo(f"failed: {entry.name}: {error}", err=True)
                continue
            pinned = entry.sha256 is not None and done.path.name == entry.filename
            check = "sha256 ok" if done.verified else "not re-hashed" if pinned else "no checksum pinned"
            typer.echo(f"{entry.name}: {done.action} ({check}) {done.path}")
        if failed:
            raise WeightsError(f"{len(failed)} of {len(chosen)} checkpoints could not be fetched: {', '.join(failed)}")
        return 0

    _run(body)


@app.command("train-san")
def train_san(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="A benchmark's training split (cocostuff171, ade150, ade847, pc59, pc459, voc20)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root (default $DETECTRON2_DATASETS, else ./datasets)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Generic layout: folder of training images (with --labels and --classes-file)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Generic layout: folder of label PNGs/TIFFs (255 = ignore)."),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", help="Generic layout: class names, one per line, label i = line i."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: model_final.pth, checkpoints/, log.jsonl, loss.png."),
    model: Optional[str] = typer.Option(None, "--model", help="san-vit-b16 (default) or san-vit-l14: the architecture (and the OpenAI CLIP it starts from)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this SAN checkpoint (fine-tuning) instead of CLIP with a fresh side adapter."),
    clip_weights: Optional[Path] = typer.Option(None, "--clip-weights", help="The CLIP to start from (OpenAI or open_clip format; default: the zoo's OpenAI CLIP)."),
    clip_config: Optional[Path] = typer.Option(None, "--clip-config", help="open_clip model config JSON for a non-standard CLIP (with --clip-weights, or an official-format --init)."),
    iters: int = typer.Option(60000, "--iters", help="Training iterations."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Global batch (split across torchrun processes)."),
    lr: float = typer.Option(1e-4, "--lr", help="Base learning rate (AdamW, poly decay)."),
    crop_size: int = typer.Option(640, "--crop-size", help="Training crop; the random short sides scale with it (0.5x..1.5x)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N iterations (and at the end) on the evaluation set."),
    eval_dataset: Optional[str] = typer.Option(None, "--eval-dataset", help="A benchmark (validation split) to evaluate on."),
    eval_images: Optional[Path] = typer.Option(None, "--eval-images", help="Generic layout: evaluation images (with --eval-labels)."),
    eval_labels: Optional[Path] = typer.Option(None, "--eval-labels", help="Generic layout: evaluation labels."),
    eval_classes_file: Optional[Path] = typer.Option(None, "--eval-classes-file", help="Class names of --eval-labels (default: the training classes)."),
    checkpoint_every: int = typer.Option(5000, "--checkpoint-every", help="Write OUT/checkpoints/model_NNNNNNN.pth every N iterations."),
    log_every: int = typer.Option(20, "--log-every", help="Log (and display) the mean losses every N iterations."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order, augmentation, point sampling and fresh weights."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes per rank (default: 4 on CUDA, 0 on CPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint, exactly."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (under torchrun: the rank's own GPU)."),
    precision: str = typer.Option("auto", "--precision", help="auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16 | fp16 (with a gradient scaler)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display; errors are still printed."),
) -> None:
    """Train or fine-tune SAN with the paper's recipe; `torchrun ... -m ovss_cli train-san` for many GPUs."""

    def body() -> int:
        from .datasets import dataset_root, generic_dataset, open_dataset, read_class_names
        from .errors import UsageError
        from .runs.distributed import start
        from .train import TrainOptions, train_san as run_training

        if (dataset is None) == (images is None):
            raise UsageError("give --dataset NAME, or --images DIR --labels DIR --classes-file F")
        root = dataset_root(str(data_root) if data_root else None)
        if dataset is not None:
            train_data = open_dataset(dataset, root, split="train")
        else:
            if labels is None or classes_file is None:
                raise UsageError("--images needs --labels DIR and --classes-file F")
            train_data = generic_dataset(images, labels, read_class_names(classes_file), name="train")
        if eval_dataset is not None and eval_images is not None:
            raise UsageError("give --eval-dataset NAME or --eval-images DIR --eval-labels DIR, not both")
        eval_data = None
        if eval_dataset is not None:
            eval_data = open_dataset(eval_dataset, root)
        elif eval_images is not None:
            if eval_labels is None:
                raise UsageError("--eval-images needs --eval-labels DIR")
            names = read_class_names(eval_classes_file) if eval_classes_file else train_data.class_names
            eval_data = generic_dataset(eval_images, eval_labels, names, name="eval")
        if eval_every and eval_data is None:
            raise UsageError("--eval-every needs an evaluation set: --eval-dataset NAME or --eval-images/--eval-labels")
        check_output_folder(out)
        dist = start(device)
        try:
            result = run_training(TrainOptions(
                out=out, model=model, init=init, clip_weights=clip_weights, clip_config=clip_config, iters=iters,
                batch_size=batch_size, lr=lr, crop_size=crop_size, seed=seed, checkpoint_every=checkpoint_every,
                eval_every=eval_every, log_every=log_every, workers=workers, resume=resume, device=device,
                precision=precision, quiet=quiet), train_data, eval_data, dist)
        finally:
            dist.stop()
        if dist.is_main and not quiet:
            last = result.evaluations[-1] if result.evaluations else None
            score = f", {last['dataset']} mIoU {last['miou']:.2f}" if last and "miou" in last else ""
            print(f"trained {result.iterations - result.start_iteration} iterations in {result.seconds:.0f} s"
                  f"{score}: {result.final}", file=sys.stderr)
        return 0

    _run(body)


@app.command()
@with_model_options
def compare(
    paths: Optional[List[str]] = typer.Argument(None, help="Image files or folders to compare on (no ground truth; give --classes)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="A benchmark to compare on (see `ovss datasets`)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root (default $DETECTRON2_DATASETS, else ./datasets)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Generic layout: folder of images (with --labels and --classes-file)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Generic layout: folder of label PNGs/TIFFs."),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", help="With --images: the label names, one per line; with PATHs: the vocabulary file."),
    classes: Optional[str] = typer.Option(None, "--classes", "-c", help='With PATHs: comma-separated class names, e.g. "cat,sofa".'),
    methods: Optional[str] = typer.Option(None, "--methods", help="Methods compared with their defaults (default san,sam when no --variant is given)."),
    variant: Optional[List[str]] = typer.Option(None, "--variant", help='An entry: "LABEL=METHOD:option=value,..." with load_segmenter keywords, e.g. "blur=sam:region=blur". Repeatable.'),
    limit: Optional[int] = typer.Option(None, "--limit", help="Compare on the first N images (of the dataset, or of the PATHs' images in walk order)."),
    subset: Optional[float] = typer.Option(None, "--subset", help="Compare on an evenly spread fraction of the images."),
    vocabulary_file: Optional[Path] = typer.Option(None, "--vocabulary-file", help="With a dataset: segment with this vocabulary instead (scored by semantic similarity)."),
    synonyms: str = typer.Option("whole", "--synonyms", help="Dataset class names: whole | split (as in evaluate)."),
    distractors: Optional[str] = typer.Option(None, "--distractors", help="coco-all | coco-stuff | none | FILE (default: none with a dataset, coco-all with PATHs, as evaluate and segment)."),
    sheets: Optional[int] = typer.Option(None, "--sheets", min=0, help="Contact sheets for the first N images only (default: every image)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Compare on shard i of n (0-based); `ovss merge` joins the shards' folders."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Run every entry again (default: reuse entries already complete with the same settings)."),
    out: Path = typer.Option(Path("ovss_compare"), "--out", "-o", help="Output folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or table."),
    model_options: dict = None,  # type: ignore[assignment]
) -> None:
    """Compare methods and variants on the same images: accuracy, speed, memory, pictures, one report."""

    def body() -> int:
        import shlex

        from .compare import Source, compare as run_compare, parse_entries
        from .datasets import dataset_root, generic_dataset, open_dataset, read_class_names
        from .distractors import distractor_names
        from .errors import UsageError
        from .reporting import image_progress, print_comparison
        from .runs.shards import parse_shard
        from .vocabulary import load_vocabulary, read_class_file

        given = [name for name, value in (("PATH", paths), ("--dataset", dataset), ("--images", images)) if value]
        if len(given) != 1:
            raise UsageError("compare on one of: --dataset NAME, --images DIR --labels DIR --classes-file F, "
                             'or PATH... --classes "a,b"')
        # every entry is checked before any model loads
        _, base = segmenter_arguments(model_options, True)
        entries = parse_entries(methods, variant or [], base)
        if paths:
            if "-" in paths:
                raise UsageError("compare reads each image once per entry: give files or folders, not - (stdin)")
            vocab = load_vocabulary(classes, classes_file).with_distractors(distractor_names(distractors or "coco-all"))
            source = Source(paths=list(paths), vocabulary=vocab, limit=limit, subset=subset)
        else:
            if dataset is not None:
                data = open_dataset(dataset, dataset_root(str(data_root) if data_root else None))
            else:
                if labels is None or classes_file is None:
                    raise UsageError("--images needs --labels DIR and --classes-file F")
                data = generic_dataset(images, labels, read_class_names(classes_file))
            source = Source(dataset=data, vocabulary=read_class_file(vocabulary_file) if vocabulary_file else None,
                            synonyms=synonyms, distractors=distractor_names(distractors or "none"), limit=limit,
                            subset=subset)
        share = parse_shard(shard)
        ensure_output_folder(out)
        show = not quiet
        summary = run_compare(entries, source, out, share=share, overwrite=overwrite, sheets=sheets,
                              command=shlex.join(["ovss", *sys.argv[1:]]), quiet=not show,
                              progress=lambda entry, total: image_progress(total, enabled=show, label=entry.label))
        if show:
            print_comparison(summary, out)
        return EXIT_SOME_FAILED if any(e["failed"] for e in summary["entries"]) else 0

    _run(body)


def main() -> None:
    app()
