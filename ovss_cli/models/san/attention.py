"""Attention kernels for SAN's inference fast paths.

PyTorch's fused CPU kernel (``scaled_dot_product_attention``) is neither the fastest choice on a
CPU for SAN's shapes nor the official operation order, so SAN's blocks use these instead where
they pay off (see :mod:`.side_adapter` and :mod:`.clip_branch` for when):

- :func:`attention_by_rows`: the side adapter's explicit ``softmax(q k^T * scale) v``, one head
  and a block of query rows at a time, so the scores stay in the CPU's cache (inference only);
- :func:`matmul_attention`: plain matmuls with the scores, the additive mask and the softmax in
  fp32 whatever the compute dtype, for CLIP's blocks under autocast (the recognition head's mask
  carries the side adapter's attention biases, which bf16 would round).
"""
from __future__ import annotations

import torch
from torch import Tensor

# Query rows of one head computed at a time by attention_by_rows: 256 rows of scores (2.3 MB in
# fp32 for a 640 x 864 image) stay in the cache, where the whole heads x N x N matrix (123 MB)
# would go through memory three times.
ATTENTION_ROWS = 256
MIN_ROWS = 16


def attention_by_rows(q: Tensor, k: Tensor, v: Tensor, scale: float | None, rows: int = ATTENTION_ROWS) -> Tensor:
    """``softmax(q k^T * scale) v`` for B x heads x N x d inputs, one head and ``rows`` queries
    at a time, returned as B x N x heads x d (ready for the output projection); ``scale=None``
    for queries already scaled.

    Each row goes through the operations of the dense expression in the same order (matmul,
    scale, softmax, matmul), so in fp32 the numbers are the dense expression's (bit for bit with
    the MKL here, rounding at worst); only the memory traffic differs. The blocks are of equal
    size and never tiny (BLAS libraries switch kernels for a handful of rows). Writes into a
    preallocated output: inference only (no autograd).
    """
    b, heads, n, _ = q.shape
    rows = max(MIN_ROWS, -(-n // -(-n // rows)))  # equal blocks of about ``rows``
    out = q.new_empty(b, n, heads, v.shape[-1])
    for i in range(b):
        for j in range(heads):
            keys_t, values = k[i, j].transpose(0, 1), v[i, j]
            for start in range(0, n, rows):
                scores = torch.mm(q[i, j, start : start + rows], keys_t)
                if scale is not None:
                    scores.mul_(scale)
                torch.mm(scores.softmax(dim=-1), values, out=out[i, start : start + rows, j])
    return out


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` for B x heads x R x d queries and B x heads x L x d
    keys/values (mask broadcastable to B x heads x R x L) -> B x heads x R x d.

    The two products run in the inputs' dtype (bf16 under autocast); with a mask, the scores are
    taken to fp32 before it is added, and the softmax runs in fp32. Differentiable.
    """
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if mask is None:
        weights = scores.softmax(dim=-1)
    else:
        weights = scores.float().add_(mask.float()).softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v)
