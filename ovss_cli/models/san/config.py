"""SAN architectures as data: one :class:`SanConfig` per released model.

Values follow the official configs (MendelXu/SAN ``san/config.py`` defaults and the
``configs/san_clip_vit*_res4_coco.yaml`` files).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ...clip.model import CLIP_CONFIGS

# CLIP's pixel statistics (RGB, 0..1 scale).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class SanConfig:
    """Everything that shapes a SAN model; a checkpoint we write stores this as a dict."""

    clip: dict[str, Any] = field(default_factory=lambda: dict(CLIP_CONFIGS["ViT-B-16"]))
    # CLIP branch
    clip_resolution: float = 0.5  # the CLIP branch sees the image scaled by this factor
    feature_last_layer: int = 9  # CLIP blocks [0, k) feed the side adapter, [k, end) recognise masks
    # side adapter ViT (timm vit_w240n6d8_patch16 without cls token and final norm)
    side_width: int = 240
    side_depth: int = 8
    side_heads: int = 6
    side_patch: int = 16
    side_image_size: int = 640
    num_queries: int = 100
    fusion_map: tuple[tuple[int, int], ...] = ((0, 0), (3, 1), (6, 2), (9, 3))  # (CLIP layer, side block)
    deep_supervision: tuple[int, ...] = (7, 8)
    # attention-bias decoder
    bias_heads: int = 12
    bias_layers: int = 1
    bias_embed: int = 256
    bias_mlp: int = 256
    bias_mlp_layers: int = 3
    rescale_bias: bool = True
    bias_downsample: str = "max"
    # training-side buffers the official checkpoints carry
    num_train_classes: int = 171
    no_object_weight: float = 0.1
    # inference
    size_divisibility: int = 32
    templates: str = "vild"
    min_size_test: int = 640
    max_size_test: int = 2560

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fusion_map"] = [list(p) for p in self.fusion_map]
        d["deep_supervision"] = list(self.deep_supervision)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SanConfig":
        d = dict(d)
        if "fusion_map" in d:
            d["fusion_map"] = tuple(tuple(int(v) for v in p) for p in d["fusion_map"])
        if "deep_supervision" in d:
            d["deep_supervision"] = tuple(int(v) for v in d["deep_supervision"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_clip(self, clip: dict[str, Any]) -> "SanConfig":
        return replace(self, clip=dict(clip))


SAN_CONFIGS: dict[str, SanConfig] = {
    "san-vit-b16": SanConfig(),
    "san-vit-l14": SanConfig(
        clip=dict(CLIP_CONFIGS["ViT-L-14-336"]),
        clip_resolution=0.7,
        feature_last_layer=18,
        fusion_map=((0, 0), (6, 1), (12, 2), (18, 3)),
        bias_heads=16,
    ),
}


def get_san_config(name: str) -> SanConfig:
    from ...errors import UsageError

    try:
        return SAN_CONFIGS[name]
    except KeyError:
        raise UsageError(f"unknown SAN model {name!r}; choose one of {', '.join(SAN_CONFIGS)}") from None
