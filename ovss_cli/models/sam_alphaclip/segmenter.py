"""SAM + Alpha-CLIP behind the :class:`~ovss_cli.segmenter.Segmenter` interface.

Per image: SAM proposes masks (one image embedding), the containment filter drops nested
boxes, every mask's region is prepared (image-wide work such as the blur done once) and
classified by Alpha-CLIP in batched forwards, then the masks are composed into labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ...clip.templates import get_templates
from ...clip.text import PromptEncoder
from ...errors import UsageError
from ...shared_models import file_key, shared
from ...runtime import autocast, cast_matmul_weights, resolve_device, resolve_precision
from ...segmenter import Prediction, Segmenter
from ...vocabulary import Vocabulary, as_vocabulary
from .alpha_clip import AlphaClip, load_alpha_clip
from .compose import FILL_MODES, compose
from .preprocess import full_alpha, preprocess_alpha, preprocess_pixels
from .proposals import GeneratorOptions, MaskProposer, Proposal, check_amg, containment_filter, load_sam
from .regions import blur_image, check_region, region_fn

DEFAULT_TEMPLATES = "photo"
# A mask whose best class holds less than this share of the probability is "other" (README).
DEFAULT_MIN_SCORE = 0.2


def attention_kernel(device: torch.device, precision: str) -> str:
    """The visual tower's attention kernel: per-head matmuls for bf16 on a CPU (measured faster
    there than the fused kernel, benchmarks/RESULTS.md), nn.MultiheadAttention otherwise (the
    fp32 parity path, and the fused GPU kernels)."""
    return "bmm" if device.type == "cpu" and precision != "fp32" else "sdpa"


class MaskClassifier:
    """Alpha-CLIP classification of masks against a vocabulary (text features cached)."""

    def __init__(self, model: AlphaClip, device: torch.device, precision: str, templates: Sequence[str],
                 region: str = "crop", use_alpha: bool = True, batch_size: int = 8,
                 text_cache: str | Path | None = None):
        check_region(region)
        if batch_size < 1:
            raise UsageError("--mask-batch-size must be at least 1")
        self.model = model.to(device)
        cast_matmul_weights(self.model.visual, precision)  # the text tower stays fp32
        self.model.visual.attention = attention_kernel(device, precision)
        self.device = device
        self.precision = precision
        self.region = region
        self.use_alpha = use_alpha
        self.batch_size = batch_size
        self.prompts = PromptEncoder(model.text, templates, cache_dir=text_cache)

    def text_classifier(self, vocabulary: Vocabulary) -> torch.Tensor:
        """N_names x D unit-norm text embeddings of every name of the vocabulary."""
        return self.prompts.embed(vocabulary.prompt_names)

    def inputs(self, image: np.ndarray, masks: list[np.ndarray], blurred: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Alpha-CLIP pixel and alpha tensors (M x 3 x S x S, M x 1 x S x S) for ``masks``."""
        size = self.model.image_size
        if self.region == "blur" and blurred is None:
            blurred = blur_image(image)
        make = region_fn(self.region, image, blurred)
        regions = [make(m) for m in masks]
        if self.region == "none":  # every mask sees the same pixels: preprocess them once
            pixels = preprocess_pixels(image, size).expand(len(masks), -1, -1, -1)
        else:
            pixels = torch.stack([preprocess_pixels(px, size) for px, _ in regions])
        if self.use_alpha:
            alphas = torch.cat([preprocess_alpha(torch.from_numpy(m)[None], size) for _, m in regions])
        else:
            alphas = full_alpha(len(masks), size)
        return pixels, alphas

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, alphas: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """M x N_names logits: logit scale x cosine similarity."""
        with autocast(self.device, self.precision):
            feats = self.model.encode_image(pixels.to(self.device), alphas.to(self.device))
        feats = F.normalize(feats.float(), dim=-1)
        return self.model.logit_scale.exp().float() * feats @ text.T.to(feats)

    def classify(self, image: np.ndarray, masks: list[np.ndarray], vocabulary: Vocabulary) -> np.ndarray:
        """M x C class probabilities; a class's logit is its best name's, softmax over classes.
        Masks go through Alpha-CLIP in chunks of ``batch_size``; the blur is computed once."""
        text = self.text_classifier(vocabulary)
        blurred = blur_image(image) if self.region == "blur" else None
        chunks = []
        for start in range(0, len(masks), self.batch_size):
            pixels, alphas = self.inputs(image, masks[start : start + self.batch_size], blurred)
            chunks.append(self.logits(pixels, alphas, text))
        logits = torch.cat(chunks) if chunks else torch.zeros(0, len(vocabulary.prompt_names))
        return class_probabilities(logits, vocabulary).cpu().numpy()


