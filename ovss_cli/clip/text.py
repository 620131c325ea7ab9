"""Class-name embeddings: names x templates through CLIP's text tower, averaged, cached.

Both methods classify against these; a run encodes each name once (the cache lives as long
as the segmenter), so a folder of images costs one text pass.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from .model import ClipTextTower, tokenize


class PromptEncoder:
    """Embeds class names the way SAN's classifier does.

    Per template the text features are L2-normalised, then averaged over templates and
    normalised again. Embeddings are cached per name, so repeated vocabularies are free.
    """

    def __init__(self, tower: ClipTextTower, templates: Sequence[str], batch_size: int = 256):
        if not templates:
            raise ValueError("at least one template is required")
        self.tower = tower
        self.templates = tuple(templates)
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}
        self.names_encoded = 0  # how many names went through the text tower (for tests, stats)

    @property
    def device(self) -> torch.device:
        return self.tower.positional_embedding.device

    @torch.no_grad()
    def _encode(self, names: Sequence[str]) -> torch.Tensor:
        per_template = []
        # Always fp32: the classifier is computed once per name and must be exact.
        with torch.autocast(self.device.type, enabled=False):
            for template in self.templates:
                tokens = tokenize([template.format(n) for n in names], context_length=self.tower.context_length)
                feats = [
                    self.tower.encode_text(tokens[s : s + self.batch_size].to(self.device), normalize=True).float()
                    for s in range(0, len(names), self.batch_size)
                ]
                per_template.append(torch.cat(feats))
        self.names_encoded += len(names)
        return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)

    def embed(self, names: Sequence[str]) -> torch.Tensor:
        """N x D unit-norm embeddings for ``names`` (in order)."""
        new = list(dict.fromkeys(n for n in names if n not in self._cache))
        if new:
            for name, emb in zip(new, self._encode(new)):
                self._cache[name] = emb
        return torch.stack([self._cache[n] for n in names])
