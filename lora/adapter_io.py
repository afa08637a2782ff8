"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.lora_A.weight`` (``r x in``), ``...lora_B.weight`` (``out x r``),
``...lora_magnitude_vector`` (DoRA), and the model's own keys for trained biases and ``modules_to_save`` modules,
all prefixed ``base_model.model.``, with no adapter name inside. See ``adapters/README.md``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir
from .config import LoraConfig
from .inject import adapters_of, inject, lora_layers, remove_adapter, set_active, set_trainable

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FINGERPRINT_KEY = "base_model_fingerprint"
# A fingerprint samples this many values from each of at most this many targeted base weights: enough to tell a
# base from its instruct variant, small enough for a JSON file.
_FP_VALUES, _FP_TENSORS = 16, 32
# Relative distance below which sampled weights count as the same base. bf16, fp16 and 8-bit copies of one model
# stay well under it (< 1%); a different model, or a fine-tuned variant, lands far above it.
_FP_TOLERANCE = 0.05


def adapter_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter`` under PEFT's key names (detached, on their current device).

    Raises:
        ValueError: the model has no adapter of that name.
    """
    info = _adapter_info(model, adapter)
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[adapter].weight.detach()
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[adapter].weight.detach()
        if adapter in layer.lora_magnitude_vector:
            out[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter].detach()
    if info.config.bias != "none":
        wrapped = {path for path, layer in lora_layers(model) if adapter in layer.lora_A}
        for name, p in model.named_parameters():
            if not (name == "bias" or name.endswith(".bias")):
                continue
            owner = name[: -len(".base_layer.bias")] if name.endswith(".base_layer.bias") else None
            if info.config.bias == "all" or owner in wrapped:
                out[PEFT_PREFIX + name] = p.detach()
    for path in info.saved_module_paths:
        for name, t in model.get_submodule(path).state_dict().items():
            out[f"{PEFT_PREFIX}{path}.{name}"] = t.detach()
    return out


def _adapter_info(model: nn.Module, adapter: str):
    registry = adapters_of(model)
    if adapter not in registry:
        raise ValueError(f"the model has no adapter {adapter!r}; it has {sorted(registry) or 'none'} "
                         f"(call lora.inject or lora.load_adapter first)")
    return registry[adapter]


# -- fingerprint ------------------------------------------------------------------------------------------------
def base_fingerprint(model: nn.Module, target_paths: list[str] | tuple[str, ...]) -> dict[str, list[float]]:
    """A few values of the (unmerged) base weights the adapter targets, to recognise that base later.

    Values rather than a hash, so a bf16 or fp16 copy of the same base still matches (see ``_FP_TOLERANCE``).
    """
    paths = sorted(target_paths)
    if len(paths) > _FP_TENSORS:
        step = len(paths) / _FP_TENSORS
        paths = [paths[int(i * step)] for i in range(_FP_TENSORS)]
    layers = dict(lora_layers(model))
    out = {}
    for path in paths:
        layer = layers[path]
        W = layer._base_weight_view().float()
        for name in reversed(layer.merged_adapters):  # sample the base, not base + merged adapters
            W = _unmerged_copy(layer, name, W)
        flat = W.reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, _FP_VALUES).long()
        out[path] = [float(f"{v:.6g}") for v in flat[idx].tolist()]
    return out


def _unmerged_copy(layer, name: str, W: torch.Tensor) -> torch.Tensor:
    if name in layer.lora_magnitude_vector:
        W = W * (layer._dora_merge_norms[name] / layer.lora_magnitude_vector[name].float()).unsqueeze(1)
    return W - layer._lora_weight(name)


def _fingerprint_distance(saved: dict[str, list[float]], current: dict[str, list[float]]) -> float:
    """Largest relative L2 distance between matching sampled vectors (inf if the paths differ)."""
    if set(saved) != set(current):
        return math.inf
    worst = 0.0
    for path, a in saved.items():
        a_t, b_t = torch.tensor(a), torch.tensor(current[path])
        worst = max(worst, float((a_t - b_t).norm() / a_t.norm().clamp_min(1e-12)))
    return worst


# -- writing ----------------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``adapter`` as a PEFT-compatible folder (fp32 weights), atomically.

    Args:
        model: A model with the adapter injected.
        path: Output folder; an existing adapter folder there is replaced only once the new one is complete.
        adapter: Which adapter to save.
        base_model_name_or_path: Recorded for PEFT/vLLM; defaults to the model's own ``name_or_path``.

    Returns:
        The folder written.
    """
    info = _adapter_info(model, adapter)
    path = Path(path)
    if info.config.dora or info.config.modules_to_save:
        what = "DoRA" if info.config.dora else f"modules_to_save {list(info.config.modules_to_save)}"
        warnings.warn(f"this adapter uses {what}: PEFT loads it, but vLLM's LoRA serving does not; to serve it "
                      f"with vLLM, merge it into the base (lora merge) and serve the merged folder")
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot save an adapter to {path}: it is a file; give a folder path")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    layers = dict(lora_layers(model))
    config = info.config.to_peft(list(info.target_paths), base_model_name_or_path)
    config["fan_in_fan_out"] = any(layers[p].fan_in_fan_out for p in info.target_paths)
    if config["fan_in_fan_out"] and not all(layers[p].fan_in_fan_out for p in info.target_paths):
        warnings.warn("this adapter wraps both Conv1D and Linear layers; PEFT's single fan_in_fan_out flag cannot "
                      "describe that, so PEFT may load it wrongly (this library reads it correctly)")
    config[FINGERPRINT_KEY] = base_fingerprint(model, info.target_paths)
    tensors = {k: v.to("cpu", torch.float32).contiguous() if v.is_floating_point() else v.cpu().contiguous()
               for k, v in adapter_state_dict(model, adapter).items()}

    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