def class_probabilities(name_logits: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
    """M x N_names logits -> M x G probabilities over the classes and then each distractor
    (a class takes its best name's logit; softmax over all G competitors)."""
    return vocabulary.best_name_per_class(name_logits, dim=1).softmax(dim=-1)


def check_sam_options(*, region: str = "crop", fill: str = "none", min_score: float = DEFAULT_MIN_SCORE,
                      templates: str | None = None, **_: Any) -> None:
    """The option values :func:`build_sam_alphaclip_segmenter` refuses, checked without loading
    anything (see :func:`~ovss_cli.segmenter.check_segmenter_options`)."""
    check_region(region)
    if fill not in FILL_MODES:
        raise UsageError(f"unknown --fill {fill!r}; choose one of {', '.join(FILL_MODES)}")
    if not 0.0 <= min_score <= 1.0:
        raise UsageError(f"--min-score must be a probability in [0, 1], got {min_score}")
    if templates is not None:
        get_templates(templates)


class SamAlphaClipSegmenter(Segmenter):
    """SAM proposals classified by Alpha-CLIP."""

    method = "sam"

    def __init__(self, proposer: MaskProposer, classifier: MaskClassifier, *, model_name: str,
                 containment: bool = True, fill: str = "none", min_score: float = DEFAULT_MIN_SCORE):
        if fill not in FILL_MODES:
            raise UsageError(f"unknown --fill {fill!r}; choose one of {', '.join(FILL_MODES)}")
        if not 0.0 <= min_score <= 1.0:
            raise UsageError(f"--min-score must be a probability in [0, 1], got {min_score}")
        self.proposer = proposer
        self.classifier = classifier
        self.model_name = model_name
        self.containment = containment
        self.fill = fill
        self.min_score = min_score

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "amg": self.proposer.amg, "region": self.classifier.region,
                "precision": self.classifier.precision,
                "alpha": self.classifier.use_alpha, "containment_filter": self.containment, "fill": self.fill,
                "min_score": self.min_score}

    def networks(self) -> list[torch.nn.Module]:
        return [self.proposer.sam, self.classifier.model]

    def can_label_other(self, vocabulary: Vocabulary) -> bool:
        return bool(vocabulary.distractors) or self.min_score > 0

    def embed_names(self, names: Sequence[str]) -> torch.Tensor:
        return self.classifier.prompts.embed(list(names))

    def proposals(self, image: np.ndarray) -> list[Proposal]:
        """SAM's masks, after the containment filter when it is on."""
        found = self.proposer(image)
        if self.containment:
            found = [found[i] for i in containment_filter([p.bbox for p in found])]
        return found

    def predict(self, image: np.ndarray, vocabulary: Vocabulary | Sequence[str], *,
                with_scores: bool = False) -> Prediction:
        vocab = as_vocabulary(vocabulary)
        masks = [p.mask for p in self.proposals(image)]
        probs = (self.classifier.classify(image, masks, vocab) if masks
                 else np.zeros((0, vocab.num_competitors), np.float32))
        return compose(masks, probs, image.shape[:2], len(vocab), fill=self.fill, min_score=self.min_score,
                       with_scores=with_scores)


