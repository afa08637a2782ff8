"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.lora_A.weight`` (``r x in``), ``...lora_B.weight`` (``out x r``),
``...lora_magnitude_vector`` (DoRA), and the model's own keys for trained biases and ``modules_to_save`` modules,
all prefixed ``base_model.model.``, with no adapter name inside. See ``adapters/README.md``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir, refuse_foreign
from .config import RESIDUAL_INITS, LoraConfig
from .inject import adapters_of, inject, lora_layers, set_active, set_trainable, unchanged_on_error

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FINGERPRINT_KEY = "base_model_fingerprint"
# A fingerprint samples this many values from each of at most this many targeted base weights: enough to tell a
# base from a copy of it fine-tuned for a few steps, small enough for a JSON file.
_FP_VALUES, _FP_TENSORS = 16, 32
# Sampled values of the same base may differ only by rounding: to the coarser of the two dtypes (a bf16 copy of an
# fp32 base), and from unmerging a merged adapter. This many units of that dtype's epsilon allow both; one step of
# fine-tuning moves weights by far more, at least in fp32 and fp16.
_FP_EPSILONS = 4
# Fingerprints written before the dtype was recorded kept 6 significant digits.
_FP_LEGACY_PRECISION = 1e-5


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
    for path in info.saved_module_paths:  # the adapter's own trained copy, under the module's own keys (PEFT's)
        for name, t in model.get_submodule(path).modules_to_save[adapter].state_dict().items():
            out[f"{PEFT_PREFIX}{path}.{name}"] = t.detach()
    return out


def _adapter_info(model: nn.Module, adapter: str):
    registry = adapters_of(model)
    if adapter not in registry:
        raise ValueError(f"the model has no adapter {adapter!r}; it has {sorted(registry) or 'none'} "
                         f"(call lora.inject or lora.load_adapter first)")
    return registry[adapter]


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``, which decides the wrapper class ``PeftModel.from_pretrained`` builds.

    Read from transformers' own tables of model classes: a sequence classifier needs ``SEQ_CLS`` (PEFT then runs
    its ``score``/``classifier`` head), a causal LM ``CAUSAL_LM``; any other module gets None (PEFT's plain
    wrapper, which calls the module as it is).
    """
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    name = type(model).__name__
    if name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return "SEQ_CLS"
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "CAUSAL_LM"
    return None


# -- fingerprint ------------------------------------------------------------------------------------------------
def _fingerprint_paths(target_paths) -> list[str]:
    """The targeted layers a fingerprint samples: all of them, or an even spread of ``_FP_TENSORS``."""
    paths = sorted(target_paths)
    if len(paths) > _FP_TENSORS:
        step = len(paths) / _FP_TENSORS
        paths = [paths[int(i * step)] for i in range(_FP_TENSORS)]
    return paths


def fingerprint_sample(weight: torch.Tensor) -> list[float]:
    """The values a fingerprint keeps of one base weight (``out x in``): evenly spaced, exact."""
    flat = weight.detach().float().reshape(-1)
    return flat[torch.linspace(0, flat.numel() - 1, _FP_VALUES).long()].tolist()


def fingerprint(target_paths, sample: Callable[[str], list[float]], dtype: torch.dtype) -> dict[str, Any]:
    """A few exact values of the base weights an adapter targets, and their dtype, to recognise that base later.

    Args:
        target_paths: The adapter's wrapped module paths.
        sample: :func:`fingerprint_sample` of a module path's base weight (without any adapter).
        dtype: The dtype the base weights are stored in.
    """
    return {"dtype": str(dtype).removeprefix("torch."),
            "values": {path: sample(path) for path in _fingerprint_paths(target_paths)}}


def _live_base(model: nn.Module, target_paths) -> tuple[Callable[[str], list[float]], torch.dtype]:
    """Fingerprint samples of a live model's base weights by module path, and the dtype they are stored in.

    A 4-bit base (``quantize="nf4"``) answers with the samples of the full-precision weights it was made from.
    """
    layers = dict(lora_layers(model))

    def sample(path: str) -> list[float]:
        kept = getattr(layers[path].base_layer, "full_precision_sample", None)
        return kept if kept is not None else fingerprint_sample(layers[path].base_weight())

    return sample, layers[sorted(target_paths)[0]].base_layer.weight.dtype


def read_on_save(module: nn.Module) -> list[nn.Parameter]:
    """The parameters under ``module`` that saving its adapters reads: the trainable ones, and the base weights
    that each adapter's fingerprint samples. A model sharded by DeepSpeed ZeRO-3 gathers just these to save (see
    :func:`lora.checkpoint.whole_parameters`), not the whole base."""
    wanted = {id(p): p for p in module.parameters() if p.requires_grad}
    for model in module.modules():
        adapters = model.__dict__.get("_lora_adapters")  # what adapters_of reads, without adding it
        if adapters:
            layers = dict(lora_layers(model))
            for info in adapters.values():
                for path in _fingerprint_paths(info.target_paths):
                    weight = layers[path].base_layer.weight
                    wanted[id(weight)] = weight
    return list(wanted.values())


def base_fingerprint(model: nn.Module, target_paths: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The fingerprint of ``model``'s base weights (merged adapters subtracted) under ``target_paths``."""
    return fingerprint(target_paths, *_live_base(model, target_paths))


