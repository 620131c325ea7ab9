"""Alpha-CLIP: CLIP's ViT with a second patch projection for a 1-channel alpha (mask) input.

Built on open_clip. The visual tower loads the released Alpha-CLIP checkpoints (keys
``conv1_alpha.weight``, attention projections ``attn.in_proj.weight``) with exact key
matching; the text tower is OpenAI CLIP's, loaded from an OpenAI or open_clip state dict.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn import functional as F

from ...clip.model import ClipTextTower, build_clip, load_clip_config, sequence_first, tokenize
from ...errors import WeightsError

# Keys of OpenAI's JIT checkpoints that are not parameters.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


# How the visual tower computes attention: "sdpa" is nn.MultiheadAttention's own path (the
# parity path, and the fast one on GPUs); "bmm" is per-head batched matmuls, which on a CPU in
# bf16 beat the fused CPU kernel for CLIP's short (197-token) sequences.
ATTENTION_KERNELS = ("sdpa", "bmm")


class AlphaClipVisual(nn.Module):
    """CLIP ViT image encoder whose patch embedding adds ``conv1_alpha(alpha)``."""

    def __init__(self, visual: VisionTransformer):
        super().__init__()
        width = int(visual.class_embedding.shape[0])
        patch = visual.conv1.kernel_size
        self.conv1 = visual.conv1
        self.conv1_alpha = nn.Conv2d(1, width, kernel_size=patch, stride=patch, bias=False)
        nn.init.zeros_(self.conv1_alpha.weight)
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.transformer = sequence_first(visual.transformer)
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.image_size = int(visual.image_size[0])
        self.attention = "sdpa"  # one of ATTENTION_KERNELS

    def forward(self, pixels: Tensor, alpha: Tensor) -> Tensor:
        """pixels: B x 3 x S x S (CLIP-normalised), alpha: B x 1 x S x S (normalised mask)
        -> B x D image features (unnormalised, like the official model)."""
        x = self.conv1(pixels) + self.conv1_alpha(alpha)
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)  # B x L x C
        *body, last = self.transformer.resblocks
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {self.attention!r}; one of {ATTENTION_KERNELS}")
        if self.attention == "bmm":
            for block in body:
                x = x + block.ls_1(bmm_attention(block.attn, block.ln_1(x)))
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
            cls_out = class_token_block(last, x, bmm_attention, token_dim=1)
        else:
            x = x.permute(1, 0, 2)  # L x B x C: the blocks' attention is sequence-first
            for block in body:
                x = block(x)
            cls_out = class_token_block(last, x, mha_attention, token_dim=0)
        return self.ln_post(cls_out) @ self.proj


def mha_attention(attn: nn.MultiheadAttention, query: Tensor, tokens: Tensor | None = None) -> Tensor:
    """``attn`` by nn.MultiheadAttention itself (sequence-first inputs)."""
    tokens = query if tokens is None else tokens
    return attn(query, tokens, tokens, need_weights=False)[0]


def bmm_attention(attn: nn.MultiheadAttention, query: Tensor, tokens: Tensor | None = None) -> Tensor:
    """``attn`` as one batched matmul pair per head on batch-first inputs (B x L x C).

    The heads are strided views of the projections, so nothing is copied head-major; scores
    and softmax stay in the compute dtype (bf16 under autocast)."""
    width = query.shape[-1]
    head = width // attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if tokens is None:
        q, k, v = F.linear(query, weight, bias).split(width, dim=-1)
    else:
        q = F.linear(query, weight[:width], bias[:width])
        k, v = F.linear(tokens, weight[width:], bias[width:]).split(width, dim=-1)
    q = q * head**-0.5
    heads = [slice(i * head, (i + 1) * head) for i in range(attn.num_heads)]
    out = [torch.bmm(torch.bmm(q[..., h], k[..., h].transpose(1, 2)).softmax(-1), v[..., h]) for h in heads]
    return F.linear(torch.cat(out, dim=-1), attn.out_proj.weight, attn.out_proj.bias)


Attention = Callable[[nn.MultiheadAttention, Tensor, Tensor | None], Tensor]


def class_token_block(block: nn.Module, x: Tensor, attention: Attention, token_dim: int) -> Tensor:
    """The last residual block's output for the class token only (B x C).

    Only the class token leaves the tower, so the last block's queries, output projection and
    MLP are computed for it alone; its attention still reads every token. The full block's class
    token up to float rounding, for about a twelfth less work in a ViT-B."""
    h = block.ln_1(x)
    y = x.narrow(token_dim, 0, 1) + block.ls_1(attention(block.attn, h.narrow(token_dim, 0, 1), h))
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return y.select(token_dim, 0)


class AlphaClip(nn.Module):
    """Alpha-CLIP image encoder + CLIP text encoder."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        clip = build_clip(config)
        self.visual = AlphaClipVisual(clip.visual)
        self.text = ClipTextTower(clip)

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def logit_scale(self) -> Tensor:
        return self.text.logit_scale

    def encode_image(self, pixels: Tensor, alpha: Tensor) -> Tensor:
        return self.visual(pixels, alpha)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Unnormalised text features of ``prompts`` (strings)."""
        tokens = tokenize(list(prompts), self.text.context_length).to(self.text.positional_embedding.device)
        return self.text.encode_text(tokens)


def infer_clip_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The open_clip config of an OpenAI-style CLIP ViT state dict (heads = width / 64, as
    OpenAI's models; QuickGELU)."""
    try:
        width = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
        text_width = state["ln_final.weight"].shape[0]
        text_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
        return {
            "embed_dim": int(state["text_projection"].shape[1]),
            "quick_gelu": True,
            "vision_cfg": {"image_size": int(patch * grid), "layers": layers, "width": int(width),
                           "patch_size": int(patch), "head_width": 64},
            "text_cfg": {"context_length": int(state["positional_embedding"].shape[0]),
                         "vocab_size": int(state["token_embedding.weight"].shape[0]),
                         "width": int(text_width), "heads": max(1, int(text_width) // 64), "layers": text_layers},
        }
    except (KeyError, IndexError) as err:
        raise WeightsError(f"not an OpenAI/open_clip CLIP ViT state dict (missing {err})") from None


@torch.no_grad()
def round_through_fp16(module: nn.Module) -> None:
    """Round conv/linear/attention weights and the projections to fp16 precision, in place.

    The official Alpha-CLIP loader converts CLIP to fp16 before loading weights into it (its
    ``convert_weights``) and back to fp32 on the CPU, so CLIP's towers run with fp16-rounded
    weights. OpenAI's released weights are fp16 already (a no-op for them); for any other
    checkpoint this reproduces the official numbers.
    """
    for mod in module.modules():
        tensors = []
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            tensors += [mod.weight, mod.bias]
        if isinstance(mod, nn.MultiheadAttention):
            tensors += [mod.in_proj_weight, mod.in_proj_bias]
        for name in ("text_projection", "proj"):
            value = getattr(mod, name, None)
            if isinstance(value, Tensor):
                tensors.append(value)
        for t in tensors:
            if t is not None and t.is_floating_point():
                t.copy_(t.half().float())


def alpha_visual_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released Alpha-CLIP visual keys -> our module's (``attn.in_proj.*`` -> ``attn.in_proj_*``)."""
    return {re.sub(r"attn\.in_proj\.(weight|bias)$", r"attn.in_proj_\1", k): v for k, v in state.items()}


def _unwrap(state: Any, source: str, expected: str = "a CLIP or Alpha-CLIP checkpoint") -> dict[str, Tensor]:
    from ...weights import checkpoint_kind

    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        kind = checkpoint_kind(state)
        raise WeightsError(f"{source} is {kind}, not {expected}" if kind else
                           f"{source} does not hold a state dict of tensors ({expected} does)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_alpha_clip(
    clip_weights: str | Path,
    alpha_weights: str | Path | Mapping[str, Tensor] | None,
    device: str | torch.device = "cpu",
    clip_config: Mapping[str, Any] | str | None = None,
    alpha_source: str | None = None,
) -> AlphaClip:
    """Alpha-CLIP from a CLIP checkpoint (OpenAI or open_clip format: text tower, and the visual
    tower when ``alpha_weights`` is None) and a released Alpha-CLIP visual checkpoint (a path, or
    its already-loaded state dict, named in errors by ``alpha_source``)."""
    from ...weights import load_state_file, load_state_strict

    clip_state = _unwrap(load_state_file(clip_weights), str(clip_weights), "a CLIP checkpoint (--clip-weights)")
    for key in _OPENAI_EXTRA_KEYS:
        clip_state.pop(key, None)
    config = load_clip_config(clip_config) if clip_config is not None else infer_clip_config(clip_state)
    with torch.device("meta"):
        model = AlphaClip(config)
    text_state = {k: v for k, v in clip_state.items() if not k.startswith("visual.")}
    text_state["attn_mask"] = torch.full((config["text_cfg"]["context_length"],) * 2, float("-inf")).triu_(1)
    load_state_strict(model.text, text_state, str(clip_weights), "a CLIP text encoder")
    round_through_fp16(model.text)
    if alpha_weights is not None:
        raw = alpha_weights if isinstance(alpha_weights, Mapping) else load_state_file(alpha_weights)
        source = alpha_source or (str(alpha_weights) if not isinstance(alpha_weights, Mapping) else "Alpha-CLIP weights")
        visual_state = alpha_visual_state(_unwrap(dict(raw), source, "an Alpha-CLIP visual checkpoint (--weights)"))
        load_state_strict(model.visual, visual_state, source, "an Alpha-CLIP visual checkpoint")
    else:  # plain CLIP with a zero alpha projection (what Alpha-CLIP starts from)
        visual_state = {k.removeprefix("visual."): v for k, v in clip_state.items() if k.startswith("visual.")}
        visual_state["conv1_alpha.weight"] = torch.zeros(
            (visual_state["conv1.weight"].shape[0], 1, *visual_state["conv1.weight"].shape[2:])
        )
        load_state_strict(model.visual, visual_state, str(clip_weights), "a CLIP visual encoder")
        round_through_fp16(model.visual)
    return model.eval().requires_grad_(False).to(device)
