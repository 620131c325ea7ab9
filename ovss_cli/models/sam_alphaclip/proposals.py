"""Class-agnostic mask proposals from Segment Anything's automatic mask generator.

SAM is built from ``segment_anything``'s modules; checkpoints are read with our weights-only
loader (never ``segment_anything``'s own ``torch.load``) and their architecture is inferred
from the state dict, so ViT-B/L/H and small test models all load the same way.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import Tensor, nn

from ...errors import UsageError, WeightsError
from ...runtime import autocast, cast_matmul_weights

SAM_IMAGE_SIZE = 1024
SAM_PATCH = 16
SAM_WINDOW = 14
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArch:
    """SAM's image-encoder shape (the prompt encoder and mask decoder are the same for all)."""

    embed_dim: int
    depth: int
    heads: int
    global_attn: tuple[int, ...]


SAM_ARCHS = {
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
}


def build_sam(arch: SamArch) -> Sam:
    """A SAM with random weights for ``arch`` (the layout of segment_anything's builders)."""
    prompt_dim = 256
    grid = SAM_IMAGE_SIZE // SAM_PATCH
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.depth, embed_dim=arch.embed_dim, img_size=SAM_IMAGE_SIZE, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=arch.heads, patch_size=SAM_PATCH,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=arch.global_attn, window_size=SAM_WINDOW,
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(grid, grid),
            input_image_size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    ).eval()


def infer_sam_arch(state: dict[str, Tensor]) -> SamArch:
    """Encoder width, depth, heads and global-attention blocks read off a SAM state dict."""
    try:
        dim = state["image_encoder.patch_embed.proj.weight"].shape[0]
        blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")})
        head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        global_attn = tuple(
            b for b in blocks
            if state[f"image_encoder.blocks.{b}.attn.rel_pos_h"].shape[0] == 2 * (SAM_IMAGE_SIZE // SAM_PATCH) - 1
        )
    except (KeyError, IndexError):
        raise WeightsError("not a Segment Anything checkpoint (no image_encoder.* keys)") from None
    return SamArch(int(dim), len(blocks), int(dim // head_dim), global_attn)


def load_sam(path: str | Path) -> Sam:
    """SAM from a checkpoint (a plain state dict, as published), with exact key matching."""
    from ...weights import load_state_file, load_state_strict

    state = load_state_file(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        arch = infer_sam_arch(state)
    except WeightsError as err:
        from ...weights import checkpoint_kind

        kind = checkpoint_kind(state)
        found = f"{path} is {kind}, not a Segment Anything checkpoint" if kind else f"{path}: {err}"
        raise WeightsError(f"{found}; pass a SAM checkpoint to --sam-weights") from None
    with torch.device("meta"):
        sam = build_sam(arch)
    load_state_strict(sam, state, str(path), f"a SAM with a {arch.embed_dim}-wide, {arch.depth}-block encoder")
    # non-persistent buffers are not in the checkpoint
    sam.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), False)
    sam.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), False)
    return sam.eval().requires_grad_(False)


class AutocastImageEncoder(nn.Module):
    """Runs SAM's image encoder (nearly all of SAM's cost) under autocast, returning fp32, so
    the mask decoder and its thresholds stay in full precision."""

    def __init__(self, encoder: ImageEncoderViT, device: torch.device, precision: str):
        super().__init__()
        self.encoder = cast_matmul_weights(encoder, precision)
        self.img_size = encoder.img_size
        self.device_ = device
        self.precision = precision

    def forward(self, x: Tensor) -> Tensor:
        with autocast(self.device_, self.precision):
            return self.encoder(x).float()


@dataclass(frozen=True)
class GeneratorOptions:
    """Automatic mask generator settings (defaults of the SAM + Alpha-CLIP pipeline)."""

    points_per_side: int = 20
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.86
    stability_score_thresh: float = 0.92
    crop_n_layers: int = 0
    min_mask_region_area: int = 100

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise UsageError("--points-per-side and --points-per-batch must be at least 1")
        if self.crop_n_layers < 0 or self.min_mask_region_area < 0:
            raise UsageError("--crop-n-layers and --min-mask-region-area must be >= 0")


@dataclass
class Proposal:
    """One SAM mask: H x W bool mask, XYWH box, pixel area and SAM's quality scores."""

    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    area: int
    predicted_iou: float
    stability_score: float


# Automatic mask generators: ours (same masks, less work, bounded memory) and segment_anything's.
AMG_CHOICES = ("ovss", "stock")


def check_amg(amg: str) -> None:
    if amg not in AMG_CHOICES:
        raise UsageError(f"unknown --amg {amg!r}; choose one of {', '.join(AMG_CHOICES)}")


class MaskProposer:
    """SAM's automatic mask generator (``amg``: ``ovss``, ours, or ``stock``, segment_anything's
    ``SamAutomaticMaskGenerator``); the image embedding is computed once per image (crop)."""

    def __init__(self, sam: Sam, options: GeneratorOptions, device: torch.device, precision: str = "fp32",
                 amg: str = "ovss"):
        check_amg(amg)
        sam = sam.to(device)
        if precision != "fp32" and not isinstance(sam.image_encoder, AutocastImageEncoder):  # shared: wrap once
            sam.image_encoder = AutocastImageEncoder(sam.image_encoder, device, precision)
        self.sam = sam
        self.options = options
        self.amg = amg
        if amg == "ovss":
            from .mask_generator import MaskGenerator

            self.generator = MaskGenerator(sam, options)
        else:
            self.generator = SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **asdict(options))

    def __call__(self, image: np.ndarray) -> list[Proposal]:
        if self.amg == "ovss":
            return self.generator.generate(image)
        return [
            Proposal(
                mask=r["segmentation"],
                bbox=tuple(int(round(v)) for v in r["bbox"]),
                area=int(r["area"]),
                predicted_iou=float(r["predicted_iou"]),
                stability_score=float(r["stability_score"]),
            )
            for r in self.generator.generate(image)
        ]


def containment_filter(boxes: list[tuple[int, int, int, int]]) -> list[int]:
    """Indices of the boxes (XYWH) to keep: a box lying inside another box whose area is at
    least as large is dropped; of identical boxes the first is kept."""
    if not boxes:
        return []
    b = np.asarray(boxes, dtype=np.int64)
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    area = b[:, 2] * b[:, 3]
    # inside[i, j]: box i lies within box j (then area j >= area i, equal only if identical)
    inside = (x0[:, None] >= x0[None]) & (y0[:, None] >= y0[None]) & (x1[:, None] <= x1[None]) & (y1[:, None] <= y1[None])
    n = len(boxes)
    order = np.arange(n)
    beaten = inside & ((area[None] > area[:, None]) | (order[None] < order[:, None]))
    np.fill_diagonal(beaten, False)
    return [int(i) for i in np.flatnonzero(~beaten.any(axis=1))]
