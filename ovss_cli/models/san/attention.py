"""Attention for CLIP's blocks in SAN under autocast.

PyTorch's fused CPU kernel (``scaled_dot_product_attention``) is slower on a CPU in bf16 than
plain matmuls for CLIP's short sequences (541 image tokens, 641 with the recognition head's
queries), and it would take the recognition head's additive mask, which carries the side
adapter's attention biases, in bf16. :func:`matmul_attention` keeps the scores, the mask and the
softmax in fp32 and runs the two products in the compute dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


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
