"""SAM's image encoder with its global attention computed a band of queries at a time.

``ImageEncoderViT`` materialises each global-attention block's full attention map (heads x
4096 x 4096 floats: 805 MB for ViT-B, 1 GB for ViT-H) and two more of that size for the
relative-position terms, so one forward holds about 2.5 GB at its peak. Every query's row of
the map depends only on that query, so computing the rows for a band of query positions at a
time gives the same numbers in a fraction of the memory (and with the map in the cache).
Windowed blocks, the MLPs and the neck are the encoder's own modules.
"""
from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from torch import Tensor

from .proposals import AutocastImageEncoder
from ...runtime import autocast

# Query positions per band of the global attention (a band's map is heads x 512 x 4096).
QUERY_BAND = 512


def banded_attention(attn: Attention, x: Tensor, band: int = QUERY_BAND) -> Tensor:
    """``attn(x)`` for B x H x W x C tokens, the attention map computed ``band`` queries at a
    time (whole rows of the token grid), with the module's own operations in its order."""
    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
    if attn.use_rel_pos:
        rel_h = get_rel_pos(h, h, attn.rel_pos_h)
        rel_w = get_rel_pos(w, w, attn.rel_pos_w)
    rows = max(1, band // w)
    out = []
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        qb = q[:, r0 * w : r1 * w]
        a = (qb * attn.scale) @ k.transpose(-2, -1)
        if attn.use_rel_pos:  # add_decomposed_rel_pos for these query rows, in place
            r_q = qb.reshape(b * heads, r1 - r0, w, -1)
            term_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h[r0:r1])
            term_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w)
            a5 = a.view(b * heads, r1 - r0, w, h, w)
            a = a5.add_(term_h[:, :, :, :, None]).add_(term_w[:, :, :, None, :]).view(b * heads, (r1 - r0) * w, h * w)
        out.append(a.softmax(dim=-1) @ v)
    x = torch.cat(out, 1).view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(x)


def _block(block: Block, x: Tensor) -> Tensor:
    if block.window_size > 0:
        return block(x)
    x = x + banded_attention(block.attn, block.norm1(x))
    return x + block.mlp(block.norm2(x))


@torch.no_grad()
def encode_image(encoder: ImageEncoderViT | AutocastImageEncoder, x: Tensor) -> Tensor:
    """The image embedding (1 x 256 x 64 x 64) of a preprocessed 1024 x 1024 input; an
    :class:`AutocastImageEncoder` runs under its autocast and returns fp32, as it does itself."""
    if isinstance(encoder, AutocastImageEncoder):
        with autocast(encoder.device_, encoder.precision):
            return encode_image(encoder.encoder, x).float()
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks:
        x = _block(block, x)
    return encoder.neck(x.permute(0, 3, 1, 2))
