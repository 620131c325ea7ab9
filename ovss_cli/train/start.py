"""Where training starts: a SAN checkpoint (``--init``, fine-tuning), or OpenAI CLIP with a freshly
initialised side adapter (the paper's setting).

A fresh side adapter is initialised as the official one: timm's ViT initialisation for the side
ViT (linear weights truncated-normal with std 0.02, biases 0, position embedding truncated-normal
0.02), the fusion layers' 1x1 convolutions c2-Xavier (Kaiming-uniform with a = 1, bias 0), query
and query-position embeddings normal 0.02, the mask decoder and the background embedding as
PyTorch / the official classifier initialise them.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..clip.model import load_clip_config
from ..errors import UsageError, WeightsError
from ..models.san.checkpoint import load_san_weights, read_san_checkpoint
from ..models.san.config import SAN_CONFIGS, SanConfig, get_san_config
from ..models.san.model import SanModel, SetCriterionBuffers

# The OpenAI CLIP each released SAN starts from (open_clip "ViT-B-16" / "ViT-L-14-336", "openai").
CLIP_FOR_MODEL = {"san-vit-b16": "clip-vit-b16-openai", "san-vit-l14": "clip-vit-l14-336-openai"}
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def with_classes(model: SanModel, num_classes: int) -> SanModel:
    """Give ``model`` a criterion buffer (and config) for ``num_classes`` training classes."""
    cfg = model.config
    model.config = replace(cfg, num_train_classes=num_classes)
    device = model.criterion.empty_weight.device
    model.criterion = SetCriterionBuffers(num_classes, cfg.no_object_weight).to(device)
    return model


@torch.no_grad()
def init_side_adapter(model: SanModel) -> None:
    """The official initialisation of the side adapter's ViT and fusion layers (see module doc)."""
    side = model.side_adapter_network
    for module in side.vit_model.blocks.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.trunc_normal_(side.vit_model.pos_embed, std=0.02)
    for fusion in side.fusion_layers.values():
        conv = fusion.input_proj[-1]
        nn.init.kaiming_uniform_(conv.weight, a=1)
        nn.init.zeros_(conv.bias)
    nn.init.normal_(side.query_embed, std=0.02)
    nn.init.normal_(side.query_pos_embed, std=0.02)


def clip_state_for_san(clip_state: Mapping[str, Tensor], config: SanConfig) -> dict[str, Tensor]:
    """An OpenAI / open_clip CLIP state dict under SAN's names: the image encoder's blocks
    ``[0, k)`` go to ``clip_visual_extractor``, ``[k, end)`` with ``ln_post``/``proj`` to
    ``clip_rec_head``, the text tower (and logit scale) to ``ov_classifier``."""
    k = config.feature_last_layer
    out: dict[str, Tensor] = {}
    for key, value in clip_state.items():
        key = key.removeprefix("module.")
        if key in _OPENAI_EXTRA_KEYS:
            continue
        if key.startswith("visual."):
            rest = key[len("visual."):]
            if rest.startswith("transformer.resblocks."):
                index, tail = rest[len("transformer.resblocks."):].split(".", 1)
                i = int(index)
                out[f"clip_visual_extractor.resblocks.{i}.{tail}" if i < k
                    else f"clip_rec_head.resblocks.{i - k}.{tail}"] = value
            elif rest.split(".")[0] in ("ln_post", "proj"):
                out[f"clip_rec_head.{rest}"] = value
            else:
                out[f"clip_visual_extractor.{rest}"] = value
        else:
            out[f"ov_classifier.{key}"] = value
    return out


