"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.lora_A.weight`` (``r x in``), ``...lora_B.weight`` (``out x r``),
``...lora_magnitude_vector`` (DoRA), ``...lora_embedding_A`` / ``...lora_embedding_B`` (an embedding),
``...token_adapter.trainable_tokens_delta`` (trainable vocabulary rows), and the model's own keys for trained biases
and ``modules_to_save`` modules, all prefixed ``base_model.model.``, with no adapter name inside. A parameter adapter
(``target_parameters``) sits at its module's path, ``.base_layer`` once more for each parameter of the same module
targeted after it, as PEFT nests them. See ``adapters/README.md``.
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

from . import model_card
from .atomic import atomic_dir, refuse_foreign
from .config import RESIDUAL_INITS, LoraConfig
from .inject import adapter_modules, adapters_of, inject, lora_layers, set_active, set_trainable, unchanged_on_error
from .layers import LoRALinear, LoRAParameter, SavedModule
from .tokens import ADDED_TOKENS_KEY, added_tokens

PEFT_PREFIX = "base_model.model."
# Ours, beside PEFT's target_parameters (which we write in PEFT's nesting order): the parameters whose experts module
# stores them (experts, in, out), so that a merge without the model computes each update in the stored layout.
TRANSPOSED_KEY = "transposed_parameters"
TOKEN_ROWS = ".token_adapter.trainable_tokens_delta"
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
    for path, module in adapter_modules(model):  # LoRA layers, embeddings, trainable vocabulary rows
        if isinstance(module, (SavedModule, LoRAParameter)) or adapter not in module.adapters:
            continue
        for name, t in module.adapter_tensors(adapter).items():
            out[f"{PEFT_PREFIX}{path}.{name}"] = t.detach()
    wrappers = parameter_wrappers(model)
    for full, key_path in parameter_key_paths(model, info.parameter_paths).items():
        for name, t in wrappers[full].adapter_tensors(adapter).items():
            out[f"{PEFT_PREFIX}{key_path}.{name}"] = t.detach()
    if info.config.bias != "none":
        wrapped = {path for path, layer in lora_layers(model)
                   if isinstance(layer, LoRALinear) and adapter in layer.adapters}
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


def parameter_wrappers(model: nn.Module) -> dict[str, LoRAParameter]:
    """Every parameter wrapper by the parameter it adapts: ``<module path>.<name>``, with the module's path as the
    model has it (where its outermost wrapper stands)."""
    out = {}
    for path, layer in lora_layers(model):
        if isinstance(layer, LoRAParameter):
            outer = path
            while outer.endswith(".base_layer") and isinstance(model.get_submodule(outer[:-11]), LoRAParameter):
                outer = outer[:-11]  # an inner wrapper of nested ones: its module is where the outer one stands
            out[f"{outer}.{layer.parameter_name}"] = layer
    return out


def parameter_key_paths(model: nn.Module, parameter_paths) -> dict[str, str]:
    """PEFT's module path for the adapter of each parameter in ``parameter_paths``.

    PEFT wraps a module once per targeted parameter, in the order the module registered them, each wrapper around
    the last: the last parameter's adapter is at the module's path, the one before at ``<path>.base_layer``, and so
    on. Worked out from the adapter's own parameters, whatever other adapters nested here, so the keys are the ones
    PEFT writes and reads for this adapter alone.
    """
    by_module: dict[str, list[str]] = {}
    for full in parameter_paths:
        path, _, name = full.rpartition(".")
        by_module.setdefault(path, []).append(name)
    out = {}
    for path, names in by_module.items():
        module = model.get_submodule(path)
        owner = module.owner if isinstance(module, LoRAParameter) else module
        order = [n for n, _ in owner.named_parameters(recurse=False)]
        names.sort(key=order.index)
        for i, name in enumerate(names):
            out[f"{path}.{name}"] = ".".join([path] + ["base_layer"] * (len(names) - 1 - i))
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
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

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


