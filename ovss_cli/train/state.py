"""Checkpoints of a training run and what ``--resume`` restores from them.

``OUT/checkpoints/model_NNNNNNN.pth`` (NNNNNNN: the last finished iteration, 0-based, as
detectron2 names them) and ``OUT/model_final.pth`` hold ``{"model": state_dict, "ovss_config":
SanConfig}`` (so ``ovss segment/evaluate --weights FILE`` load them alone); the periodic ones
add ``"train_state"``: the next iteration, optimizer, schedule, gradient scaler, the random
states of torch (CPU and CUDA), numpy and Python, the data order (seed, position, dataset
fingerprint) and the losses since the last log line. Everything is tensors, numbers, strings,
lists and dicts, so the files load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError, WeightsError
from ..models.san.checkpoint import save_san_checkpoint
from ..models.san.model import SanModel

CHECKPOINT_DIR = "checkpoints"
FINAL_NAME = "model_final.pth"
_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")


def checkpoint_path(out: Path, iteration: int) -> Path:
    """Where the checkpoint after (0-based) ``iteration`` goes."""
    return Path(out) / CHECKPOINT_DIR / f"model_{iteration:07d}.pth"


def latest_checkpoint(out: Path) -> Path | None:
    """The periodic checkpoint of the latest iteration under ``out``, if any."""
    folder = Path(out) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _PERIODIC.match(p.name)))
    return found[-1][1] if found else None


def capture_rng() -> dict[str, Any]:
    """The global random states (torch CPU and CUDA, numpy, Python) as tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": [int(v) for v in internal],
                   "gauss": None if gauss is None else float(gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: SanModel, train_state: dict[str, Any] | None = None) -> None:
    """Write a checkpoint atomically (model and config; the training state when given)."""
    save_san_checkpoint(model, path, extra={"train_state": train_state} if train_state is not None else None)


def read_train_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state dict, model config, training state) of a periodic checkpoint."""
    from ..weights import load_state_file

    ckpt = load_state_file(path)
    state, config, train_state = ckpt.get("model"), ckpt.get("ovss_config"), ckpt.get("train_state")
    if not isinstance(state, dict) or not isinstance(config, dict) or not isinstance(train_state, dict):
        raise WeightsError(f"{path} is not a periodic training checkpoint of ovss train-san (nothing to resume from)")
    return state, config, train_state


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """``--resume`` continues the same run: the settings that shape the result must not change."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            further = (f" (to train a finished run further, start a new one from its weights: --init "
                       f"{path.parent.parent / FINAL_NAME} --out NEW_DIR)" if key == "iters" else "")
            raise UsageError(f"--resume: {path} was written by a run with {key} = {saved[key]!r}, this run has "
                             f"{value!r}; resume with the same settings, or train into another --out{further}")