def model_from_clip(config: SanConfig, clip_path: Path, seed: int) -> SanModel:
    """SAN with the CLIP at ``clip_path`` and a fresh side adapter and background embedding."""
    from ..weights import load_state_file, load_state_strict

    raw = load_state_file(clip_path)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not all(isinstance(v, Tensor) for v in raw.values()):
        raise WeightsError(f"{clip_path} does not hold a CLIP state dict of tensors (--clip-weights)")
    mapped = clip_state_for_san(raw, config)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = SanModel(config)
        init_side_adapter(model)
    finally:
        torch.random.set_rng_state(generator_state)
    own = model.state_dict()
    clip_keys = {k for k in own if k.startswith(("clip_visual_extractor.", "clip_rec_head.", "ov_classifier."))
                 and k not in ("ov_classifier.bg_embed", "ov_classifier.attn_mask")}
    merged = {k: v for k, v in own.items() if k not in clip_keys}
    merged.update(mapped)
    load_state_strict(model, merged, str(clip_path), f"a CLIP for {config.clip.get('vision_cfg', {})}",
                      hint="pass the CLIP the model is built on (--clip-weights FILE), or --clip-config FILE "
                           "for another CLIP architecture")
    return model


def model_from_checkpoint(path: Path, config: SanConfig, model_name: str, explicit_model: bool,
                          clip_override: bool) -> SanModel:
    """SAN from a SAN checkpoint. One ovss wrote carries its config; an official one is built
    as ``--model`` (with ``--clip-config``). A checkpoint of another architecture is an error."""
    state, stored = read_san_checkpoint(path)
    if stored is not None:
        stored_config = SanConfig.from_dict(stored)
        if clip_override and stored_config.clip != config.clip:
            raise WeightsError(f"--init {path} was trained on another CLIP than --clip-config describes; "
                               "leave --clip-config out (the checkpoint carries its config)")
        if explicit_model and _architecture(stored_config) != _architecture(config):
            raise WeightsError(f"--init {path} is not a {model_name} checkpoint (its stored config differs); "
                               "leave --model out to fine-tune it as it is")
        config = stored_config
    empty = state.get("criterion.empty_weight")
    if isinstance(empty, Tensor) and empty.ndim == 1:
        config = replace(config, num_train_classes=int(empty.shape[0]) - 1)
    with torch.device("meta"):
        model = SanModel(config)
    load_san_weights(model, state, f"--init {path}", model_name)
    return model


def _architecture(config: SanConfig) -> dict[str, Any]:
    d = config.to_dict()
    for key in ("num_train_classes", "templates", "min_size_test", "max_size_test"):
        d.pop(key, None)
    return d


def build_start_model(
    *,
    model_name: str | None,
    init: str | Path | None,
    clip_weights: str | Path | None,
    clip_config: str | Path | Mapping[str, Any] | None,
    num_classes: int,
    seed: int = 0,
    progress: bool = True,
) -> tuple[SanModel, str]:
    """The model training starts from, with a criterion buffer for ``num_classes``, and a
    one-line description of where it came from."""
    from ..weights import resolve_weights

    name = model_name or "san-vit-b16"
    if name not in SAN_CONFIGS:
        get_san_config(name)  # raises the usage error listing the models
    config = get_san_config(name)
    if clip_config is not None:
        config = config.with_clip(load_clip_config(clip_config))
    if init is not None:
        if clip_weights is not None:
            raise UsageError("--clip-weights starts from CLIP; with --init the CLIP comes from the SAN checkpoint")
        path = Path(init)
        if not path.is_file():
            raise WeightsError(f"--init checkpoint not found: {path}")
        model = model_from_checkpoint(path, config, name, model_name is not None, clip_config is not None)
        source = f"SAN checkpoint {path}"
    else:
        if clip_weights is None and clip_config is not None:
            raise UsageError("--clip-config describes a non-standard CLIP: give its weights with --clip-weights FILE")
        if clip_weights is not None and not Path(clip_weights).is_file():
            raise WeightsError(f"--clip-weights checkpoint not found: {clip_weights}")
        clip_path = resolve_weights(CLIP_FOR_MODEL[name], clip_weights, default=CLIP_FOR_MODEL[name],
                                    progress=progress)
        model = model_from_clip(config, Path(clip_path), seed)
        source = f"CLIP {clip_path} with a fresh side adapter"
    return with_classes(model, num_classes), source