def _adapted(model: nn.Module) -> dict[str, nn.Module]:
    """Every low-rank wrapper by the name fingerprints give its base tensor: a module path, or for a parameter
    adapter ``<module path>.<parameter>``."""
    return {path: layer for path, layer in lora_layers(model) if not isinstance(layer, LoRAParameter)} \
        | parameter_wrappers(model)


def _fingerprinted(info) -> list[str]:
    return list(info.target_paths) + list(info.parameter_paths)


def _live_base(model: nn.Module, target_paths) -> tuple[Callable[[str], list[float]], torch.dtype]:
    """Fingerprint samples of a live model's base weights by module path (or parameter path), and the dtype they
    are stored in.

    A 4-bit base (``quantize="nf4"``) answers with the samples of the full-precision weights it was made from.
    """
    layers = _adapted(model)

    def sample(path: str) -> list[float]:
        kept = getattr(layers[path].base_layer, "full_precision_sample", None)
        return kept if kept is not None else fingerprint_sample(layers[path].base_weight())

    return sample, layers[sorted(target_paths)[0]].base_parameter.dtype


def read_on_save(module: nn.Module) -> list[nn.Parameter]:
    """The parameters under ``module`` that saving its adapters reads: the trainable ones, and the base weights
    that each adapter's fingerprint samples. A model sharded by DeepSpeed ZeRO-3 gathers just these to save (see
    :func:`lora.train.checkpoint.whole_parameters`), not the whole base."""
    wanted = {id(p): p for p in module.parameters() if p.requires_grad}
    for model in module.modules():
        adapters = model.__dict__.get("_lora_adapters")  # what adapters_of reads, without adding it
        if adapters:
            layers = _adapted(model)
            for info in adapters.values():
                for path in _fingerprint_paths(_fingerprinted(info)):
                    weight = layers[path].base_parameter
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
                 base_model_name_or_path: str | None = None, card: dict[str, Any] | None = None) -> Path:
    """Write adapter ``adapter`` as a PEFT-compatible folder (fp32 weights), atomically, with a model card.

    Args:
        model: A model with the adapter injected.
        path: Output folder; an existing adapter folder there is replaced only once the new one is complete.
        adapter: Which adapter to save.
        base_model_name_or_path: Recorded for PEFT/vLLM; defaults to the model's own ``name_or_path``.
        card: What the run knew, for the model card (``README.md``, see :mod:`lora.model_card`): mappings under
            ``"data"``, ``"training"`` and ``"metrics"``. The card is rewritten on every save; a failure to write
            it warns and the adapter is saved without it.

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
    if info.parameter_paths:  # the exact parameters, in PEFT's nesting order (PEFT itself reads them in any order)
        wrappers = parameter_wrappers(model)
        config["target_parameters"] = list(info.parameter_paths)
        config[TRANSPOSED_KEY] = [p for p in info.parameter_paths if wrappers[p].transposed]
    if info.token_paths:
        config["trainable_token_indices"] = _peft_token_indices(model, info, adapter)
    if added_tokens(model):  # the vocabulary this adapter was trained with: refused on the base without it
        config[ADDED_TOKENS_KEY] = added_tokens(model)
    config[FINGERPRINT_KEY] = base_fingerprint(model, _fingerprinted(info))
    tensors = {k: v.to("cpu", torch.float32).contiguous() if v.is_floating_point() else v.cpu().contiguous()
               for k, v in tensors.items()}

    with atomic_dir(path, owns=_adapter_files(path)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _write_card(tmp, path, config, tensors, card)
    return path


def _write_card(tmp: Path, path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                card: dict[str, Any] | None) -> None:
    """The model card, written so that it never blocks a save: it is for people, the adapter is for programs."""
    try:
        model_card.write(tmp, config, sum(t.numel() for t in tensors.values()), (tmp / WEIGHTS_NAME).stat().st_size,
                         card, display_folder=path)
    except Exception as e:  # noqa: BLE001 - whatever went wrong in the card, the adapter is saved
        warnings.warn(f"{path}: the model card (README.md) was not written ({type(e).__name__}: {e}); the adapter "
                      f"itself is saved")


def _input_embedding_path(model: nn.Module) -> str | None:
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    for path, module in model.named_modules():
        if embedding is not None and (module is embedding or getattr(module, "base_layer", None) is embedding):
            return path
    return None


def _peft_token_indices(model: nn.Module, info, adapter: str) -> list[int] | dict[str, list[int]]:
    """PEFT's ``trainable_token_indices``: a list when only the input embedding owns rows (PEFT then adds a tied
    head itself), else ``{module path: ids}`` for each module that owns rows (an untied head too)."""
    ids = {path: list(model.get_submodule(path).token_indices[adapter]) for path in info.token_paths}
    if list(ids) == [_input_embedding_path(model)]:
        return next(iter(ids.values()))
    return ids


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
        is_a = key.endswith((".lora_A.weight", ".lora_embedding_A"))
        is_b = key.endswith((".lora_B.weight", ".lora_embedding_B"))
        if not (is_a or is_b):
            continue
        rank = t.shape[0 if is_a else 1] if t.dim() == 2 else None
        # a parameter adapter holds r rows (columns) per expert: a multiple of r
        fits = rank == cfg.r or (rank is not None and cfg.target_parameters and ".lora_embedding_" not in key
                                 and rank % cfg.r == 0)
        if not fits:
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
    _check_vocabulary(path, model, raw, cfg, tensors)
    cfg = _rows_where_saved(path, cfg, raw, tensors)
    tensors, matrices = _embedding_matrices(tensors)
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
        wrapping = [layer for _, layer in adapter_modules(model) if adapter in layer.adapters
                    and not isinstance(layer, SavedModule)]
        if any(adapter in getattr(layer, "merged_adapters", ()) for layer in wrapping):
            # its old update stays in the base weights, and a later unmerge would subtract the new one instead
            raise ValueError(f"adapter {adapter!r} is merged into the base weights; call lora.unmerge(model) before "
                             f"loading {path} into it, or load it under another adapter name")
        if any(adapter in getattr(layer, "initial_factors", ()) for layer in wrapping):
            raise ValueError(f"adapter {adapter!r} started from the base's principal part (init={have.init!r}), so "
                             f"its layers hold a residual base; load {path} under another adapter name")
    with unchanged_on_error(model):  # a failed load leaves the user's model exactly as it was
        if adapter not in registry:
            inject(model, cfg, adapter)
        info = registry[adapter]
        paths = list(info.target_paths) + list(info.parameter_paths)
        expected = adapter_state_dict(model, adapter)
        _check_keys(path, expected, tensors)
        if check_base:
            check_base_fingerprint(path, raw, *_live_base(model, _fingerprinted(info)))
        matrices = _matrices_to_copy(path, model, matrices)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))
        for weight, tensor in matrices:
            weight.copy_(tensor.to(weight.dtype))
    set_active(model, adapter)
    set_trainable(model, adapter, trainable)
    return paths


def _vocabulary_rows(model: nn.Module) -> int | None:
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    return getattr(embedding, "num_embeddings", None)


def _check_vocabulary(path, model: nn.Module, raw: dict[str, Any], cfg: LoraConfig,
                      tensors: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter trained with a grown vocabulary on a model without it, saying what to do."""
    rows = _vocabulary_rows(model)
    if rows is None:
        return
    record = raw.get(ADDED_TOKENS_KEY)
    if isinstance(record, dict) and record.get("vocab_size") and record["vocab_size"] != rows:
        raise ValueError(f"adapter {path} was trained with the tokens {record.get('tokens')} added to its base "
                         f"(lora.add_tokens: {record['vocab_size']} vocabulary rows), but this model has {rows}. "
                         f"Add them first, with the base's tokenizer: lora.add_tokens(model, tokenizer, "
                         f"{record.get('tokens')!r}), then load the adapter; or load the model lora merge wrote, "
                         f"which has them")
    token_ids = cfg.trainable_tokens or ()
    ids = [i for _, group in token_ids for i in group] if token_ids and isinstance(token_ids[0], tuple) \
        else list(token_ids)
    columns = [t.shape[1] for k, t in tensors.items() if k.endswith(".lora_embedding_A")]
    needed = max([i + 1 for i in ids] + columns, default=0)
    if needed > rows:
        raise ValueError(f"adapter {path} trains a vocabulary of at least {needed} rows, but this model's has {rows}: "
                         f"it was trained after tokens were added. Add the same tokens to the tokenizer and grow "
                         f"the model first (lora.add_tokens(model, tokenizer, [...]), or "
                         f"model.resize_token_embeddings({needed})), then load the adapter")


