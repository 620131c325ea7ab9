"""The one interface every method implements: image + vocabulary -> per-class scores and labels.

``segment``, ``evaluate`` and ``compare`` talk to a :class:`Segmenter` only; methods register a
factory under their name and :func:`load_segmenter` builds one from that name.
"""
from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import UsageError
from .vocabulary import Vocabulary, as_vocabulary

# Label value for pixels no class was given to (e.g. no SAM mask covers them).
UNLABELLED = -1
# Label value for pixels won by a distractor (or a mask below the minimum score): "other".
OTHER = -2


@dataclass
class Segment:
    """One predicted region (instance-style methods report these for COCO output)."""

    class_index: int
    score: float
    mask: np.ndarray  # H x W bool


@dataclass
class Prediction:
    """What a segmenter returns for one image, on the host (numpy / CPU tensors).

    ``labels`` is H x W int32: a class index, :data:`UNLABELLED`, or :data:`OTHER` (won by a
    distractor). ``confidence`` (H x W float32, optional) is how sure the method is of each
    pixel's class: for SAN the winning class's share of the classes' summed score. ``scores``
    is C x H x W float32 at the input image's size, one channel per vocabulary class (for SAN
    the official ``sem_seg``); it can be large (C x H x W), so methods build it only when the
    caller asks (``with_scores=True``). ``segments`` are the method's own regions, if any.
    """

    labels: np.ndarray
    scores: torch.Tensor | None = None
    confidence: np.ndarray | None = None
    segments: list[Segment] | None = None
    warnings: list[str] = field(default_factory=list)


