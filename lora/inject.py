"""Put LoRA adapters into a model: target matching, injection, freezing, switching adapters on and off."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .config import ALL_LINEAR, RESIDUAL_INITS, LoraConfig
from .layers import LoRALinear, RowGroups, SavedModule, is_linear_like, principal_init_problem

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class AdapterInfo:
    """What ``inject`` did for one adapter name: kept on the model so saving needs nothing else."""

    config: LoraConfig
    target_paths: tuple[str, ...]
    saved_module_paths: tuple[str, ...]


def adapters_of(model: nn.Module) -> dict[str, AdapterInfo]:
    """The adapters injected into ``model``, by name (empty if none)."""
    return model.__dict__.setdefault("_lora_adapters", {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every ``LoRALinear`` in the model with its path."""
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield path, module


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear | SavedModule]]:
    """Every module that holds adapters (``LoRALinear`` and ``SavedModule``) with its path."""
    for path, module in model.named_modules():
        if isinstance(module, (LoRALinear, SavedModule)):
            yield path, module


def _outside_wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the insides of adapter wrappers (their base layers, A/B, trained copies)."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, (LoRALinear, SavedModule)):
            inside.append(path + ".")
        yield path, module


def _matches_suffix(path: str, suffix: str) -> bool:
    return path == suffix or path.endswith("." + suffix)


def _layer_index(path: str) -> int | None:
    m = _LAYER_INDEX.search(path)
    return int(m.group(1)) if m else None


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output (vocabulary) head, which ``"all-linear"`` leaves alone.

    Hugging Face models say which module it is (``get_output_embeddings``); for a plain ``nn.Module`` it is any
    linear layer whose output size equals the vocabulary size of the largest ``nn.Embedding``.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        return {p for p, m in model.named_modules() if m is head or (isinstance(m, LoRALinear) and m.base_layer is head)}
    vocab = max((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), default=None)
    if vocab is None:
        return set()
    return {p for p, m in _linear_modules(model) if _out_features(m) == vocab}


def _out_features(module: nn.Module) -> int:
    if isinstance(module, LoRALinear):
        return module.out_features
    return module.nf if not isinstance(module, nn.Linear) else module.out_features


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear/Conv1D of the model itself, or the LoRA wrapper standing in its place.

    The insides of wrappers are not the model's layers: a second adapter must not wrap the first one's A and B.
    """
    return [(path, m) for path, m in _outside_wrappers(model) if isinstance(m, LoRALinear) or is_linear_like(m)]


def match_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The module paths ``cfg`` selects, in model order.

    Raises:
        ValueError: nothing matched; the message lists the layers that could have been targeted.
    """
    candidates = _linear_modules(model)
    heads = output_head_paths(model)
    if cfg.targets == ALL_LINEAR:
        # the output head and modules trained in full (e.g. a classifier's `score`) are not LoRA targets
        chosen = [p for p, _ in candidates if p not in heads
                  and not any(_matches_suffix(p, m) for m in cfg.modules_to_save)]
    elif isinstance(cfg.targets, str):
        pattern = re.compile(cfg.targets)
        chosen = [p for p, _ in candidates if pattern.fullmatch(p)]
    else:
        chosen = [p for p, _ in candidates if any(_matches_suffix(p, t) for t in cfg.targets)]
    chosen = [p for p in chosen if not any(_matches_suffix(p, e) for e in cfg.exclude)]
    if cfg.layers is not None:
        chosen = [p for p in chosen if _layer_index(p) in cfg.layers]
    if not chosen:
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in candidates})
        indices = sorted({i for p, _ in candidates if (i := _layer_index(p)) is not None})
        raise ValueError(
            f"LoraConfig(targets={cfg.targets!r}, exclude={list(cfg.exclude)}, layers={cfg.layers}) matched no "
            f"layer. Linear layers in this model (suffixes): {names}; block indices: {indices}; "
            f"example full paths: {[p for p, _ in candidates[:6]]}")
    return chosen


def _shared_with(model: nn.Module, path: str) -> list[str]:
    """Parameters outside module ``path`` that are the very tensors of parameters inside it (tied weights)."""
    inside = {id(p) for p in model.get_submodule(path).parameters()}
    return [name for name, p in model.named_parameters(remove_duplicate=False)
            if id(p) in inside and not name.startswith(path + ".")]