def _epsilon(dtype_name: str) -> float | None:
    dtype = getattr(torch, dtype_name, None)
    return torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def check_base_fingerprint(where, raw: dict[str, Any], sample: Callable[[str], list[float]],
                           dtype: torch.dtype) -> None:
    """Refuse an adapter whose recorded fingerprint does not match this base (warn if it has none).

    Every sampled value must agree to within a few epsilons of the coarser dtype of the two, relative to the
    value (or to the sample's RMS for values near zero): a bf16 copy of the base passes, a copy fine-tuned for a
    few steps does not.

    Args:
        where: The adapter folder, for messages.
        raw: Its ``adapter_config.json``.
        sample: :func:`fingerprint_sample` of the current base weight of a module path.
        dtype: The dtype the current base weights are stored in.

    Raises:
        ValueError: the adapter was trained on another base.
    """
    saved = raw.get(FINGERPRINT_KEY)
    if saved is not None and not isinstance(saved, dict):
        raise ValueError(f"{where}: the {FINGERPRINT_KEY} in adapter_config.json is malformed ({type(saved).__name__}, "
                         f"expected an object); re-save the adapter, or skip the check with check_base=False")
    if not saved:
        warnings.warn(f"{where} records no base-model fingerprint (made by PEFT or another tool); it cannot be "
                      f"checked against this base model, so make sure it was trained on this one")
        return
    if isinstance(saved.get("values"), dict):
        values, eps_saved = saved["values"], _epsilon(str(saved.get("dtype")))
    else:  # written before the dtype was recorded
        values, eps_saved = saved, _FP_LEGACY_PRECISION
    eps_now = _epsilon(str(dtype).removeprefix("torch."))
    if eps_saved is None or eps_now is None:
        warnings.warn(f"{where}: the base weights are not stored as floats ({dtype}), so the adapter cannot be "
                      f"checked against this base model; make sure it was trained on this one")
        return
    allowed = _FP_EPSILONS * max(eps_saved, eps_now)
    worst, worst_path = 0.0, None
    for path, recorded in values.items():
        try:
            a = torch.tensor(recorded, dtype=torch.float64)
        except (ValueError, TypeError, RuntimeError):
            raise ValueError(f"{where}: the {FINGERPRINT_KEY} in adapter_config.json is malformed at {path!r}; "
                             f"re-save the adapter, or skip the check with check_base=False") from None
        try:
            b = torch.tensor(sample(path), dtype=torch.float64)
        except KeyError:  # the base has no such weight
            worst, worst_path = float("inf"), path
            break
        if a.shape != b.shape:
            worst, worst_path = float("inf"), path
            break
        scale = torch.maximum(a.abs(), a.pow(2).mean().sqrt()).clamp_min(1e-30)
        distance = float(((a - b).abs() / scale).max())
        if distance > worst:
            worst, worst_path = distance, path
    if worst > allowed:
        raise ValueError(
            f"adapter {where} was trained on a different base model (base_model_name_or_path="
            f"{raw.get('base_model_name_or_path')!r}): the weights of {worst_path!r} differ from the ones it was "
            f"trained on by up to {worst:.3g} (relative; rounding between dtypes allows {allowed:.3g}), as between a "
            f"base and a fine-tuned copy of it. Use the base it was trained on, or skip this check "
            f"(check_base=False; on the command line --no-check-base)")