class Segmenter(ABC):
    """Base class of all methods. Subclasses set ``method`` and ``model_name``."""

    method: str = ""
    model_name: str = ""
    # What makes this segmenter's outputs what they are (set by load_segmenter): a resumed run
    # must have the same (see segmenter_identity).
    identity: dict[str, Any] | None = None
    # How load_segmenter built it: (method, keywords), to rebuild it on the CPU after a GPU OOM.
    load_arguments: tuple[str, dict[str, Any]] | None = None
    _cpu_copy: "Segmenter | None" = None

    @abstractmethod
    def predict(self, image: np.ndarray, vocabulary: Vocabulary | Sequence[str], *,
                with_scores: bool = False) -> Prediction:
        """Segment one H x W x 3 uint8 RGB image with the given vocabulary; ``with_scores``
        also returns the C x H x W score map."""

    def predict_batch(
        self, images: Sequence[np.ndarray], vocabulary: Vocabulary | Sequence[str], *, with_scores: bool = False
    ) -> list[Prediction]:
        """Segment several images; methods override this to batch their forward passes."""
        vocab = as_vocabulary(vocabulary)
        return [self.predict(image, vocab, with_scores=with_scores) for image in images]

    def can_label_other(self, vocabulary: Vocabulary) -> bool:
        """Whether predictions may contain :data:`OTHER` (outputs reserve a value for it)."""
        return bool(vocabulary.distractors)

    @abstractmethod
    def embed_names(self, names: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLIP text embeddings of ``names`` under the method's prompt templates
        (open-vocabulary scoring compares words through these)."""

    def describe(self) -> dict[str, Any]:
        """A short JSON-able description for manifests and tables."""
        return {"method": self.method, "model": self.model_name}

    def networks(self) -> list[torch.nn.Module]:
        """The networks the method runs (for parameter counts)."""
        return []

    def on_cpu(self) -> "Segmenter":
        """The same segmenter on the CPU (built once, on first use): where an image that does
        not fit in GPU memory is segmented instead."""
        if self._cpu_copy is None:
            if self.load_arguments is None:
                raise RuntimeError("only segmenters made by load_segmenter can be rebuilt on the CPU")
            method, kwargs = self.load_arguments
            self._cpu_copy = load_segmenter(method, **{**kwargs, "device": "cpu", "precision": "auto"})
        return self._cpu_copy

    def num_parameters(self) -> int:
        """Parameters of all its networks, each counted once."""
        seen: dict[int, int] = {}
        for net in self.networks():
            for param in net.parameters():
                seen[id(param)] = param.numel()
        return sum(seen.values())


# method name -> "module:function" building a Segmenter; imported on first use so that
# `ovss --help` does not pay for importing every model.
_FACTORIES: dict[str, str] = {
    "san": "ovss_cli.models.san.segmenter:build_san_segmenter",
    "sam": "ovss_cli.models.sam_alphaclip.segmenter:build_sam_alphaclip_segmenter",
}

METHODS = tuple(_FACTORIES)
# method name -> "module:function" checking its option values without loading anything
_VALUE_CHECKS: dict[str, str] = {
    "san": "ovss_cli.models.san.segmenter:check_san_options",
    "sam": "ovss_cli.models.sam_alphaclip.segmenter:check_sam_options",
}


def _factory(method: str) -> Callable[..., Segmenter]:
    try:
        target = _FACTORIES[method]
    except KeyError:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}") from None
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def _check_options(method: str, factory: Callable[..., Segmenter], options: dict[str, Any]) -> None:
    accepted = inspect.signature(factory).parameters
    for key in options:
        if key not in accepted:
            flag = {"containment_filter": "no-filter"}.get(key, key.replace("_", "-"))
            raise UsageError(f"option --{flag} does not apply to --method {method}")


def check_segmenter_options(method: str, *, model: str | None = None, weights: str | None = None,
                            clip_config: dict | str | None = None, device: str | torch.device = "cpu",
                            **method_options: Any) -> None:
    """Everything :func:`load_segmenter` refuses that can be known without loading a network:
    the method, each option's name, device and precision, local checkpoint files, zoo names,
    and the method's own values (``region``, ``fill``, ...). ``compare`` checks every entry
    this way before the first one loads."""
    from .runtime import resolve_device, resolve_precision
    from .weights import check_local_checkpoint
    from .zoo import get_entry

    factory = _factory(method)
    _check_options(method, factory, method_options)
    resolve_precision(method_options.get("precision", "auto"), resolve_device(device))
    module_name, func_name = _VALUE_CHECKS[method].split(":")
    getattr(importlib.import_module(module_name), func_name)(model=model, **method_options)
    for flag, local, name in (("--weights", weights, model), ("--sam-weights", method_options.get("sam_weights"),
                                                                method_options.get("sam_model"))):
        if local is not None and str(local) != "":
            check_local_checkpoint(local, flag)
        elif name is not None:
            get_entry(name)
    if method_options.get("clip_weights"):
        check_local_checkpoint(method_options["clip_weights"], "--clip-weights")
    if clip_config is not None:
        from .clip.model import load_clip_config

        load_clip_config(clip_config)


def load_segmenter(
    method: str,
    *,
    model: str | None = None,
    weights: str | None = None,
    clip_config: dict | str | None = None,
    device: str | torch.device = "cpu",
    **method_options: Any,
) -> Segmenter:
    """Build a ready-to-use segmenter.

    ``model`` names a zoo entry (default: the method's default model); ``weights`` is a local
    checkpoint used instead of the zoo download; ``clip_config`` is an open_clip model config
    (a dict or a JSON file path) for checkpoints built on a non-standard CLIP.
    """
    check_segmenter_options(method, model=model, weights=weights, clip_config=clip_config, device=device,
                            **method_options)
    factory = _factory(method)
    segmenter = factory(model=model, weights=weights, clip_config=clip_config, device=device, **method_options)
    segmenter.identity = segmenter_identity(method, model=model, weights=weights, clip_config=clip_config,
                                            device=device, **method_options)
    segmenter.load_arguments = (method, dict(model=model, weights=weights, clip_config=clip_config, device=device,
                                             **method_options))
    return segmenter


def out_of_gpu_memory(error: BaseException) -> bool:
    return isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


GPU_FALLBACK_WARNING = "out of GPU memory: segmented on the CPU"


def predict_robustly(segmenter: Segmenter, images: Sequence[np.ndarray], vocabulary: Vocabulary | Sequence[str],
                     **kwargs: Any) -> list[Prediction | BaseException]:
    """Predictions for a batch, each image's own error where it fails. A batch that fails is
    retried image by image (one bad or huge image does not fail its neighbours); an image that
    still runs out of GPU memory is segmented on the CPU, with a warning in its prediction."""
    try:
        return list(segmenter.predict_batch(images, vocabulary, **kwargs))
    except Exception as error:
        if len(images) == 1 and not out_of_gpu_memory(error):
            return [error]
        _free_gpu_memory(error)
    results: list[Prediction | BaseException] = []
    for image in images:
        try:
            results.append(segmenter.predict(image, vocabulary, **kwargs))
        except Exception as error:
            if not out_of_gpu_memory(error):
                results.append(error)
                continue
            _free_gpu_memory(error)
            try:
                prediction = segmenter.on_cpu().predict(image, vocabulary, **kwargs)
                prediction.warnings.append(GPU_FALLBACK_WARNING)
                results.append(prediction)
            except Exception as cpu_error:
                results.append(cpu_error)
    return results


def _free_gpu_memory(error: BaseException) -> None:
    if out_of_gpu_memory(error) and torch.cuda.is_available():
        torch.cuda.empty_cache()


# Options that change how a segmenter works, not what it outputs.
_NOT_IDENTITY = {"model", "weights", "clip_config", "device", "progress", "mask_batch_size", "points_per_batch"}


def _file_identity(path: Any) -> Any:
    """A checkpoint file as identity: its absolute path and size (hashing gigabytes per run
    would cost more than the check is worth)."""
    if path is None or isinstance(path, dict):
        return path
    p = Path(str(path)).expanduser()
    return {"path": str(p.resolve()), "size": p.stat().st_size if p.is_file() else None}


def segmenter_identity(method: str, *, model: str | None = None, weights: str | None = None,
                       clip_config: dict | str | None = None, device: str | torch.device = "cpu",
                       **method_options: Any) -> dict[str, Any]:
    """What makes a segmenter's outputs what they are, without building it: method, model,
    checkpoint files, and every output-changing option with the factory's defaults filled in
    (precision resolved for the device). Equal identities give equal outputs."""
    from .runtime import resolve_device, resolve_precision

    factory = _factory(method)
    _check_options(method, factory, method_options)
    options: dict[str, Any] = {}
    for name, param in inspect.signature(factory).parameters.items():
        if name in _NOT_IDENTITY:
            continue
        value = method_options.get(name, param.default)
        options[name] = _file_identity(value) if name.endswith("_weights") else value
    if "precision" in options:
        options["precision"] = resolve_precision(options["precision"], resolve_device(device))
    config = clip_config
    if isinstance(config, (str, Path)) and Path(config).is_file():
        from .clip.model import load_clip_config

        config = load_clip_config(config)  # a file that is not a CLIP config is a UsageError
    return {"method": method, "model": model, "weights": _file_identity(weights), "clip_config": config,
            "options": options}
