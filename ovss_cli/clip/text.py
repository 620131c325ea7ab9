"""Class-name embeddings: names x templates through CLIP's text tower, averaged, cached.

Both methods classify against these. A run encodes each name once (the in-memory cache lives
as long as the segmenter), and with a cache folder the embeddings also persist across runs,
keyed by a fingerprint of the text tower's weights and the templates: a shell loop calling
``ovss segment`` per image does not re-encode its vocabulary (and the 171 distractors) each time.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch.nn import functional as F

from .model import ClipTextTower, token_count, tokenize


def tower_fingerprint(tower: ClipTextTower, templates: Sequence[str]) -> str:
    """A short hash identifying the text tower's weights and the template set."""
    digest = hashlib.sha256("\n".join(templates).encode())
    for t in (tower.text_projection, tower.positional_embedding, tower.ln_final.weight,
              tower.token_embedding.weight[:256], tower.transformer.resblocks[-1].mlp.c_proj.weight):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def warn_if_cut(names: Sequence[str], templates: Sequence[str], context_length: int) -> list[str]:
    """Warn (:class:`~ovss_cli.errors.OvssWarning`) about each name that, in its longest
    prompt, is longer than CLIP's context: CLIP only sees its beginning. Returns those names."""
    from ..errors import OvssWarning

    longest = max(templates, key=len)
    cut = [n for n in names if token_count(longest.format(n)) > context_length]
    for name in cut:
        shown = name if len(name) <= 60 else name[:57] + "..."
        warnings.warn(OvssWarning(f"class name {shown!r} ({len(name)} characters) is longer than CLIP's "
                                  f"{context_length}-token context in its prompts: only its beginning is used"))
    return cut


class PromptEncoder:
    """Embeds class names the way SAN's classifier does.

    Per template the text features are L2-normalised, then averaged over templates and
    normalised again. Embeddings are cached per name, so repeated vocabularies are free;
    ``cache_dir`` keeps them on disk for later runs too.
    """

    def __init__(self, tower: ClipTextTower, templates: Sequence[str], batch_size: int = 256,
                 cache_dir: str | Path | None = None):
        if not templates:
            raise ValueError("at least one template is required")
        self.tower = tower
        self.templates = tuple(templates)
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_file: Path | None = None
        if cache_dir is not None:
            self._cache_file = Path(cache_dir) / f"{tower_fingerprint(tower, self.templates)}.pt"
            self._cache.update(self._read_disk_cache())
        self.names_encoded = 0  # how many names went through the text tower (for tests, stats)
        self._length_checked: set[str] = set()  # names already checked against the context length

    @property
    def device(self) -> torch.device:
        return self.tower.positional_embedding.device

    def _read_disk_cache(self) -> dict[str, torch.Tensor]:
        if self._cache_file is None or not self._cache_file.is_file():
            return {}
        try:
            data = torch.load(self._cache_file, map_location="cpu", weights_only=True)
            return {str(k): v for k, v in data["names"].items() if isinstance(v, torch.Tensor)}
        except Exception:  # a damaged cache is only a cache: start afresh
            return {}

    def _write_disk_cache(self) -> None:
        from ..io.atomic import atomic_open

        if self._cache_file is None:
            return
        merged = {**self._read_disk_cache(), **{k: v.cpu() for k, v in self._cache.items()}}
        try:
            with atomic_open(self._cache_file, "wb") as handle:
                torch.save({"templates": list(self.templates), "names": merged}, handle)
        except OSError:
            pass  # read-only cache folder: embeddings stay in memory for this run

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
        """N x D unit-norm embeddings for ``names`` (in order). A name too long for CLIP's context is
        warned about once per encoder, whether its embedding is computed now or cached."""
        unchecked = list(dict.fromkeys(n for n in names if n not in self._length_checked))
        if unchecked:
            warn_if_cut(unchecked, self.templates, self.tower.context_length)
            self._length_checked.update(unchecked)
        new = list(dict.fromkeys(n for n in names if n not in self._cache))
        if new:
            for name, emb in zip(new, self._encode(new)):
                self._cache[name] = emb
            self._write_disk_cache()
        return torch.stack([self._cache[n] for n in names]).to(self.device)
