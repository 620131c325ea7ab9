"""What SAN trains and how: the trainable parameters, AdamW parameter groups, the poly learning
rate schedule and full-model gradient clipping, as MendelXu/SAN ``train_net.py`` builds them.

- Trained: the side adapter (ViT, fusion layers, mask decoder), the CLIP image encoder's
  positional embedding (``CLIP_FROZEN_EXCLUDE = ["positional_embedding"]``) and the background
  embedding; the rest of CLIP (both towers, the recognition head's blocks) is frozen.
- Weight decay 1e-4, except 0 for parameters whose name contains ``pos_embed``,
  ``positional_embedding``, ``query_embed`` (and the other ``WEIGHT_DECAY_EMBED_GROUP`` names),
  for ``nn.Embedding`` weights and for parameters of torch normalisation layers. As in the
  official code, the side adapter's channel LayerNorm (a module of its own, not a torch norm
  layer) and the background embedding keep the 1e-4 decay.
- AdamW (betas 0.9/0.999, eps 1e-8), lr 1e-4 for every group (both multipliers are 1.0 in the
  released configs), poly decay ``(1 - it / max_iter) ** 0.9`` without warm-up, and the gradient
  norm of all trained parameters together clipped to 0.01.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

EMBED_NAMES = ("absolute_pos_embed", "positional_embedding", "pos_embed", "query_embed",
               "relative_position_bias_table")
NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


@dataclass(frozen=True)
class OptimConfig:
    """``SOLVER.*`` of the official configs (Base-coco-stuff-164K-171.yaml, san/config.py)."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    side_adapter_lr_multiplier: float = 1.0
    clip_lr_multiplier: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    poly_power: float = 0.9
    clip_grad_norm: float = 0.01


def is_trained(name: str) -> bool:
    """Whether the SAN parameter ``name`` (state-dict naming) is trained."""
    return (name.startswith("side_adapter_network.")
            or name == "clip_visual_extractor.positional_embedding"
            or name == "ov_classifier.bg_embed")


def set_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the trained parameters; returns those, in module order."""
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trained(name))
        if param.requires_grad:
            trained.append(param)
    return trained


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups by (lr, weight decay), each listing its parameters' names (``names``)."""
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr = cfg.lr
            if "side_adapter_network" in module_name:
                lr *= cfg.side_adapter_lr_multiplier
            if "clip" in module_name:
                lr *= cfg.clip_lr_multiplier
            decay = cfg.weight_decay
            if any(n in param_name for n in EMBED_NAMES):
                decay = cfg.weight_decay_embed
            if isinstance(module, NORM_TYPES):
                decay = cfg.weight_decay_norm
            if isinstance(module, nn.Embedding):
                decay = cfg.weight_decay_embed
            group = groups.setdefault((lr, decay), {"params": [], "names": [], "lr": lr, "weight_decay": decay})
            group["params"].append(param)
            group["names"].append(f"{module_name}.{param_name}" if module_name else param_name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


class PolySchedule:
    """``lr = initial_lr * (1 - iteration / max_iters) ** power`` for every group, set before
    each step (detectron2 ``WarmupPolyLR`` with no warm-up)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9):
        self.optimizer, self.max_iters, self.power = optimizer, max_iters, power

    def factor(self, iteration: int) -> float:
        return max(0.0, 1.0 - iteration / self.max_iters) ** self.power

    def apply(self, iteration: int) -> float:
        """Set the learning rates for ``iteration``; returns the first group's."""
        f = self.factor(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"max_iters": self.max_iters, "power": self.power}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_iters, self.power = int(state["max_iters"]), float(state["power"])


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the total L2 norm of all gradients to ``max_norm`` ("full_model" clipping); returns
    the norm before clipping."""
    return float(torch.nn.utils.clip_grad_norm_(list(params), max_norm))