def _check_not_tied(model: nn.Module, paths: list[str], role: str) -> None:
    """Refuse to adapt a module whose weights are shared with another module (e.g. a head tied to the embedding).

    A LoRA target merged into such a weight would change the other module too; a trained copy of it
    (``modules_to_save``) would silently stop being tied, and exporting would then keep only one of the two.
    """
    for path in paths:
        sharing = _shared_with(model, path)
        if sharing:
            owner = sharing[0].rsplit(".", 1)[0]
            raise ValueError(
                f"'{path}' ({role}) shares its weight with '{owner}' (tied weights, e.g. an output head tied to the "
                f"input embedding), so adapting it would change or silently untie '{owner}'. Leave it out, or untie "
                f"it first: model.{path}.weight = torch.nn.Parameter(model.{path}.weight.detach().clone()) and set "
                f"model.config.tie_word_embeddings = False")


def inject(model: nn.Module, cfg: LoraConfig, adapter: str = "default") -> list[str]:
    """Wrap the layers ``cfg`` selects with LoRA adapter ``adapter`` and freeze everything else.

    A second adapter name goes into the same wrappers; the newly injected adapter becomes the active one.

    Args:
        model: Any ``nn.Module`` (a Hugging Face causal LM, GPT-2 with ``Conv1D``, or a hand-written GPT).
        cfg: What to wrap and how.
        adapter: Adapter name (letters, digits, ``_`` and ``-``; no dots, so PEFT keys stay unambiguous).

    Returns:
        The wrapped module paths, in model order.

    Raises:
        ValueError: nothing matched, the adapter name is taken or malformed, ``modules_to_save`` matched nothing,
            or a target's weight is tied to another module.
    """
    if not isinstance(adapter, str) or not _ADAPTER_NAME.match(adapter):
        raise ValueError(f"adapter name {adapter!r} must start with a letter or '_' and contain only letters, "
                         f"digits, '_' and '-'")
    registry = adapters_of(model)
    if adapter in registry:
        raise ValueError(f"adapter {adapter!r} is already injected into this model; pick another name, e.g. "
                         f"adapter='{adapter}2'")
    paths = match_targets(model, cfg)
    _check_not_tied(model, paths, "a LoRA target")
    saved = _match_modules_to_save(model, cfg.modules_to_save, paths)
    _check_not_tied(model, saved, "in modules_to_save")

    if cfg.init in RESIDUAL_INITS:  # every target asked before any is touched: no residual to undo, no rounding
        for path in paths:
            problem = principal_init_problem(model.get_submodule(path), cfg)
            if problem:
                raise ValueError(f"{path}: {problem}")
    with unchanged_on_error(model):  # a layer that fails anyway undoes the ones already wrapped
        registry[adapter] = AdapterInfo(cfg, tuple(paths), tuple(saved))
        for path in paths:
            _wrapped(model, path, LoRALinear).add_adapter(adapter, cfg)
        for path in saved:
            _wrapped(model, path, SavedModule).add_adapter(adapter)
    set_active(model, adapter)
    _set_trainable(model, adapter)
    return paths


def _wrapped(model: nn.Module, path: str, wrapper: type[LoRALinear] | type[SavedModule]):
    """The ``wrapper`` at ``path``, putting one around the module there first if it has none yet."""
    module = model.get_submodule(path)
    if not isinstance(module, wrapper):
        module = wrapper(module).train(module.training)  # a model in eval mode stays in it (LoRA dropout off)
        _replace(model, path, module)
    return module


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def _match_modules_to_save(model: nn.Module, names: tuple[str, ...], lora_paths: list[str]) -> list[str]:
    found = []
    for name in names:
        hits = [p for p, _ in _outside_wrappers(model) if p and _matches_suffix(p, name)]
        if not hits:
            raise ValueError(f"modules_to_save entry {name!r} matched no module; top-level modules are "
                             f"{[n for n, _ in model.named_children()]}")
        clash = [p for p in hits if p in lora_paths]
        if clash:
            raise ValueError(f"{clash[0]!r} is both a LoRA target and in modules_to_save; a module is either "
                             f"adapted or trained in full, not both")
        found.extend(hits)
    return found


def _set_trainable(model: nn.Module, adapter: str) -> None:
    """Freeze everything, then unfreeze adapter ``adapter``: its A/B (and DoRA magnitudes), saved modules, biases."""
    info = adapters_of(model)[adapter]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter in layer.lora_A:
            for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                p.requires_grad_(True)
            if adapter in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[adapter].requires_grad_(True)
            if info.config.bias == "lora_only" and layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    if info.config.bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    for path in info.saved_module_paths:
        for p in model.get_submodule(path).modules_to_save[adapter].parameters():
            p.requires_grad_(True)


