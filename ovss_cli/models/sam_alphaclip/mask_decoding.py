"""SAM's mask decoder run for many point prompts on one image.

Same weights and the same arithmetic as ``MaskDecoder.forward`` up to float rounding, arranged
for a batch of prompts that share one image embedding:

- the first layer's image-side projections (the image's keys and values for the tokens'
  attention, the image's queries for the attention back) are computed once, not per prompt;
- attention between the 7 prompt tokens and the 4096 image tokens never projects the image
  tokens: the projection is applied to the few tokens instead (``q . W x == (W^T q) . x``), and
  the output projection is folded into the tokens' values; the residual is added by the same
  matrix product;
- the two 2x2 stride-2 transposed convolutions of the output upscaling are matrix products on
  channels-last features, and only the part of the low-resolution mask that maps into the
  image (not SAM's padding) is upscaled.

Only the three multimask outputs (what the automatic mask generator asks for) are returned.
"""
from __future__ import annotations

import math

import torch
from segment_anything.modeling import MaskDecoder, Sam
from segment_anything.modeling.transformer import Attention
from torch import Tensor
from torch.nn import functional as F


def _heads(x: Tensor, heads: int) -> Tensor:
    """(..., heads * d) -> (..., heads, d)."""
    return x.unflatten(-1, (heads, -1))


