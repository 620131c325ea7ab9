"""``ovss train-san`` as a library function: SAN trained with the official recipe, on a CPU, a
GPU, or many processes under torchrun (DistributedDataParallel; NCCL on GPUs, gloo on CPUs).

Each iteration: the rank's part of the global batch (:mod:`.data`), CLIP normalisation, one
forward through every deep-supervision output, the set criterion (:mod:`.losses`), backward
(through a GradScaler with fp16), full-model gradient clipping, AdamW, poly learning rate. Only
rank 0 writes files and prints. Periodic checkpoints carry everything ``--resume`` needs to
continue exactly (:mod:`.state`); periodic evaluation runs the ``evaluate`` code path on a
:class:`~ovss_cli.models.san.segmenter.SanSegmenter` around the weights being trained.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..datasets import SemSegDataset
from ..errors import DatasetError, OvssError, UsageError
from ..io.atomic import atomic_write_text, ensure_output_folder
from ..models.san.config import CLIP_MEAN, CLIP_STD, SanConfig
from ..models.san.model import SanModel
from ..runs.distributed import Distributed
from ..runtime import autocast, resolve_device, resolve_precision
from .augment import AugmentConfig
from .data import TrainSamples, batches, cached_check, check_samples, fingerprint, mix_seed, problems_message
from .log import PLOT_NAME, TrainDisplay, TrainLog, plot_log, read_log
from .losses import CriterionConfig, LossNorms, SanCriterion, build_target, class_weight_total, points_for_crop
from .optim import OptimConfig, PolySchedule, build_optimizer, clip_gradients, set_trainable
from .state import (FINAL_NAME, capture_rng, check_same_run, checkpoint_path, latest_checkpoint,
                    read_train_checkpoint, restore_rng, save_checkpoint)

DATA_CHECK_NAME = "data_check.json"


class TrainingError(OvssError):
    """Training cannot go on (the loss diverged)."""

    exit_code = 1


@dataclass
class TrainOptions:
    """Everything ``ovss train-san`` takes besides the datasets."""

    out: Path
    model: str | None = None  # san-vit-b16 (default) | san-vit-l14
    init: Path | None = None  # a SAN checkpoint to fine-tune
    clip_weights: Path | None = None  # CLIP to start from (default: the zoo's OpenAI CLIP)
    clip_config: Path | Mapping[str, Any] | None = None
    iters: int = 60000
    batch_size: int = 32  # global batch, split across processes
    lr: float = 1e-4
    crop_size: int = 640
    seed: int = 0
    checkpoint_every: int = 5000
    eval_every: int = 0  # 0: evaluate at the end only (when an evaluation set is given)
    log_every: int = 20
    workers: int | None = None  # data-loading processes per rank (default: 4 on CUDA, 0 on CPU)
    resume: bool = False
    device: str = "auto"
    precision: str = "auto"
    quiet: bool = False
    live: bool | None = None  # rich live display (default: when stderr is a terminal)


@dataclass
class TrainResult:
    out: Path
    final: Path
    start_iteration: int
    iterations: int
    seconds: float
    source: str
    last_losses: dict[str, float] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)


class TrainNet(nn.Module):
    """SAN plus its classifier: what DistributedDataParallel wraps (the background embedding is
    trained through the classifier, so it is built inside the forward)."""

    def __init__(self, model: SanModel):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, class_embeddings: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        classifier = self.model.ov_classifier.classifier_weights(class_embeddings)
        return self.model(images, classifier, all_outputs=True)


def check_options(opts: TrainOptions, world: int) -> None:
    for name, value, least in (("--iters", opts.iters, 1), ("--batch-size", opts.batch_size, 1),
                               ("--checkpoint-every", opts.checkpoint_every, 1), ("--log-every", opts.log_every, 1),
                               ("--eval-every", opts.eval_every, 0)):
        if value < least:
            raise UsageError(f"{name} must be at least {least}, got {value}")
    if opts.batch_size % world:
        raise UsageError(f"--batch-size {opts.batch_size} (the global batch) must be a multiple of the number of "
                         f"processes ({world})")
    if opts.crop_size < 32 or opts.crop_size % 32:
        raise UsageError(f"--crop-size must be a multiple of 32 (SAN's size divisibility), got {opts.crop_size}")
    if not opts.lr > 0:
        raise UsageError(f"--lr must be positive, got {opts.lr}")


def check_dataset(dataset: SemSegDataset, out: Path, dist: Distributed, resumed: bool, workers: int = 4) -> str:
    """Every sample has a readable image and a label of the same size whose values are class
    indices or the ignore value; else a DatasetError before any training step. Returns the
    dataset's fingerprint. Each rank checks its share; a resumed run trusts an earlier pass."""
    if len(dataset) == 0:
        raise DatasetError(f"the training set {dataset.name} has no samples")
    key = fingerprint(dataset)
    cache = out / DATA_CHECK_NAME
    if resumed and cached_check(cache, key):
        return key
    mine = range(dist.rank, len(dataset), dist.world)
    problems = [p for part in dist.all_gather(check_samples(dataset, mine, workers)) for p in part]
    if problems:
        raise DatasetError(problems_message(problems, len(dataset)))
    if dist.is_main:
        atomic_write_text(cache, json.dumps({"passed": key, "samples": len(dataset)}) + "\n")
    return key