# -- writing ----------------------------------------------------------------------------------------------------
def _adapter_files(path: Path) -> Callable[[str], bool]:
    """What saving may replace in folder ``path``: an adapter's files (ours, or PEFT's old pickle), and a README.md
    only beside an adapter config (PEFT's model card), not a folder's own README."""
    is_adapter = (path / CONFIG_NAME).is_file()
    return lambda name: name in (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin") or (name == "README.md" and is_adapter)


def check_adapter_folder(path: str | os.PathLike) -> None:
    """Refuse an adapter folder path that is an existing file, or a folder holding anything but an adapter (saving
    replaces the folder), before anything is computed or gathered."""
    refuse_foreign(path, _adapter_files(Path(path)))


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
    check_adapter_folder(path)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    layers = dict(lora_layers(model))
    cfg, tensors = _as_plain_delta(info.config, adapter, layers, adapter_state_dict(model, adapter))
    config = cfg.to_peft(list(info.target_paths), base_model_name_or_path, peft_task_type(model))
    config["fan_in_fan_out"] = any(layers[p].fan_in_fan_out for p in info.target_paths)
    if config["fan_in_fan_out"] and not all(layers[p].fan_in_fan_out for p in info.target_paths):
        warnings.warn("this adapter wraps both Conv1D and Linear layers; PEFT's single fan_in_fan_out flag cannot "
                      "describe that, so PEFT may load it wrongly (this library reads it correctly)")
    config[FINGERPRINT_KEY] = base_fingerprint(model, info.target_paths)
    tensors = {k: v.to("cpu", torch.float32).contiguous() if v.is_floating_point() else v.cpu().contiguous()
               for k, v in tensors.items()}

    with atomic_dir(path, owns=_adapter_files(path)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _as_plain_delta(cfg: LoraConfig, adapter: str, layers: dict,
                    tensors: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PiSSA/OLoRA adapter as a plain LoRA delta for the original base, as PEFT converts them on save.

    Trained ``(A, B)`` started from ``(A0, B0)`` on a residual base, so against the original weight the update is
    ``scale (B A - B0 A0)`` = ``scale [B, -B0] @ [A; A0]``: rank 2r, with alpha chosen so the scale is unchanged.
    Other adapters are returned as they are.
    """
    if cfg.init not in RESIDUAL_INITS:
        return cfg, tensors
    out = dict(tensors)
    for path, layer in layers.items():
        if adapter in layer.initial_factors:
            A0, B0 = layer.initial_factors[adapter]
            A, B = tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"]
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = torch.cat([A, A0.to(A.device)], dim=0)  # (2r, in)
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = torch.cat([B, -B0.to(B.device)], dim=1)  # (out, 2r)
    alpha = cfg.alpha * (2 ** 0.5 if cfg.rslora else 2)  # alpha / sqrt(2r) or alpha / 2r == the old scale
    return cfg.replace(r=2 * cfg.r, alpha=alpha, init="kaiming"), out


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
        raise ValueError(f"{path} has no {WEIGHTS_NAME}{hint}; re-save the adapter with lora.save_adapter (or "
                         f"PEFT's save_pretrained)")
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
    _check_tensors(weights_file, cfg, tensors)
    return cfg, raw, tensors


def _check_tensors(weights_file: Path, cfg: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors no LoRA adapter holds: foreign keys, non-float or non-finite values, A/B of another rank."""
    embedding = [k for k in tensors if ".lora_embedding_" in k]
    if embedding:
        raise ValueError(f"{weights_file} adapts an embedding layer ({embedding[0]}), which this library does not "
                         f"support (LoRA wraps linear layers); load it with PEFT, or retrain without the embedding "
                         f"among target_modules")
    bad = [k for k in tensors if not k.startswith(PEFT_PREFIX)]
    if bad:
        raise ValueError(f"{weights_file} has keys without PEFT's '{PEFT_PREFIX}' prefix, e.g. {bad[:3]}; it is "
                         f"not a PEFT LoRA adapter file. Re-save the adapter with lora.save_adapter (or PEFT's "
                         f"save_pretrained)")
    for key, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"{weights_file}: {key} has dtype {t.dtype}; adapter weights are float32, float16 or "
                             f"bfloat16. The file was not written by a LoRA trainer; re-save the adapter")
        if not torch.isfinite(t).all():
            raise ValueError(f"{weights_file}: {key} holds NaN or infinite values (training diverged); use an "
                             f"earlier checkpoint's adapter, or re-train with a lower learning_rate")
    for key, t in tensors.items():
        is_a, is_b = key.endswith(".lora_A.weight"), key.endswith(".lora_B.weight")
        if (is_a or is_b) and (t.dim() != 2 or t.shape[0 if is_a else 1] != cfg.r):
            raise ValueError(f"{weights_file}: {key} has shape {tuple(t.shape)}, which is not of rank r={cfg.r} "
                             f"as adapter_config.json says (A is r x in, B is out x r); config and weights do "
                             f"not belong together, re-save the adapter")


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
    # PEFT lists both of its classifier head names ("classifier", "score") for every SEQ_CLS adapter, whatever the
    # model has; an entry the file holds no weights for has nothing to load
    keys = [k[len(PEFT_PREFIX):] for k in tensors]
    cfg = cfg.replace(modules_to_save=tuple(name for name in cfg.modules_to_save
                                            if any(k.startswith(f"{name}.") or f".{name}." in k for k in keys)))
    registry = adapters_of(model)
    if adapter in registry:
        have = registry[adapter].config
        if (have.r, have.alpha, have.rslora, have.dora) != (cfg.r, cfg.alpha, cfg.rslora, cfg.dora):
            raise ValueError(f"adapter {adapter!r} is already in the model with r={have.r}, alpha={have.alpha}, "
                             f"rslora={have.rslora}, dora={have.dora}, but {path} has r={cfg.r}, alpha={cfg.alpha}, "
                             f"rslora={cfg.rslora}, dora={cfg.dora}; load it under another adapter name")
        wrapping = [layer for _, layer in lora_layers(model) if adapter in layer.lora_A]
        if any(adapter in layer.merged_adapters for layer in wrapping):
            # its old update stays in the base weights, and a later unmerge would subtract the new one instead
            raise ValueError(f"adapter {adapter!r} is merged into the base weights; call lora.unmerge(model) before "
                             f"loading {path} into it, or load it under another adapter name")
        if any(adapter in layer.initial_factors for layer in wrapping):
            raise ValueError(f"adapter {adapter!r} started from the base's principal part (init={have.init!r}), so "
                             f"its layers hold a residual base; load {path} under another adapter name")
    with unchanged_on_error(model):  # a failed load leaves the user's model exactly as it was
        paths = list(registry[adapter].target_paths) if adapter in registry else inject(model, cfg, adapter)
        expected = adapter_state_dict(model, adapter)
        _check_keys(path, expected, tensors)
        if check_base:
            check_base_fingerprint(path, raw, *_live_base(model, paths))
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))
    set_active(model, adapter)
    set_trainable(model, adapter, trainable)
    return paths


__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_adapter", "base_fingerprint", "fingerprint",
           "fingerprint_sample",
           "check_base_fingerprint", "PEFT_PREFIX"]
