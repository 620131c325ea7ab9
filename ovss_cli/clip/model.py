"""Building CLIP from an open_clip model config, and CLIP's text tower as checkpoints name it.

Configs are plain open_clip model-config dicts (``embed_dim``, ``vision_cfg``, ``text_cfg``,
``quick_gelu``). The built-in ones below are OpenAI's released CLIPs, which use QuickGELU.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import open_clip
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UsageError

# OpenAI CLIP architectures (open_clip's ViT-B-16 / ViT-L-14 / ViT-L-14-336 with QuickGELU,
# as open_clip builds them for the "openai" pretrained tag).
CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-B-16": {
        "embed_dim": 512,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    },
    "ViT-L-14": {
        "embed_dim": 768,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
    },
    "ViT-L-14-336": {
        "embed_dim": 768,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
    },
}


def load_clip_config(spec: str | Path | Mapping[str, Any] | None, default: str | None = None) -> dict[str, Any]:
    """An open_clip model config from a dict, a JSON file path, or a built-in name."""
    if spec is None:
        if default is None:
            raise UsageError("no CLIP config given")
        spec = default
    if isinstance(spec, Mapping):
        config = copy.deepcopy(dict(spec))
    elif str(spec) in CLIP_CONFIGS:
        config = copy.deepcopy(CLIP_CONFIGS[str(spec)])
    else:
        from ..io.text_files import read_user_text

        path = Path(spec)
        text = read_user_text(path, "CLIP config",
                              hint=f"pass an open_clip model config JSON file or one of {', '.join(CLIP_CONFIGS)}")
        try:
            config = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"cannot read CLIP config {path}: {err}") from None
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in config:
            raise UsageError(f"CLIP config lacks {key!r}; an open_clip model config has embed_dim, vision_cfg, text_cfg")
    return config


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation ``x * sigmoid(1.702 x)``, computed with one temporary
    instead of three (the same numbers as open_clip's QuickGELU, less memory traffic).

    The in-place steps would break backward, so when autograd records (training: gradients
    flow through frozen CLIP blocks to the attention biases) it computes the same product out
    of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(x * 1.702)
        return x.mul(1.702).sigmoid_().mul_(x)


def _lean_activations(model: nn.Module) -> nn.Module:
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, open_clip.transformer.QuickGELU):
                setattr(module, name, QuickGELU())
    return model


def build_clip(config: Mapping[str, Any]) -> open_clip.model.CLIP:
    """An open_clip CLIP (random init) for ``config``; callers load weights into its parts."""
    cfg = dict(config)
    try:
        return _lean_activations(open_clip.model.CLIP(
            embed_dim=cfg["embed_dim"],
            vision_cfg=dict(cfg["vision_cfg"]),
            text_cfg=dict(cfg["text_cfg"]),
            quick_gelu=bool(cfg.get("quick_gelu", False)),
        ))
    except (TypeError, ValueError, AssertionError) as err:
        raise UsageError(f"invalid CLIP config: {err}") from None


def sequence_first(blocks: nn.Module) -> nn.Module:
    """Make every attention layer in ``blocks`` take L x N x C input (as open_clip < 2.21 did).

    nn.MultiheadAttention then runs its reference (non-fused) path, whose arithmetic the
    official SAN / Alpha-CLIP outputs were produced with; callers pass sequence-first tensors.
    """
    for module in blocks.modules():
        if isinstance(module, nn.MultiheadAttention):
            module.batch_first = False
    return blocks


class ClipTextTower(nn.Module):
    """CLIP's text encoder with the parameter names of OpenAI checkpoints.

    ``attn_mask`` (the causal mask) is a persistent buffer because the SAN checkpoints carry it.
    """

    def __init__(self, clip: open_clip.model.CLIP):
        super().__init__()
        self.transformer = sequence_first(clip.transformer)
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale
        self.register_buffer("attn_mask", clip.attn_mask.clone())

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text features at each sequence's end-of-text token (the largest token id).

        The causal mask means no position sees the padding after it, so the batch is cut to
        its longest prompt: the same features up to float rounding, for a fraction of the work.
        """
        eot = tokens.argmax(dim=-1)
        n = int(eot.max()) + 1
        tokens = tokens[:, :n]
        x = self.token_embedding(tokens)
        x = x + self.positional_embedding[:n].to(x.dtype)
        x = x.permute(1, 0, 2)  # sequence-first, see sequence_first()
        mask = self.attn_mask[:n, :n]
        for block in self.transformer.resblocks:
            x = block(x, attn_mask=mask)
        x = self.ln_final(x.permute(1, 0, 2))
        x = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """CLIP BPE tokens (lower-cased, cleaned, truncated to ``context_length``)."""
    return open_clip.tokenize(texts, context_length=context_length)


def token_count(text: str) -> int:
    """How many tokens ``text`` takes in CLIP's context, start and end tokens included."""
    from open_clip.tokenizer import SimpleTokenizer

    global _counter
    if _counter is None:
        _counter = SimpleTokenizer()
    return len(_counter.encode(text)) + 2


_counter = None
