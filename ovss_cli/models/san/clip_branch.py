"""SAN's two views of the frozen CLIP image encoder.

:class:`ClipFeatureExtractor` runs CLIP's first k blocks and exposes their token maps to the
side adapter; :class:`RecWithAttnBiasHead` runs the remaining blocks with one extra [SOS]
token per query whose attention to the image is steered by the side adapter's biases.
"""
from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn import functional as F

from ...clip.model import sequence_first
from .attention import matmul_attention


def resize_positional_embedding(pos: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """Bicubic resize of a (1 + H*W) x C positional embedding from grid ``src`` to ``dst``."""
    if src == dst:
        return pos
    cls_pos, grid = pos[:1], pos[1:]
    grid = grid.T.reshape(1, -1, *src)
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, grid.reshape(-1, dst[0] * dst[1]).T], dim=0)


class ClipFeatureExtractor(nn.Module):
    """CLIP's patch embedding and blocks [0, k): returns the token sequence after each block."""

    def __init__(self, visual: VisionTransformer, last_layer: int):
        super().__init__()
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.resblocks = sequence_first(nn.ModuleList(list(visual.transformer.resblocks)[:last_layer]))
        self.grid_size = tuple(visual.grid_size)
        self.width = int(visual.class_embedding.shape[0])

    def forward(self, x: Tensor, keep: set[int]) -> tuple[dict[int, Tensor], tuple[int, int]]:
        """Token sequences ((1+HW) x B x C, sequence-first) after the blocks listed in ``keep``
        (0 = the input to the first block)."""
        x = self.conv1(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_positional_embedding(self.positional_embedding.to(x.dtype), self.grid_size, grid)
        x = self.ln_pre(x).permute(1, 0, 2)
        out = {0: x} if 0 in keep else {}
        # bf16 on a CPU: plain matmul attention beats the fused CPU kernel for these short sequences
        matmuls = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        for i, block in enumerate(self.resblocks, start=1):
            x = clip_block(block, x, matmuls=matmuls)
            if i in keep:
                out[i] = x
        return out, grid


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """(1+HW) x B x C token sequence -> B x C x H x W patch map (class token dropped)."""
    return tokens[1:].permute(1, 2, 0).reshape(tokens.shape[1], -1, *grid)


def _plain_self_attention_block(block: nn.Module) -> bool:
    """Whether ``block`` is an open_clip ResidualAttentionBlock that :func:`clip_block`
    reproduces (packed qkv, no bias_k/v, no zero attention, sequence-first, no cross-attention
    norm)."""
    attn = getattr(block, "attn", None)
    return (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and not attn.batch_first
            and attn.bias_k is None and not attn.add_zero_attn and not hasattr(block, "ln_1_kv")
            and all(hasattr(block, name) for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")))


def clip_block(block: nn.Module, x: Tensor, attn_mask: Tensor | None = None, rows: int | None = None,
               matmuls: bool = False) -> Tensor:
    """``block(x, attn_mask=attn_mask)[:rows]`` for a CLIP block on L x B x C (sequence-first)
    input, computing only the first ``rows`` positions (all when None): every position still
    gives keys and values, but only those rows are attended from and go through the output
    projection and the MLP (the recognition head reads only its query tokens after its last
    block). ``attn_mask`` is (B * heads) x L x L or L x L, additive.

    By default the attention takes nn.MultiheadAttention's own steps (packed in-projection,
    ``scaled_dot_product_attention``, out-projection), so the rows are the full block's up to
    float rounding. With ``matmuls`` it is :func:`~.attention.matmul_attention` (plain matmuls,
    scores, mask and softmax in fp32), the fast and precise choice under autocast on a CPU.
    Differentiable either way.
    """
    if not _plain_self_attention_block(block):
        return block(x, attn_mask=attn_mask)[:rows]
    if rows is None and not matmuls:
        return block(x, attn_mask=attn_mask)
    attn = block.attn
    length, batch, width = x.shape
    rows = length if rows is None else rows
    heads = attn.num_heads
    head_dim = width // heads
    normed = block.ln_1(x)
    proj = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.to(normed.dtype)
        mask = mask.view(1 if mask.dim() == 2 else batch, -1, length, length)[:, :, :rows]
    if matmuls:
        q, k, v = (t.reshape(-1, batch, heads, head_dim).permute(1, 2, 0, 3) for t in proj.split(width, dim=-1))
        out = matmul_attention(q[:, :, :rows], k, v, head_dim**-0.5, mask)
    else:  # nn.MultiheadAttention's arithmetic, step by step
        q, k, v = proj.unflatten(-1, (3, width)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q = q[:rows].view(rows, batch * heads, head_dim).transpose(0, 1).view(batch, heads, rows, head_dim)
        k = k.view(length, batch * heads, head_dim).transpose(0, 1).view(batch, heads, length, head_dim)
        v = v.view(length, batch * heads, head_dim).transpose(0, 1).view(batch, heads, length, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, mask, attn.dropout if attn.training else 0.0)
    out = out.permute(2, 0, 1, 3).reshape(rows * batch, width)
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias).view(rows, batch, width)
    y = x[:rows] + block.ls_1(out)
    return y + block.ls_2(block.mlp(block.ln_2(y)))


class RecWithAttnBiasHead(nn.Module):
    """CLIP blocks [k, end) + final norm/projection, classifying one [SOS] token per query."""

    def __init__(self, visual: VisionTransformer, first_layer: int, num_queries: int, downsample: str = "max"):
        super().__init__()
        self.resblocks = sequence_first(nn.ModuleList(list(visual.transformer.resblocks)[first_layer:]))
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.num_queries = num_queries
        self.downsample = downsample
        self.heads = self.resblocks[0].attn.num_heads

    def _attention_mask(self, bias: Tensor, grid: tuple[int, int]) -> Tensor:
        """Attention mask for [SOS x Q, CLS, patches]: image tokens ignore the SOS tokens, each
        SOS token sees itself and the patches through its bias, not the other SOS or CLS."""
        b, heads, q, h, w = bias.shape
        bias = bias.reshape(b, heads * q, h, w)
        if self.downsample == "max":
            bias = F.adaptive_max_pool2d(bias, grid)
        elif self.downsample == "avg":
            bias = F.adaptive_avg_pool2d(bias, grid)
        else:
            bias = F.interpolate(bias, size=grid, mode=self.downsample, align_corners=False)
        bias = bias.reshape(b, heads, q, grid[0] * grid[1])
        if heads == 1:
            bias = bias.expand(-1, self.heads, -1, -1)
        elif heads != self.heads:
            raise ValueError(f"attention bias has {heads} heads, CLIP has {self.heads}")
        bias = bias.reshape(b * self.heads, q, -1)
        n = bias.shape[-1]
        total = q + 1 + n
        mask = bias.new_zeros(total, total)
        mask[:, :q] = -100.0
        mask[torch.arange(q), torch.arange(q)] = 0.0
        mask[:q, q] = -100.0
        mask = mask[None].repeat(b * self.heads, 1, 1)
        mask[:, :q, -n:] = bias
        return mask

    def forward(self, tokens: Tensor, grid: tuple[int, int], biases: list[Tensor]) -> Tensor:
        """tokens: (1+HW) x B x C from layer k; biases: one B x heads x Q x H' x W' map for all
        blocks, or one per block -> B x Q x D query embeddings (unit norm)."""
        sos = tokens[:1].repeat(self.num_queries, 1, 1)
        x = torch.cat([sos, tokens], dim=0)
        masks = [self._attention_mask(b, grid).to(x.dtype) for b in biases]
        if len(masks) == 1:
            masks = masks * len(self.resblocks)
        # Under autocast the biases go into fp32 scores (bf16 would round them, and the class
        # logits move visibly); the query embeddings are projected in fp32 for the same reason.
        autocast = torch.is_autocast_enabled(x.device.type)
        last = len(self.resblocks) - 1
        for i, (block, mask) in enumerate(zip(self.resblocks, masks)):
            # only the query tokens are read after the last block
            x = clip_block(block, x, mask, rows=self.num_queries if i == last else None, matmuls=autocast)
        with torch.autocast(x.device.type, enabled=False):
            sos = self.ln_post(x[: self.num_queries].permute(1, 0, 2).float())
            return F.normalize(sos @ self.proj.float(), dim=-1)