def run_identity(opts: TrainOptions, data_key: str, dataset: SemSegDataset, world_batch: int,
                 precision: str) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one for the result to be the same."""
    return {"dataset": data_key, "classes": dataset.num_classes, "batch_size": world_batch, "iters": opts.iters,
            "lr": opts.lr, "crop_size": opts.crop_size, "seed": opts.seed, "precision": precision}


def evaluate_model(model: SanModel, dataset: SemSegDataset, device: torch.device, precision: str,
                   resize_short: int, dist: Distributed) -> dict[str, Any]:
    """Evaluate the current weights through ``evaluate_dataset``. The segmenter gets a twin module
    sharing the weights' storage, so its inference settings (eval mode, no gradients, weight
    casts) leave the trained parameters alone."""
    from ..evaluate import evaluate_dataset
    from ..models.san.segmenter import SanSegmenter
    from ..weights import text_cache_dir

    with torch.device("meta"):
        twin = SanModel(model.config)
    twin.load_state_dict(model.state_dict(), assign=True)
    segmenter = SanSegmenter(twin, model_name="training", device=device, precision=precision,
                             resize_short=resize_short, text_cache=text_cache_dir())
    result = evaluate_dataset(segmenter, dataset, dist=dist)
    metrics = result.metrics
    out = {"dataset": dataset.name, "images": result.images, "failed": result.failed}
    if metrics is not None:
        out.update(miou=metrics.miou, fwiou=metrics.fwiou, macc=metrics.macc, pacc=metrics.pacc)
    return out


def _normalizer(device: torch.device) -> Callable[[Tensor], Tensor]:
    mean = torch.tensor([255.0 * m for m in CLIP_MEAN], device=device).view(1, 3, 1, 1)
    std = torch.tensor([255.0 * s for s in CLIP_STD], device=device).view(1, 3, 1, 1)
    return lambda images: (images.float() - mean) / std


def _resume_model(state: dict[str, Tensor], config: dict[str, Any]) -> SanModel:
    """The model of a periodic checkpoint (built from its stored config), for ``--resume``."""
    with torch.device("meta"):
        model = SanModel(SanConfig.from_dict(config))
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _global_mean(values: list[float], dist: Distributed) -> list[float]:
    if not dist.enabled:
        return values
    return list(dist.all_reduce_sum(np.asarray(values, dtype=np.float64)) / dist.world)


def train_san(opts: TrainOptions, dataset: SemSegDataset, eval_dataset: SemSegDataset | None = None,
              dist: Distributed | None = None) -> TrainResult:
    """Train (or fine-tune) SAN on ``dataset`` into ``opts.out``; see the module docstring."""
    from ..clip.templates import get_templates
    from ..clip.text import PromptEncoder
    from ..weights import text_cache_dir
    from .start import build_start_model

    dist = dist or Distributed()
    check_options(opts, dist.world)
    out = Path(opts.out)
    if dist.is_main:
        ensure_output_folder(out)
    dist.barrier()
    resume_path = latest_checkpoint(out) if opts.resume else None
    if not opts.resume and (latest_checkpoint(out) is not None or (out / FINAL_NAME).exists()):
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    device = resolve_device(dist.device(opts.device))
    precision = resolve_precision(opts.precision, device)
    workers = opts.workers if opts.workers is not None else (min(4, max(1, (os.cpu_count() or 2) // 2))
                                                              if device.type == "cuda" else 0)
    if len(dataset) == 0:
        raise DatasetError(f"the training set {dataset.name} has no samples")

    # -- the model first: a wrong --init or CLIP is reported before the (long) dataset check
    if resume_path is not None:
        saved_model, saved_config, saved_state = read_train_checkpoint(resume_path)
        model, source = _resume_model(saved_model, saved_config), f"{resume_path} (resumed)"
        del saved_model
    else:
        model, source = build_start_model(model_name=opts.model, init=opts.init, clip_weights=opts.clip_weights,
                                          clip_config=opts.clip_config, num_classes=dataset.num_classes,
                                          seed=opts.seed, progress=not opts.quiet and dist.is_main)
    if model.config.num_train_classes != dataset.num_classes:
        raise UsageError(f"--resume: the checkpoint was trained on {model.config.num_train_classes} classes, "
                         f"the dataset has {dataset.num_classes}")
    if dist.is_main and not opts.quiet and resume_path is None:
        print(f"checking the {len(dataset)} training samples (images, labels, class values)...", file=sys.stderr,
              flush=True)
    data_key = check_dataset(dataset, out, dist, resumed=resume_path is not None)
    identity = run_identity(opts, data_key, dataset, opts.batch_size, precision)
    if resume_path is not None:
        check_same_run(saved_state.get("run", {}), identity, resume_path)

    # -- optimizer, schedule
    model = model.to(device).train()
    trained = set_trainable(model)
    optim_cfg = OptimConfig(lr=opts.lr)
    optimizer = build_optimizer(model, optim_cfg)
    schedule = PolySchedule(optimizer, opts.iters, optim_cfg.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    criterion = SanCriterion(dataset.num_classes, CriterionConfig(no_object_weight=model.config.no_object_weight,
                                                                  num_points=points_for_crop(opts.crop_size)))
    start = 0
    if resume_path is not None:
        optimizer.load_state_dict(saved_state["optimizer"])
        schedule.load_state_dict(saved_state["schedule"])
        if saved_state.get("scaler"):
            scaler.load_state_dict(saved_state["scaler"])
        states = saved_state["rng"]
        restore_rng(states[dist.rank] if len(states) == dist.world else states[0])
        start = int(saved_state["iteration"])
    else:
        torch.manual_seed(opts.seed)
        np.random.seed(opts.seed % 2**32)
        random.seed(opts.seed)

    with torch.no_grad():
        prompts = PromptEncoder(model.ov_classifier, get_templates(model.config.templates), cache_dir=text_cache_dir())
        class_embeddings = prompts.embed(dataset.class_names).to(device)
    net: nn.Module = TrainNet(model)
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    normalize = _normalizer(device)
    samples = TrainSamples(dataset, AugmentConfig(crop_size=opts.crop_size), opts.seed)
    loader = batches(samples, start, opts.iters, opts.batch_size, dist.rank, dist.world, workers,
                     pin_memory=device.type == "cuda")
    log = TrainLog(out, resume_from=start if resume_path is not None else None) if dist.is_main else None
    result = TrainResult(out, out / FINAL_NAME, start, opts.iters, 0.0, source)
    num_queries = model.config.num_queries

    def train_state(next_iteration: int) -> dict[str, Any]:
        return {"iteration": next_iteration, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "rng": dist.all_gather(capture_rng()),
                "data": {"seed": opts.seed, "position": next_iteration * opts.batch_size, "samples": len(dataset),
                         "fingerprint": data_key},
                "run": identity, "world": dist.world, "source": source,
                "log_window": {k: list(v) for k, v in window.items()}}

    def evaluate(iteration: int, display: TrainDisplay) -> None:
        metrics = evaluate_model(model, eval_dataset, device, precision, opts.crop_size, dist)
        result.evaluations.append({"iteration": iteration, **metrics})
        if log is not None:
            log.write({"iteration": iteration, "eval": metrics})
        model.train()
        display.message(f"eval at iteration {iteration}: {metrics['dataset']} mIoU {metrics.get('miou', float('nan')):.2f}"
                        f" ({metrics['images']} images)")

    # the losses since the last log line: a checkpoint between two log lines carries them, so
    # that a resumed run logs the same means
    window: dict[str, list[float]] = {}
    if resume_path is not None:
        window = {str(k): [float(x) for x in v] for k, v in saved_state.get("log_window", {}).items()}
    started = time.perf_counter()
    with TrainDisplay(opts.iters, start, enabled=dist.is_main and not opts.quiet, live=opts.live) as display:
        display.message(f"training {dataset.name} ({len(dataset)} images, {dataset.num_classes} classes) from "
                        f"{source}: iterations {start}..{opts.iters}, batch {opts.batch_size} over {dist.world} "
                        f"process(es), {device} {precision}")
        tick = time.perf_counter()
        for iteration, batch in zip(range(start, opts.iters), loader):
            lr = schedule.apply(iteration)
            images = normalize(batch.images.to(device, non_blocking=True))
            labels = batch.labels.to(device, non_blocking=True)
            targets = [build_target(label, dataset.ignore_label) for label in labels]
            generators = [torch.Generator(device=device).manual_seed(mix_seed(opts.seed, int(p), 0x1055))
                          for p in batch.positions]
            local = [float(sum(t.labels.numel() for t in targets)),
                     class_weight_total(targets, num_queries, criterion.config.no_object_weight)]
            num_masks, weight_total = _global_mean(local, dist)
            norms = LossNorms(max(num_masks, 1.0), weight_total)
            with autocast(device, precision):
                mask_logits, class_logits = net(images, class_embeddings)
            losses = criterion(mask_logits, class_logits, targets, norms, generators)
            total = sum(losses.values())
            names = list(losses)  # the mean over ranks: the loss of the whole global batch
            values = _global_mean([float(total.detach())] + [float(losses[k].detach()) for k in names], dist)
            if not all(np.isfinite(values)):  # before the step, so the last checkpoint stays good
                raise TrainingError(f"the loss became {values[0]} at iteration {iteration}; training diverged "
                                    f"(try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)  # clipping sees the true gradients
            clip_gradients(trained, optim_cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            step = dict(zip(["loss", *names], values), seconds=time.perf_counter() - tick)
            for k, v in step.items():
                window.setdefault(k, []).append(v)
            result.last_losses = {k: v for k, v in step.items() if k != "seconds"}
            done = iteration + 1
            if done % opts.log_every == 0 or done == opts.iters:
                mean = {k: float(np.mean(v)) for k, v in window.items()}
                rate = 1.0 / mean["seconds"] if mean["seconds"] > 0 else 0.0
                if log is not None:
                    record = {"iteration": iteration, "lr": lr, **{k: v for k, v in mean.items() if k != "seconds"},
                              "seconds_per_iteration": mean["seconds"]}
                    if device.type == "cuda":  # as detectron2's max_mem: this process's peak so far
                        record["max_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                    log.write(record)
                display.update(iteration, {k: v for k, v in mean.items() if k != "seconds"}, lr, rate)
                window.clear()
            # evaluate first: a checkpoint means its iteration's evaluation is in the log (a run
            # stopped during an evaluation resumes from the checkpoint before and evaluates again)
            if eval_dataset is not None and opts.eval_every and done % opts.eval_every == 0 and done < opts.iters:
                evaluate(iteration, display)
            if done % opts.checkpoint_every == 0:
                state = train_state(done)  # a collective: every rank takes part
                if dist.is_main:
                    save_checkpoint(checkpoint_path(out, iteration), model, state)
                    plot_log(read_log(log.path), out / PLOT_NAME)
            tick = time.perf_counter()  # an iteration's time: reading its batch to its update
        if eval_dataset is not None:
            evaluate(opts.iters - 1, display)
        if dist.is_main:
            save_checkpoint(result.final, model)
            plot_log(read_log(log.path), out / PLOT_NAME)
            display.message(f"wrote {result.final}")
        dist.barrier()
    if log is not None:
        log.close()
    result.seconds = time.perf_counter() - started
    return result