def _rows_where_saved(path, cfg: LoraConfig, raw: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoraConfig:
    """``trainable_tokens`` as the modules whose rows the file holds: PEFT's list form means the input embedding
    alone (a tied head follows it), where ours trains an untied head too and says so with a mapping."""
    owners = [k[len(PEFT_PREFIX):-len(TOKEN_ROWS)] for k in tensors if k.endswith(TOKEN_ROWS)]
    indices = raw.get("trainable_token_indices")
    if not indices:
        if owners:
            raise ValueError(f"{path} holds trainable token rows ({owners[0]}) but its config has no "
                             f"trainable_token_indices; the folder is damaged, re-save the adapter")
        return cfg
    if not owners:
        raise ValueError(f"{path}: adapter_config.json sets trainable_token_indices, but the weights hold no "
                         f"'{TOKEN_ROWS[1:]}' rows; the file is incomplete, re-save the adapter")
    rows = []
    for owner in owners:
        if isinstance(indices, dict):
            ids = next((v for k, v in indices.items() if owner == k or owner.endswith("." + k)), None)
            if ids is None:
                raise ValueError(f"{path} holds trainable token rows for {owner}, which trainable_token_indices "
                                 f"{sorted(indices)} does not name; re-save the adapter")
        else:
            ids = indices
        rows.append((owner, tuple(ids)))
    return cfg.replace(trainable_tokens=tuple(rows))


def _embedding_matrices(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split off the whole embedding and head matrices PEFT saves beside an adapter on them
    (``<path>.base_layer.weight``): they are the base's, not the adapter's."""
    matrices = {k: t for k, t in tensors.items() if k.endswith(".base_layer.weight")}
    return {k: t for k, t in tensors.items() if k not in matrices}, matrices


def _matrices_to_copy(path, model: nn.Module,
                      matrices: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What PEFT's saved base matrices do to the model: nothing where they are the model's own, else they replace
    them (as PEFT's loader does: a vocabulary grown and trained with PEFT carries its rows this way)."""
    out = []
    for key, tensor in matrices.items():
        module_path = key[len(PEFT_PREFIX):-len(".base_layer.weight")]
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise ValueError(f"{path} holds {key}, but the model has no module {module_path}; it was trained on a "
                             f"different model architecture") from None
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is None or weight.shape != tensor.shape:
            raise ValueError(f"{path} holds the base matrix of {module_path} as {tuple(tensor.shape)}, but the model's "
                             f"is {None if weight is None else tuple(weight.shape)}: it was saved for a model with "
                             f"another vocabulary size. Grow this one first (model.resize_token_embeddings("
                             f"{tensor.shape[0]}) with the tokens added to the tokenizer, or lora.add_tokens)")
        if not torch.equal(weight.detach().cpu().to(tensor.dtype), tensor):
            warnings.warn(f"{path} holds {module_path}'s whole base matrix (PEFT saves it beside an adapter on an "
                          f"embedding or a grown vocabulary) and it differs from this model's: it replaces it, as "
                          f"in PEFT")
            out.append((weight, tensor))
    return out


__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_adapter", "base_fingerprint", "fingerprint",
           "fingerprint_sample",
           "check_base_fingerprint", "parameter_wrappers", "parameter_key_paths", "PEFT_PREFIX", "TRANSPOSED_KEY",
           "TOKEN_ROWS"]
