"""Device and numeric precision: where models run and under which autocast.

fp32 is the exact path (parity with the official code); bf16/fp16 run the heavy modules
under ``torch.autocast`` for speed, on CUDA and, for bf16, on CPUs that support it.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import ContextManager

import torch

from .errors import OvssWarning, UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is fp32 on CPU (exact) and bf16 on CUDA (fp16 where bf16 is unsupported)."""
    p = (precision or "auto").lower()
    if p not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if p == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if p == "fp16" and device.type == "cpu":
        raise UsageError("fp16 is not supported on CPU; use --precision bf16 or fp32")
    if p == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(OvssWarning("--precision bf16: this CPU has no native bf16 instructions (AVX512-BF16 or AMX), "
                                  "so bf16 is emulated and slower than fp32 here; use --precision fp32"))
    return p


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX). Without them
    autocast to bf16 still works (oneDNN emulates it) but runs slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without these probes: assume the common case
        return False


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def cast_matmul_weights(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Store the weights of linear, convolution and attention layers in the autocast dtype.

    Autocast casts exactly these weights to bf16/fp16 on every forward anyway (it caches casts
    only for weights that require grad), so storing them cast gives the same numbers without
    re-copying every weight per call. No-op for fp32.
    """
    if precision == "fp32":
        return module
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    for mod in module.modules():
        names: tuple[str, ...] = ()
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            names = ("weight", "bias")
        elif isinstance(mod, torch.nn.MultiheadAttention):
            names = ("in_proj_weight", "in_proj_bias")
        for name in names:
            p = getattr(mod, name, None)
            if p is not None and p.is_floating_point():
                p.data = p.data.to(dtype)
    return module
