"""SAN behind the :class:`~ovss_cli.segmenter.Segmenter` interface, inferring exactly as the
official evaluation does: short side to 640 (PIL bilinear), CLIP normalisation, zero padding
to a multiple of 32, then ``sem_seg = sum_q softmax(class_q)[:-1] * sigmoid(mask_q)`` at the
input image's size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from ...clip.model import load_clip_config
from ...clip.templates import get_templates
from ...clip.text import PromptEncoder
from ...runtime import autocast, cast_matmul_weights, resolve_device, resolve_precision
from ...segmenter import Prediction, Segmenter, labels_from_scores
from ...vocabulary import Vocabulary, as_vocabulary
from .checkpoint import load_san_weights, read_san_checkpoint
from .config import CLIP_MEAN, CLIP_STD, SanConfig, get_san_config
from .model import SanModel

DEFAULT_MODEL = "san-vit-b16"
QUERY_CHUNK = 20  # queries upsampled at once in post-processing (bounds memory on large images)


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
class _Prepared:
    tensor: Tensor  # 3 x h x w, normalised, unpadded
    out_size: tuple[int, int]  # the original image size


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
        templates: str | None = None,
    ):
        self.model = model.eval().requires_grad_(False).to(device)
        for part in (self.model.clip_visual_extractor, self.model.clip_rec_head, self.model.side_adapter_network):
            cast_matmul_weights(part, precision)  # the text tower (ov_classifier) stays fp32
        self.config: SanConfig = model.config
        self.model_name = model_name
        self.device = device
        self.precision = precision
        self.resize_short = resize_short
        self.prompts = PromptEncoder(self.model.ov_classifier, get_templates(templates or self.config.templates))
        self.pixel_mean = torch.tensor([255.0 * m for m in CLIP_MEAN], device=device).view(3, 1, 1)
        self.pixel_std = torch.tensor([255.0 * s for s in CLIP_STD], device=device).view(3, 1, 1)
        self._classifiers: dict[tuple[str, ...], Tensor] = {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.precision, "resize_short": self.resize_short}

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
        return self._classifiers[key]

    # -- image side ------------------------------------------------------------------------
    def _prepare(self, image: np.ndarray) -> _Prepared:
        h, w = image.shape[:2]
        if self.resize_short:
            image = resize_image(image, shortest_edge_size(h, w, self.resize_short, self.config.max_size_test))
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(self.device, torch.float32)
        return _Prepared((x - self.pixel_mean) / self.pixel_std, (h, w))

    def _padded_size(self, t: Tensor) -> tuple[int, int]:
        d = self.config.size_divisibility
        h, w = t.shape[-2:]
        return (-(-h // d) * d, -(-w // d) * d)

    @torch.no_grad()
    def _scores(self, mask_logits: Tensor, class_logits: Tensor, image_size: tuple[int, int],
                out_size: tuple[int, int], padded: tuple[int, int]) -> Tensor:
        """Q masks at 1/16 -> padded size -> cropped -> output size, combined with class
        probabilities; done in query chunks so memory stays bounded."""
        probs = F.softmax(class_logits.float(), dim=-1)[:, :-1]
        scores = None
        for start in range(0, mask_logits.shape[0], QUERY_CHUNK):
            m = mask_logits[None, start : start + QUERY_CHUNK].float()
            m = F.interpolate(m, size=padded, mode="bilinear", align_corners=False)
            m = m[:, :, : image_size[0], : image_size[1]]
            m = F.interpolate(m, size=out_size, mode="bilinear", align_corners=False)[0]
            part = torch.einsum("qc,qhw->chw", probs[start : start + QUERY_CHUNK], m.sigmoid())
            scores = part if scores is None else scores + part
        return scores

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray], vocabulary: Vocabulary | Sequence[str]) -> list[Prediction]:
        vocab = as_vocabulary(vocabulary)
        classifier = self.classifier(vocab)
        prepared = [self._prepare(im) for im in images]
        # Images batch together only when they pad to the same size: padding changes what
        # CLIP attends to, so mixed sizes would change each image's result.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(self._padded_size(p.tensor), []).append(i)
        results: list[Prediction | None] = [None] * len(images)
        for padded, idxs in groups.items():
            batch = torch.zeros(len(idxs), 3, *padded, device=self.device)
            for j, i in enumerate(idxs):
                t = prepared[i].tensor
                batch[j, :, : t.shape[1], : t.shape[2]] = t
            with autocast(self.device, self.precision):
                mask_logits, class_logits = self.model(batch, classifier)
            for j, i in enumerate(idxs):
                t = prepared[i].tensor
                scores = self._scores(mask_logits[-1][j], class_logits[-1][j], tuple(t.shape[-2:]),
                                      prepared[i].out_size, padded)
                scores = merge_synonyms(scores, vocab).cpu()
                results[i] = Prediction(scores=scores, labels=labels_from_scores(scores))
        return results  # type: ignore[return-value]

    def predict(self, image: np.ndarray, vocabulary: Vocabulary | Sequence[str]) -> Prediction:
        return self.predict_batch([image], vocabulary)[0]


def merge_synonyms(scores: Tensor, vocabulary: Vocabulary) -> Tensor:
    """Per-name scores (N x H x W) -> per-class scores: each class takes its best name."""
    if len(vocabulary.prompt_names) == len(vocabulary):
        return scores
    groups: dict[int, list[int]] = {}
    for name_index, class_index in enumerate(vocabulary.name_to_class):
        groups.setdefault(class_index, []).append(name_index)
    return torch.stack([scores[idx].amax(dim=0) for _, idx in sorted(groups.items())])


def build_san_segmenter(
    *,
    model: str | None = None,
    weights: str | None = None,
    clip_config: dict | str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    resize_short: int | None = 640,
    templates: str | None = None,
    progress: bool = True,
) -> SanSegmenter:
    """Factory behind ``load_segmenter("san", ...)``."""
    from ...weights import resolve_weights

    name = model or DEFAULT_MODEL
    cfg = get_san_config(name)
    path = resolve_weights(name, weights, default=DEFAULT_MODEL, progress=progress)
    state, stored = read_san_checkpoint(path)
    if stored is not None:
        cfg = SanConfig.from_dict(stored)
    if clip_config is not None:
        cfg = cfg.with_clip(load_clip_config(clip_config))
    with torch.device("meta"):
        net = SanModel(cfg)
    load_san_weights(net, state, str(path), name)
    dev = resolve_device(device)
    return SanSegmenter(
        net,
        model_name=name,
        device=dev,
        precision=resolve_precision(precision, dev),
        resize_short=resize_short,
        templates=templates,
    )
