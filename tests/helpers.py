"""Small seeded models and synthetic inputs for tests (no downloads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# A CLIP small enough for fast CPU tests (the real tokenizer needs vocab_size 49408).
TINY_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_san_config():
    from ovss_cli.models.san.config import SanConfig

    return SanConfig(
        clip=TINY_CLIP,
        feature_last_layer=3,
        side_width=48,
        side_depth=2,
        side_heads=2,
        num_queries=10,
        fusion_map=((0, 0), (1, 1), (2, 2)),
        deep_supervision=(1, 2),
        bias_heads=4,
        bias_embed=32,
        bias_mlp=32,
        num_train_classes=5,
    )


def write_seeded_san(path: Path, seed: int = 0) -> Path:
    from ovss_cli.models.san.checkpoint import build_random_san, save_san_checkpoint

    save_san_checkpoint(build_random_san(tiny_san_config(), seed=seed), path)
    return path


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
