"""SAN behind the :class:`~ovss_cli.segmenter.Segmenter` interface, inferring exactly as the
official evaluation does: short side to 640 (PIL bilinear), CLIP normalisation, zero padding
to a multiple of 32, then ``sem_seg = sum_q softmax(class_q)[:-1] * sigmoid(mask_q)`` at the
input image's size (built band by band, see :mod:`.postprocess`).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ...clip.model import load_clip_config
from ...clip.templates import get_templates
from ...clip.text import PromptEncoder
from ...shared_models import file_key, shared
from ...runtime import autocast, cast_matmul_weights, resolve_device, resolve_precision
from ...segmenter import Prediction, Segmenter
from ...vocabulary import Vocabulary, as_vocabulary
from .checkpoint import load_san_weights, read_san_checkpoint
from .config import CLIP_MEAN, CLIP_STD, SanConfig, get_san_config
from .model import SanModel
from .postprocess import ViewLogits, combine_views

DEFAULT_MODEL = "san-vit-b16"
# Official test-time augmentation: these short sides (long side at most 4480), each also flipped.
TTA_SHORT_SIDES = (320, 480, 640, 800, 960, 1120)
TTA_MAX_SIZE = 4480
CLASSIFIER_CACHE = 8  # vocabularies whose classifier is kept (the name embeddings stay cached)
VIEW_PIXELS = 4 * 640 * 864  # padded pixels per forward: bounds activation memory in batches


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to ``short`` with the long side capped at
    ``max_size`` (detectron2 ``ResizeShortestEdge`` arithmetic, rounded ``int(x + 0.5)``)."""
    scale = short / min(height, width)
    if height < width:
        new_h, new_w = float(short), scale * width
    else:
        new_h, new_w = scale * height, float(short)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bilinear resize of an H x W x 3 uint8 image to ``size`` = (h, w)."""
    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


@dataclass
class _View:
    """One (possibly augmented) view of an input image, ready for the network."""

    image: int  # index of the input image it comes from
    tensor: Tensor  # 3 x h x w, normalised, unpadded
    flip: bool


class SanSegmenter(Segmenter):
    """SAN inference for one model; text embeddings are cached across calls."""

    method = "san"

    def __init__(
        self,
        model: SanModel,
        *,
        model_name: str,
        device: torch.device,
        precision: str = "fp32",
        resize_short: int | None = 640,
        max_size: int | None = None,
        templates: str | None = None,
        tta: bool = False,
        text_cache: str | Path | None = None,
    ):
        self.model = model.eval().requires_grad_(False).to(device)
        for part in (self.model.clip_visual_extractor, self.model.clip_rec_head, self.model.side_adapter_network):
            cast_matmul_weights(part, precision)  # the text tower (ov_classifier) stays fp32
        self.config: SanConfig = model.config
        self.model_name = model_name
        self.device = device
        self.precision = precision
        self.resize_short = resize_short
        self.max_size = max_size or self.config.max_size_test
        self.tta = tta
        self.prompts = PromptEncoder(self.model.ov_classifier, get_templates(templates or self.config.templates),
                                     cache_dir=text_cache)
        self.pixel_mean = torch.tensor([255.0 * m for m in CLIP_MEAN], device=device).view(3, 1, 1)
        self.pixel_std = torch.tensor([255.0 * s for s in CLIP_STD], device=device).view(3, 1, 1)
        self._classifiers: OrderedDict[tuple[str, ...], Tensor] = OrderedDict()

    def networks(self) -> list[torch.nn.Module]:
        return [self.model]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.precision, "resize_short": self.resize_short,
                "tta": self.tta}

    # -- text side -------------------------------------------------------------------------
    def embed_names(self, names: Sequence[str]) -> Tensor:
        return self.prompts.embed(list(names))

    def classifier(self, vocabulary: Vocabulary) -> Tensor:
        """(N+1) x D classifier over every prompt name of the vocabulary plus background."""
        key = tuple(vocabulary.prompt_names)
        if key not in self._classifiers:
            emb = self.prompts.embed(list(key))
            with torch.no_grad():
                self._classifiers[key] = self.model.ov_classifier.classifier_weights(emb).float()
            if len(self._classifiers) > CLASSIFIER_CACHE:  # per-image vocabularies: keep memory flat
                self._classifiers.popitem(last=False)
        self._classifiers.move_to_end(key)
        return self._classifiers[key]

    # -- image side ------------------------------------------------------------------------
    def _views(self, index: int, image: np.ndarray) -> list[_View]:
        """The network inputs for one image: the test-time resize, or with TTA every short side
        of the official TTA, each also flipped horizontally."""
        h, w = image.shape[:2]
        if self.tta:
            sizes = [shortest_edge_size(h, w, s, TTA_MAX_SIZE) for s in TTA_SHORT_SIDES]
            flips: tuple[bool, ...] = (False, True)
        elif self.resize_short:
            sizes, flips = [shortest_edge_size(h, w, self.resize_short, self.max_size)], (False,)
        else:
            sizes, flips = [(h, w)], (False,)
        views = []
        for size in sizes:
            resized = resize_image(image, size)
            for flip in flips:
                pixels = resized[:, ::-1] if flip else resized
                chw = np.require(pixels.transpose(2, 0, 1), requirements=["C", "W"])  # copies only if needed
                x = torch.from_numpy(chw).to(self.device, torch.float32)
                views.append(_View(index, (x - self.pixel_mean) / self.pixel_std, flip))
        return views

    def _padded_size(self, t: Tensor) -> tuple[int, int]:
        d = self.config.size_divisibility
        h, w = t.shape[-2:]
        return (-(-h // d) * d, -(-w // d) * d)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray], vocabulary: Vocabulary | Sequence[str], *,
                      with_scores: bool = False) -> list[Prediction]:
        vocab = as_vocabulary(vocabulary)
        classifier = self.classifier(vocab)
        views = [v for i, image in enumerate(images) for v in self._views(i, image)]
        # Views batch together only when they pad to the same size: padding changes what CLIP
        # attends to, so mixed sizes would change each view's result.
        groups: dict[tuple[int, int], list[_View]] = {}
        for view in views:
            groups.setdefault(self._padded_size(view.tensor), []).append(view)
        outputs: list[list[ViewLogits]] = [[] for _ in images]
        for padded, group in groups.items():
            per_forward = max(1, VIEW_PIXELS // (padded[0] * padded[1]))
            for start in range(0, len(group), per_forward):
                chunk = group[start : start + per_forward]
                batch = torch.zeros(len(chunk), 3, *padded, device=self.device)
                for j, view in enumerate(chunk):
                    batch[j, :, : view.tensor.shape[1], : view.tensor.shape[2]] = view.tensor
                with autocast(self.device, self.precision):
                    mask_logits, class_logits = self.model(batch, classifier)
                for j, view in enumerate(chunk):
                    out_size = images[view.image].shape[:2]
                    outputs[view.image].append(ViewLogits.build(
                        mask_logits[-1][j], class_logits[-1][j], tuple(view.tensor.shape[-2:]), padded, out_size,
                        view.flip))
        results = []
        for image, image_views in zip(images, outputs):
            out = combine_views(image_views, vocab, image.shape[:2], with_scores=with_scores)
            results.append(Prediction(labels=out.labels.numpy(), scores=out.scores,
                                      confidence=out.confidence.numpy()))
        return results

    def predict(self, image: np.ndarray, vocabulary: Vocabulary | Sequence[str], *,
                with_scores: bool = False) -> Prediction:
        return self.predict_batch([image], vocabulary, with_scores=with_scores)[0]


def check_san_options(*, model: str | None = None, templates: str | None = None, **_: Any) -> None:
    """The option values :func:`build_san_segmenter` refuses, checked without loading anything
    (see :func:`~ovss_cli.segmenter.check_segmenter_options`)."""
    if model is not None:
        get_san_config(model)
    if templates is not None:
        get_templates(templates)


def build_san_segmenter(
    *,
    model: str | None = None,
    weights: str | None = None,
    clip_config: dict | str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    resize_short: int | None = 640,
    templates: str | None = None,
    tta: bool = False,
    progress: bool = True,
) -> SanSegmenter:
    """Factory behind ``load_segmenter("san", ...)``."""
    from ...weights import resolve_weights, text_cache_dir

    name = model or DEFAULT_MODEL
    cfg = get_san_config(name)
    path = resolve_weights(name, weights, default=DEFAULT_MODEL, progress=progress)
    clip = load_clip_config(clip_config) if clip_config is not None else None
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)

    def load() -> SanModel:
        state, stored = read_san_checkpoint(path)
        config = SanConfig.from_dict(stored) if stored is not None else cfg
        if clip is not None:
            config = config.with_clip(clip)
        with torch.device("meta"):
            net = SanModel(config)
        load_san_weights(net, state, str(path), name)
        return net

    # variants of one comparison share the network (the segmenter moves and casts it in place)
    net = shared(("san", name, file_key(path), json.dumps(clip, sort_keys=True), str(dev), prec), load)
    return SanSegmenter(
        net,
        model_name=name,
        device=dev,
        precision=prec,
        resize_short=resize_short,
        templates=templates,
        tta=tta,
        text_cache=text_cache_dir(),
    )