def matching_clip_entry(alpha_state: dict[str, torch.Tensor], source: str) -> str:
    """The OpenAI CLIP zoo entry matching an Alpha-CLIP visual checkpoint's architecture."""
    from ...errors import WeightsError

    try:
        width = alpha_state["conv1.weight"].shape[0]
        grid = round((alpha_state["positional_embedding"].shape[0] - 1) ** 0.5)
    except KeyError:
        raise WeightsError(f"{source} is not an Alpha-CLIP visual checkpoint (no conv1.weight)") from None
    if width == 768:
        return "clip-vit-b16-openai"
    if width == 1024:
        return "clip-vit-l14-336-openai" if grid == 24 else "clip-vit-l14-openai"
    raise WeightsError(f"{source}: no released CLIP matches this Alpha-CLIP (width {width}); pass --clip-weights FILE")


def build_sam_alphaclip_segmenter(
    *,
    model: str | None = None,
    weights: str | None = None,
    clip_config: dict | str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    clip_weights: str | None = None,
    sam_model: str | None = None,
    sam_weights: str | None = None,
    points_per_side: int = 20,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.86,
    stability_score_thresh: float = 0.92,
    crop_n_layers: int = 0,
    min_mask_region_area: int = 100,
    amg: str = "ovss",
    region: str = "crop",
    templates: str | None = None,
    no_alpha: bool = False,
    containment_filter: bool = True,
    fill: str = "none",
    mask_batch_size: int | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    progress: bool = True,
) -> SamAlphaClipSegmenter:
    """Factory behind ``load_segmenter("sam", ...)``.

    ``model``/``weights``: the Alpha-CLIP visual checkpoint (zoo name or file);
    ``clip_weights``: the CLIP it builds on (default: the zoo CLIP of the same architecture);
    ``sam_model``/``sam_weights``: the SAM checkpoint; ``amg``: the automatic mask generator,
    ``ovss`` (ours: the stock's masks, faster) or ``stock`` (segment_anything's).
    """
    from ...weights import load_state_file, resolve_weights, text_cache_dir
    from ...zoo import DEFAULT_ALPHA_CLIP, DEFAULT_SAM, clip_for_alpha_clip

    options = GeneratorOptions(points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
                               crop_n_layers, min_mask_region_area)
    check_region(region)  # before any weights are loaded
    check_amg(amg)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    alpha_name = model or DEFAULT_ALPHA_CLIP
    alpha_path = resolve_weights(alpha_name, weights, default=DEFAULT_ALPHA_CLIP, progress=progress)
    alpha_state = load_state_file(alpha_path)
    if clip_weights is None:
        clip_entry = matching_clip_entry(alpha_state, str(alpha_path)) if weights else clip_for_alpha_clip(alpha_name).name
        clip_path = resolve_weights(clip_entry, None, default=clip_entry, progress=progress)
    else:
        clip_path = resolve_weights(None, clip_weights, default="", progress=progress)
    sam_path = resolve_weights(sam_model, sam_weights, default=DEFAULT_SAM, progress=progress)
    # variants of one comparison share the networks (classifier and proposer cast them in place)
    alpha_clip = shared(("alpha-clip", file_key(clip_path), file_key(alpha_path), repr(clip_config), str(dev), prec),
                        lambda: load_alpha_clip(clip_path, alpha_state, device=dev, clip_config=clip_config,
                                                alpha_source=str(alpha_path)))
    sam = shared(("sam", file_key(sam_path), str(dev), prec), lambda: load_sam(sam_path))
    proposer = MaskProposer(sam, options, dev, prec, amg=amg)
    if mask_batch_size is None:  # measured best on a 2-core AVX512 CPU; GPUs want big batches
        mask_batch_size = 8 if dev.type == "cpu" else 64
    classifier = MaskClassifier(alpha_clip, dev, prec, get_templates(templates or DEFAULT_TEMPLATES),
                                region=region, use_alpha=not no_alpha, batch_size=mask_batch_size,
                                text_cache=text_cache_dir())
    name = f"{sam_model or (Path(sam_weights).stem if sam_weights else DEFAULT_SAM)}+" \
           f"{alpha_name if not weights else Path(weights).stem}"
    return SamAlphaClipSegmenter(proposer, classifier, model_name=name, containment=containment_filter, fill=fill,
                                 min_score=min_score)
