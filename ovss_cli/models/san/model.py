"""The SAN network: frozen CLIP + side adapter, with the official checkpoints' module names.

``SanModel.state_dict()`` has exactly the keys of the released checkpoints
(``side_adapter_network.*``, ``clip_visual_extractor.*``, ``clip_rec_head.*``,
``ov_classifier.*``, ``criterion.empty_weight``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...clip.model import ClipTextTower, build_clip
from .clip_branch import ClipFeatureExtractor, RecWithAttnBiasHead, tokens_to_map
from .config import SanConfig
from .side_adapter import SideAdapterNetwork


class OpenVocabClassifier(ClipTextTower):
    """CLIP's text tower plus SAN's learned background embedding."""

    def __init__(self, clip) -> None:
        super().__init__(clip)
        dim = self.text_projection.shape[1]
        self.bg_embed = nn.Parameter(torch.randn(1, dim) * dim**-0.5)

    def classifier_weights(self, class_embeddings: Tensor) -> Tensor:
        """(K+1) x D rows: the K unit-norm class embeddings, then the background, scaled by
        CLIP's logit scale."""
        rows = torch.cat([class_embeddings, self.bg_embed.to(class_embeddings)], dim=0)
        return self.logit_scale.exp() * F.normalize(rows, dim=-1)


class SetCriterionBuffers(nn.Module):
    """The training criterion's class weights, which the official checkpoints carry."""

    def __init__(self, num_classes: int, no_object_weight: float):
        super().__init__()
        weight = torch.ones(num_classes + 1)
        weight[-1] = no_object_weight
        self.register_buffer("empty_weight", weight)


class SanModel(nn.Module):
    """Maps a normalised, padded image batch and a classifier to mask and class logits."""

    def __init__(self, cfg: SanConfig):
        super().__init__()
        self.config = cfg
        clip = build_clip(cfg.clip)
        visual = clip.visual
        self.clip_visual_extractor = ClipFeatureExtractor(visual, cfg.feature_last_layer)
        self.clip_rec_head = RecWithAttnBiasHead(
            visual, cfg.feature_last_layer, cfg.num_queries, cfg.bias_downsample
        )
        self.side_adapter_network = SideAdapterNetwork(cfg, self.clip_visual_extractor.width)
        self.ov_classifier = OpenVocabClassifier(clip)
        self.criterion = SetCriterionBuffers(cfg.num_train_classes, cfg.no_object_weight)
        self._fusion_sources = {clip_idx for clip_idx, _ in cfg.fusion_map}

    def forward(self, images: Tensor, classifier: Tensor, all_outputs: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """images: B x 3 x H x W (normalised, padded); classifier: (K+1) x D.

        Returns mask logits (B x Q x H/16 x W/16) and class logits (B x Q x (K+1)) for the
        last deep-supervision block, or for every one with ``all_outputs``.
        """
        cfg = self.config
        clip_input = F.interpolate(images, scale_factor=cfg.clip_resolution, mode="bilinear", align_corners=False)
        keep = self._fusion_sources | {cfg.feature_last_layer}
        tokens, grid = self.clip_visual_extractor(clip_input, keep)
        maps = {i: tokens_to_map(tokens[i], grid) for i in self._fusion_sources}
        mask_logits, biases = self.side_adapter_network(images, maps, all_outputs=all_outputs)
        class_logits = []
        for bias in biases:
            emb = self.clip_rec_head(tokens[cfg.feature_last_layer], grid, bias)
            # fp32 even under autocast: CLIP's logit scale (100) would magnify bf16's rounding
            with torch.autocast(images.device.type, enabled=False):
                class_logits.append(torch.einsum("bqc,nc->bqn", emb.float(), classifier.float()))
        return mask_logits, class_logits
