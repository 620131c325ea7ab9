"""Reading and writing SAN checkpoints.

Official checkpoints are ``{"model": state_dict}``; checkpoints ovss writes add
``"ovss_config"`` (the :class:`SanConfig` as a dict), so ``--weights`` alone rebuilds them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import WeightsError
from ...io.atomic import atomic_open
from .config import SanConfig
from .model import SanModel


def read_san_checkpoint(path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """State dict and, for checkpoints ovss wrote, the SAN config stored beside it."""
    from ...weights import load_state_file

    ckpt = load_state_file(path)
    config = ckpt.get("ovss_config") if isinstance(ckpt, dict) else None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        from ...weights import checkpoint_kind

        kind = checkpoint_kind(ckpt)
        raise WeightsError(f"{path} is {kind}, not a SAN checkpoint" if kind and "SAN" not in kind else
                           f"{path} is not a SAN checkpoint (expected {{'model': state_dict}})")
    return state, config


def load_san_weights(model: SanModel, state: dict[str, Tensor], source: str, model_name: str) -> None:
    """Load with exact key and shape matching; a mismatch names the checkpoint and the fix."""
    from ...weights import load_state_strict

    load_state_strict(model, state, source, model_name,
                      hint="Pass the --model it was trained as, or --clip-config FILE for a non-standard CLIP")


def save_san_checkpoint(model: SanModel, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``{"model": state_dict, "ovss_config": config}`` atomically (loadable with
    ``weights_only=True``)."""
    payload = {"model": model.state_dict(), "ovss_config": model.config.to_dict(), **(extra or {})}
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


def build_random_san(config: SanConfig, seed: int = 0) -> SanModel:
    """A SAN with seeded random weights (tests, benchmarks, a starting point for training)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return SanModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
