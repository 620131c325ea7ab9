"""The side adapter network: a small ViT fed with CLIP features that predicts masks and
attention biases for CLIP's recognition head.

Parameter names match the official checkpoints (``vit_model.blocks.N.attn.qkv`` etc.).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import SanConfig


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an N x C x H x W map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / (var + self.eps).sqrt()
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    With autograd (training) in fp32 it computes softmax(q k^T / sqrt(d)) v step by step, in
    the official operation order. For inference it uses PyTorch's fused kernel, in fp32 on a CPU
    whatever the autocast dtype: one cache-blocked pass instead of a heads x N x N matrix (123 MB
    for a 640 x 864 image) going through memory three times, faster than bf16 products there,
    and the same numbers up to float rounding (1e-6 of SAN ViT-B/16's logits; the official tiny
    SAN's parity holds). On GPUs under autocast the fused kernel runs in the autocast dtype.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        autocast = torch.is_autocast_enabled(x.device.type)
        if torch.is_grad_enabled() and not autocast:
            x = (q @ k.transpose(-2, -1)).mul_(self.scale).softmax(dim=-1) @ v
        elif autocast and x.device.type != "cpu":
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            with torch.autocast(x.device.type, enabled=False):
                x = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm ViT layout, LayerNorm eps 1e-6, exact GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (h, w)


class SideViT(nn.Module):
    """The side ViT: patch embedding, learned positions for a square grid, blocks."""

    def __init__(self, cfg: SanConfig):
        super().__init__()
        self.grid = cfg.side_image_size // cfg.side_patch
        self.patch_embed = PatchEmbed(cfg.side_patch, cfg.side_width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, cfg.side_width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.side_width, cfg.side_heads) for _ in range(cfg.side_depth))

    def positions(self, h: int, w: int) -> Tensor:
        """Position embeddings for an h x w patch grid (bicubic resize of the trained grid)."""
        pos = self.pos_embed
        if pos.shape[1] == h * w and (h, w) == (self.grid, self.grid):
            return pos
        pos = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)


class AddFusion(nn.Module):
    """Adds projected CLIP features (resized to the side grid) to the side ViT's patch tokens."""

    def __init__(self, clip_channels: int, side_channels: int):
        super().__init__()
        self.input_proj = nn.Sequential(
            ChannelLayerNorm(clip_channels), nn.Conv2d(clip_channels, side_channels, kernel_size=1)
        )

    def forward(self, tokens: Tensor, clip_feature: Tensor, grid: tuple[int, int]) -> Tensor:
        y = self.input_proj(clip_feature.contiguous())
        y = F.interpolate(y, size=grid, mode="bilinear", align_corners=False)
        return tokens + y.permute(0, 2, 3, 1).reshape(tokens.shape)