def set_trainable(model: nn.Module, adapter: str, trainable: bool = True) -> None:
    """Make adapter ``adapter`` the one that trains (``trainable=True``) or freeze every parameter (``False``)."""
    if adapter not in adapters_of(model):
        raise ValueError(f"no adapter {adapter!r} in this model; it has {sorted(adapters_of(model))}")
    if trainable:
        _set_trainable(model, adapter)
    else:
        for p in model.parameters():
            p.requires_grad_(False)


def set_active(model: nn.Module, names: str | list[str] | tuple[str, ...]) -> None:
    """Make ``names`` the active adapter(s) everywhere; the rest stay loaded but have no effect.

    Raises:
        ValueError: a name is not an adapter of this model.
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    known = adapters_of(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(known)}")
    for _, module in adapter_modules(model):  # check everything before switching anything
        if isinstance(module, SavedModule):
            module.active_among(names)
        elif module.merged_adapters and set(module.merged_adapters) - set(names):
            raise ValueError("an adapter that would be switched off is merged into the base weights; call "
                             "lora.unmerge(model) first")
    for _, module in adapter_modules(model):
        module.set_active(names)


def remove_adapter(model: nn.Module, adapter: str) -> None:
    """Delete adapter ``adapter``; wrappers left with no adapter are replaced by the module they wrap again."""
    registry = adapters_of(model)
    if adapter not in registry:
        raise ValueError(f"no adapter {adapter!r} in this model; it has {sorted(registry)}")
    for path, layer in lora_layers(model):
        if adapter in layer.merged_adapters:
            raise ValueError(f"adapter {adapter!r} is merged into the base weights; call lora.unmerge(model) first")
    for path, module in list(adapter_modules(model)):
        if adapter not in module.adapters:
            continue
        module.remove_adapter(adapter)
        if not module.adapters:
            _replace(model, path, module.base_layer if isinstance(module, LoRALinear) else module.original_module)
    del registry[adapter]


@contextlib.contextmanager
def unchanged_on_error(model: nn.Module) -> Iterator[None]:
    """Run a block that may add adapters; if it raises, leave the model exactly as it was before it.

    Adapters added inside the block are removed again, and every module's active adapters and every parameter's
    ``requires_grad`` are restored (removing an adapter alone would leave the earlier adapters switched off).
    """
    before = set(adapters_of(model))
    active = {id(m): m.active_adapters for _, m in adapter_modules(model)}
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for name in set(adapters_of(model)) - before:
            remove_adapter(model, name)
        for path, module in list(adapter_modules(model)):  # a wrapper made for an adapter that then failed
            if not module.adapters:
                _replace(model, path, module.base_layer if isinstance(module, LoRALinear) else module.original_module)
        for _, module in adapter_modules(model):
            if id(module) in active:
                module.active_adapters = active[id(module)]
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter is bypassed (merged ones are unmerged, then merged back on exit)."""
    layers = [module for _, module in adapter_modules(model)]
    remerge = [layer for layer in layers if isinstance(layer, LoRALinear) and layer.merged_adapters]
    for layer in remerge:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer in remerge:
            layer.merge()


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: list[str | None] | tuple[str | None, ...]) -> Iterator[nn.Module]:
    """Run each batch row with its own adapter: ``names[i]`` for row ``i``, None for the base model.

    Inside the block, a forward pass over a batch of ``len(names)`` rows gives every row what it would get alone
    with its adapter active: one base pass for the whole batch, plus one low-rank pass per adapter over its rows
    (and its own ``modules_to_save`` copies). Serving many adapters from one batch, as in S-LoRA / vLLM.

    Raises:
        ValueError: an unknown adapter name, a DoRA adapter (its update depends on the whole weight), or merged
            adapters (unmerge first).
    """
    names = tuple(names)
    known = adapters_of(model)
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown} in row_adapters; this model has {sorted(known)} (None "
                         f"means the base model)")
    dora = sorted({n for n in names if n is not None and known[n].config.dora})
    if dora:
        raise ValueError(f"adapter(s) {dora} use DoRA, which row_adapters cannot mix per row; run them in batches "
                         f"of their own with lora.set_active")
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise ValueError("adapters are merged into the base weights; call lora.unmerge(model) before row_adapters")
    modules = [module for _, module in adapter_modules(model)]
    groups = RowGroups(names)  # worked out once, shared by every layer
    for module in modules:
        module.row_adapters = groups
    try:
        yield model
    finally:
        for module in modules:
            module.row_adapters = None


def parameter_count(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters (tied weights counted once) and the trainable percentage."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


__all__ = ["inject", "remove_adapter", "disabled", "set_active", "set_trainable", "parameter_count", "adapters_of",
           "lora_layers", "adapter_modules", "unchanged_on_error", "row_adapters", "match_targets", "AdapterInfo"]