def _token_to_image(attn: Attention, q: Tensor, values: Tensor, keys: Tensor,
                    shared: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Prompt tokens (B x T x C) attend to the image tokens: ``keys`` (image + positional
    encoding) and ``values``, B x N x C; or ``shared``: the image's projected keys and values
    (h x d x N, h x N x d) when every prompt sees the same image."""
    h = attn.num_heads
    qh = _heads(attn.q_proj(q), h)  # B T h d
    b, t, _, d = qh.shape
    scale = 1 / math.sqrt(d)
    if shared is not None:  # one product per head for all prompts: (B T) x d times d x N
        k, v = shared
        logits = torch.bmm(qh.permute(2, 0, 1, 3).reshape(h, b * t, d) * scale, k)
        out = torch.bmm(logits.softmax(-1), v).view(h, b, t, d).permute(1, 2, 0, 3)  # B T h d
    else:
        c = values.shape[-1]
        # logits = q . (Wk x + bk): project the tokens' queries back instead of the image; q . bk
        # is the same for every image token, which the softmax over them ignores
        qk = torch.einsum("bthd,hdc->bhtc", qh * scale, attn.k_proj.weight.view(h, d, c)).reshape(b, h * t, c)
        weights = torch.bmm(qk, keys.transpose(1, 2)).softmax(-1)
        # weights @ (Wv x + bv) == (weights @ x) Wv^T + bv (each row of weights sums to 1)
        pooled = torch.bmm(weights, values).view(b, h, t, c)
        out = torch.einsum("bhtc,hdc->bthd", pooled, attn.v_proj.weight.view(h, d, c)) + attn.v_proj.bias.view(h, d)
    return attn.out_proj(out.flatten(2))


def _image_to_token_residual(attn: Attention, image: Tensor, keys: Tensor, q: Tensor, v: Tensor,
                             shared: Tensor | None = None) -> Tensor:
    """``image`` + (the image tokens attend to the prompt tokens): B x N x C (``image`` may be
    1 x N x C). ``keys`` is the image plus its positional encoding; ``shared``: the image's
    projected queries (h x N x d, scaled), when every prompt sees the same image."""
    h = attn.num_heads
    kh = _heads(attn.k_proj(q), h)  # B T h d
    vh = _heads(attn.v_proj(v), h)
    b, t, _, d = kh.shape
    c = image.shape[-1]
    scale = 1 / math.sqrt(d)
    if shared is not None:  # one product per head for all prompts
        logits = torch.bmm(kh.permute(2, 0, 1, 3).reshape(h, b * t, d), shared.transpose(1, 2))
        logits = logits.view(h, b, t, -1).transpose(0, 1)  # B h T N
    else:
        kq = torch.einsum("bthd,hdc->bhtc", kh, attn.q_proj.weight.view(h, d, c)).reshape(b, h * t, c)
        bias = torch.einsum("bthd,hd->bht", kh, attn.q_proj.bias.view(h, d)).reshape(b, h * t, 1)
        logits = torch.baddbmm(bias * scale, kq, keys.transpose(1, 2), alpha=scale).view(b, h, t, -1)
    weights = logits.softmax(2).view(b, h * t, -1)  # over the tokens of each head
    # the output projection folded into the values; its bias spread over the heads' weights
    # (each head's weights sum to 1 at every image token)
    vo = torch.einsum("bthd,chd->bhtc", vh, attn.out_proj.weight.view(c, h, d)).reshape(b, h * t, c)
    vo = vo + attn.out_proj.bias / h
    if image.shape[0] == 1:
        return torch.bmm(weights.transpose(1, 2), vo).add_(image)
    return image.baddbmm_(weights.transpose(1, 2), vo)


def _upscale(decoder: MaskDecoder, image: Tensor, hyper: Tensor, grid: tuple[int, int],
             keep: tuple[int, int]) -> Tensor:
    """Low-resolution mask logits (B x M x 4*kh x 4*kw) for the top-left ``keep`` = (kh, kw)
    cells of the ``grid`` of image tokens ``image`` (B x N x C), from the mask tokens'
    hypernetwork outputs ``hyper`` (B x M x C/8)."""
    conv1, norm, act1, conv2, act2 = decoder.output_upscaling
    b, _, c = image.shape
    kh, kw = keep
    x = image.view(b, *grid, c)[:, :kh, :kw].reshape(-1, c)
    c1, c2 = conv1.out_channels, conv2.out_channels
    # a 2x2 stride-2 transposed convolution maps each cell to 2x2 outputs: one matrix product
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)
    x = torch.addmm(conv1.bias.repeat(4), x, w1).view(-1, c1)
    x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))  # LayerNorm2d over channels
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    x = act2(torch.addmm(conv2.bias.repeat(4), x, w2)).view(b, -1, c2)
    m = hyper.shape[1]
    masks = torch.bmm(hyper, x.transpose(1, 2))  # B x M x (kh kw 2 2 2 2): cell, then the two 2x2 steps
    masks = masks.view(b, m, kh, kw, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
    return masks.reshape(b, m, 4 * kh, 4 * kw)


class PromptDecoder:
    """SAM's prompt encoder and mask decoder for batches of single-point prompts on one image.

    ``set_image`` takes the image embedding; each call decodes a batch of points (in the
    encoder's 1024-pixel input frame) into multimask logits cut to ``low_res_size`` (the part
    of the 256 x 256 low-resolution mask that covers the image) and the predicted IoUs."""

    def __init__(self, sam: Sam, chunk: int = 64, upscale_chunk: int = 16):
        self.sam = sam
        # prompts decoded at once, and upscaled at once (memory; results do not depend on them)
        self.chunk = chunk
        self.upscale_chunk = upscale_chunk
        self.embedding: Tensor | None = None

    @torch.no_grad()
    def set_image(self, embedding: Tensor) -> None:
        sam = self.sam
        self.embedding = embedding
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        self.src = (embedding + dense).flatten(2).transpose(1, 2)  # 1 x N x C
        self.pos = sam.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)
        self.keys = self.src + self.pos
        # the first layer's image-side projections are the same for every prompt
        layer = sam.mask_decoder.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        h = t2i.num_heads
        self.t2i_shared = (_heads(t2i.k_proj(self.keys)[0], h).permute(1, 2, 0).contiguous(),  # h d N
                           _heads(t2i.v_proj(self.src)[0], h).transpose(0, 1).contiguous())  # h N d
        q = _heads(i2t.q_proj(self.keys)[0], i2t.num_heads).transpose(0, 1)  # h N d
        self.i2t_shared = (q / math.sqrt(q.shape[-1])).contiguous()

    @torch.no_grad()
    def __call__(self, points: Tensor, low_res_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``points``: P x 2 (x, y) float64 in the 1024 input frame -> (P x 3 x h x w logits,
        P x 3 predicted IoUs) with (h, w) = ``low_res_size``. Points are decoded ``chunk`` at a
        time from the first: decoding a chunk again gives the same numbers."""
        assert self.embedding is not None, "set_image first"
        grid = tuple(self.embedding.shape[-2:])
        keep = (min(grid[0], -(-low_res_size[0] // 4)), min(grid[1], -(-low_res_size[1] // 4)))
        masks, ious = [], []
        for start in range(0, points.shape[0], self.chunk):
            chunk = points[start:start + self.chunk]
            labels = torch.ones(chunk.shape[0], 1, dtype=torch.int, device=chunk.device)
            sparse, _ = self.sam.prompt_encoder(points=(chunk[:, None, :], labels), boxes=None, masks=None)
            m, iou = self._decode(sparse, grid, keep)
            masks.append(m[..., : low_res_size[0], : low_res_size[1]])
            ious.append(iou)
        return torch.cat(masks), torch.cat(ious)

    def _decode(self, sparse: Tensor, grid: tuple[int, int], keep: tuple[int, int]) -> tuple[Tensor, Tensor]:
        decoder = self.sam.mask_decoder
        tr = decoder.transformer
        b = sparse.shape[0]
        out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)
        tokens = torch.cat([out_tokens.expand(b, -1, -1), sparse], 1)
        queries, image, keys = tokens, self.src, self.keys
        for i, layer in enumerate(tr.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + tokens
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            attn_out = _token_to_image(layer.cross_attn_token_to_image, queries + tokens, image, keys,
                                       self.t2i_shared if i == 0 else None)
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))
            image = layer.norm4(_image_to_token_residual(layer.cross_attn_image_to_token, image, keys,
                                                         queries + tokens, queries, self.i2t_shared if i == 0 else None))
            keys = image + self.pos
        attn_out = _token_to_image(tr.final_attn_token_to_image, queries + tokens, image, keys)
        queries = tr.norm_final_attn(queries + attn_out)
        n = decoder.num_mask_tokens
        hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in range(1, n)], 1)
        iou = decoder.iou_prediction_head(queries[:, 0])[:, 1:]
        masks = [_upscale(decoder, image[i:i + self.upscale_chunk], hyper[i:i + self.upscale_chunk], grid, keep)
                 for i in range(0, b, self.upscale_chunk)]
        return torch.cat(masks) if len(masks) > 1 else masks[0], iou