class MLP(nn.Module):
    """ReLU MLP; with ``conv=True`` its layers are 1x1 convolutions over a feature map."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int, conv: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]

        def affine(i: int, o: int) -> nn.Module:
            return nn.Conv2d(i, o, kernel_size=1) if conv else nn.Linear(i, o)

        self.layers = nn.ModuleList(affine(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class BiasScaling(nn.Module):
    """The official ``nn.Linear(1, 1)`` applied to every attention-bias value, written out as
    ``w * x + b`` (the same numbers and parameter names, no B x ... x 1 matmul); not an
    ``nn.Linear``, so bf16 casting of matmul weights leaves it in fp32."""

    def __init__(self):
        super().__init__()
        reference = nn.Linear(1, 1)  # the official initialisation
        self.weight = reference.weight
        self.bias = reference.bias

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(()) + self.bias.view(())


class MaskDecoder(nn.Module):
    """Turns query and patch tokens into mask logits and per-head attention biases."""

    def __init__(self, cfg: SanConfig):
        super().__init__()
        c = cfg.side_width
        self.heads = cfg.bias_heads
        self.layers = cfg.bias_layers
        self.query_mlp = MLP(c, cfg.bias_mlp, cfg.bias_embed, cfg.bias_mlp_layers)
        self.pix_mlp = MLP(c, cfg.bias_mlp, cfg.bias_embed, cfg.bias_mlp_layers, conv=True)
        self.attn_mlp = MLP(
            c, cfg.bias_mlp, cfg.bias_embed * cfg.bias_heads * cfg.bias_layers, cfg.bias_mlp_layers, conv=True
        )
        self.bias_scaling = BiasScaling() if cfg.rescale_bias else nn.Identity()

    def forward(self, query: Tensor, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """query: B x Q x C, x: B x C x H x W -> masks B x Q x H x W, biases [B x heads x Q x H x W].

        The MLPs follow the autocast dtype; the products of query and pixel embeddings (mask
        logits, attention biases) and the bias scaling are always fp32: they decide the labels
        and steer CLIP's attention, and bf16 would round them visibly.
        """
        query = self.query_mlp(query)
        pix = self.pix_mlp(x)
        attn = self.attn_mlp(x)
        b, c, h, w = pix.shape
        with torch.autocast(x.device.type, enabled=False):
            query, pix, attn = query.float(), pix.float(), attn.float()
            # the einsums bqc,bchw->bqhw and bqc,blnchw->blnqhw as plain (batched) matmuls
            masks = torch.matmul(query, pix.reshape(b, c, h * w)).view(b, -1, h, w)
            attn = attn.reshape(b, self.layers * self.heads, c, h * w)
            bias = torch.matmul(query[:, None], attn).view(b, self.layers, self.heads, -1, h, w)
            bias = self.bias_scaling(bias)
        return masks, [bias[:, i] for i in range(self.layers)]


class SideAdapterNetwork(nn.Module):
    """Side ViT with query tokens, fused with CLIP features at chosen blocks."""

    def __init__(self, cfg: SanConfig, clip_width: int):
        super().__init__()
        self.vit_model = SideViT(cfg)
        self.query_embed = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.side_width))
        self.query_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.side_width))
        nn.init.normal_(self.query_embed, std=0.02)
        nn.init.normal_(self.query_pos_embed, std=0.02)
        # side block index -> CLIP layer index
        self.fusion_map = {side: clip for clip, side in cfg.fusion_map}
        self.fusion_layers = nn.ModuleDict(
            {f"layer_{side}": AddFusion(clip_width, cfg.side_width) for side in sorted(self.fusion_map)}
        )
        self.mask_decoder = MaskDecoder(cfg)
        self.deep_supervision = tuple(cfg.deep_supervision)

    def _fuse(self, idx: int, x: Tensor, clip_features: dict[int, Tensor], grid: tuple[int, int]) -> Tensor:
        if idx not in self.fusion_map:
            return x
        n = grid[0] * grid[1]
        fused = self.fusion_layers[f"layer_{idx}"](x[:, -n:], clip_features[self.fusion_map[idx]], grid)
        return torch.cat([x[:, :-n], fused], dim=1)

    def forward(
        self, image: Tensor, clip_features: dict[int, Tensor], all_outputs: bool = False
    ) -> tuple[list[Tensor], list[list[Tensor]]]:
        """Mask logits and attention biases at the deep-supervision blocks (only the last
        unless ``all_outputs``, as in the official evaluation)."""
        x, grid = self.vit_model.patch_embed(image)
        n = x.shape[1]
        b = x.shape[0]
        pos = torch.cat([self.query_pos_embed.expand(b, -1, -1), self.vit_model.positions(*grid).expand(b, -1, -1)], 1)
        x = torch.cat([self.query_embed.expand(b, -1, -1), x], dim=1) + pos
        x = self._fuse(0, x, clip_features, grid)
        outputs = []
        blocks = self.vit_model.blocks
        for i, block in enumerate(blocks, start=1):
            x = block(x)
            x = self._fuse(i, x, clip_features, grid)
            if i in self.deep_supervision:
                outputs.append((x[:, :-n], x[:, -n:].transpose(1, 2).reshape(b, -1, *grid)))
            if i < len(blocks):
                x = x + pos
        if not all_outputs:
            outputs = outputs[-1:]
        masks, biases = [], []
        for query, feat in outputs:
            m, bias = self.mask_decoder(query, feat)
            masks.append(m)
            biases.append(bias)
        return masks, biases