# -- reading ----------------------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter folder (ours or PEFT's): its config, the raw JSON dict, and its tensors on CPU.

    Raises:
        ValueError: the folder or a file is missing, the JSON is invalid, or the weights are corrupt or truncated.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"adapter folder {path} does not exist (expected a folder with {CONFIG_NAME} and "
                         f"{WEIGHTS_NAME}, as written by lora.save_adapter or PEFT's save_pretrained)")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise ValueError(f"{path} has no {CONFIG_NAME}; an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not weights_file.is_file():
        hint = " (an old PEFT adapter_model.bin is a pickle and is not read; re-save it with safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise ValueError(f"{path} has no {WEIGHTS_NAME}{hint}")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); the file is corrupt, re-save the adapter") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} must hold a JSON object, found {type(raw).__name__}")
    cfg = LoraConfig.from_peft(raw)
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{weights_file} is corrupt or truncated and cannot be read ({e}); re-save the adapter "
                         f"or copy the file again") from None
    bad = [k for k in tensors if not k.startswith(PEFT_PREFIX)]
    if bad:
        raise ValueError(f"{weights_file} has keys without PEFT's '{PEFT_PREFIX}' prefix, e.g. {bad[:3]}; it is "
                         f"not a PEFT LoRA adapter file")
    return cfg, raw, tensors


def _check_keys(path, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshapen = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing from the file ({len(missing)}): {missing[:8]}")
    if unexpected:
        problems.append(f"in the file but not in the model ({len(unexpected)}): {unexpected[:8]}")
    if misshapen:
        problems.append(f"wrong shape ({len(misshapen)}): {misshapen[:8]}")
    if problems:
        raise ValueError(f"adapter {path} does not fit this model; " + "; ".join(problems) +
                         ". It was probably trained on a different model architecture or size.")


def _check_base(path, raw: dict[str, Any], model: nn.Module, paths: list[str]) -> None:
    saved_fp = raw.get(FINGERPRINT_KEY)
    if saved_fp is None:
        warnings.warn(f"{path} records no base-model fingerprint (made by PEFT or another tool); it cannot be "
                      f"checked against this base model, so make sure it was trained on this one")
        return
    distance = _fingerprint_distance(saved_fp, base_fingerprint(model, paths))
    if distance > _FP_TOLERANCE:
        raise ValueError(
            f"adapter {path} was trained on a different base model (base_model_name_or_path="
            f"{raw.get('base_model_name_or_path')!r}): its targeted weights differ from this model's "
            f"(relative distance {distance:.3g} > {_FP_TOLERANCE}), as between a base and its instruct variant. "
            f"Load the right base model, or pass check_base=False to load it anyway")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default", trainable: bool = False,
                 check_base: bool = True) -> list[str]:
    """Load an adapter folder (ours or PEFT's) into ``model`` as adapter ``adapter`` and make it active.

    Injects the adapter first when the model does not have it yet. Keys are checked strictly.

    Args:
        model: The base model (or one that already has this adapter injected, e.g. to continue training).
        path: Folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        adapter: The name to load it under.
        trainable: Leave the adapter's parameters trainable (to continue training); otherwise all are frozen.
        check_base: Refuse an adapter whose recorded base-model fingerprint does not match this model.

    Returns:
        The wrapped module paths.

    Raises:
        ValueError: unreadable folder, missing/unexpected/misshapen keys (each named), or a different base model.
    """
    cfg, raw, tensors = read_adapter(path)
    registry = adapters_of(model)
    injected_here = adapter not in registry
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    if injected_here:
        paths = inject(model, cfg, adapter)
    else:
        have = registry[adapter].config
        if (have.r, have.alpha, have.rslora, have.dora) != (cfg.r, cfg.alpha, cfg.rslora, cfg.dora):
            raise ValueError(f"adapter {adapter!r} is already in the model with r={have.r}, alpha={have.alpha}, "
                             f"rslora={have.rslora}, dora={have.dora}, but {path} has r={cfg.r}, alpha={cfg.alpha}, "
                             f"rslora={cfg.rslora}, dora={cfg.dora}; load it under another adapter name")
        paths = list(registry[adapter].target_paths)
    try:
        expected = adapter_state_dict(model, adapter)
        _check_keys(path, expected, tensors)
        if check_base:
            _check_base(path, raw, model, paths)
    except ValueError:
        if injected_here:  # leave the user's model exactly as it was
            remove_adapter(model, adapter)
            for p, flag in requires_grad:
                p.requires_grad_(flag)
        raise

    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))
    set_active(model, adapter)
    set_trainable(model, adapter, trainable)
    return paths


__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_adapter", "base_fingerprint", "PEFT_PREFIX"]
