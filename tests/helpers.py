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


# A small Alpha-CLIP (OpenAI-format CLIP + Alpha-CLIP visual) and a small SAM, both seeded.
TINY_ALPHA_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def write_seeded_alpha_clip(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(clip checkpoint in OpenAI format, Alpha-CLIP visual checkpoint in the released format)."""
    import torch

    from ovss_cli.clip.model import build_clip

    torch.manual_seed(seed)
    clip = build_clip(TINY_ALPHA_CLIP)
    state = {k: v for k, v in clip.state_dict().items()}
    clip_path = folder / "tiny-openai-clip.pt"
    torch.save(state, clip_path)
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    visual = {k.replace("attn.in_proj_weight", "attn.in_proj.weight").replace("attn.in_proj_bias", "attn.in_proj.bias"): v
              for k, v in visual.items()}
    visual["conv1_alpha.weight"] = torch.randn(64, 1, 32, 32) * 0.02
    alpha_path = folder / "tiny-alpha-visual.pth"
    torch.save(visual, alpha_path)
    return clip_path, alpha_path


def write_seeded_sam(path: Path, seed: int = 0) -> Path:
    import torch

    from ovss_cli.models.sam_alphaclip.proposals import SamArch, build_sam

    torch.manual_seed(seed)
    torch.save(build_sam(SamArch(32, 2, 2, (1,))).state_dict(), path)
    return path
