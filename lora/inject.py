"""Put LoRA adapters into a model: target matching, injection, freezing, switching adapters on and off."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .config import ALL_LINEAR, RESIDUAL_INITS, LoraConfig
from .layers import (LoRAEmbedding, LoRALinear, LoRAParameter, RowGroups, SavedModule, TrainableTokens,
                     is_linear_like, principal_init_problem)

# The wrappers that hold low-rank adapters (merge, save and fingerprint them alike), and every adapter wrapper.
LOW_RANK = (LoRALinear, LoRAParameter, LoRAEmbedding)
WRAPPERS = (*LOW_RANK, SavedModule, TrainableTokens)

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class AdapterInfo:
    """What ``inject`` did for one adapter name: kept on the model so saving needs nothing else."""

    config: LoraConfig
    target_paths: tuple[str, ...]
    saved_module_paths: tuple[str, ...]
    parameter_paths: tuple[str, ...] = ()  # "<module path>.<parameter>" of target_parameters, in PEFT's order
    token_paths: tuple[str, ...] = ()  # modules whose trainable_tokens rows this adapter trains and saves


def adapters_of(model: nn.Module) -> dict[str, AdapterInfo]:
    """The adapters injected into ``model``, by name (empty if none)."""
    return model.__dict__.setdefault("_lora_adapters", {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAParameter | LoRAEmbedding]]:
    """Every low-rank wrapper in the model (``LoRALinear``, ``LoRAParameter``, ``LoRAEmbedding``) with its path."""
    for path, module in model.named_modules():
        if isinstance(module, LOW_RANK):
            yield path, module


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module that holds adapters (the low-rank wrappers, ``SavedModule``, ``TrainableTokens``) with its
    path, outer wrappers before the ones they wrap."""
    for path, module in model.named_modules():
        if isinstance(module, WRAPPERS):
            yield path, module


def unwrapped(module: nn.Module) -> nn.Module:
    """What a wrapper stands in for (one level down): its base layer, or a saved module's original."""
    return module.original_module if isinstance(module, SavedModule) else module.base_layer


def _outside_wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the insides of adapter wrappers (their base layers, A/B, trained copies)."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, WRAPPERS):
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
        return {p for p, m in model.named_modules()
                if m is head or (isinstance(m, (LoRALinear, TrainableTokens)) and m.base_layer is head)}
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
    """The module paths ``cfg`` selects, in model order: linear layers, and embeddings where named (never by
    ``"all-linear"``).

    Raises:
        ValueError: nothing matched; the message lists the layers that could have been targeted.
    """
    if not cfg.targets:  # parameters only (LoraConfig allows that)
        return []
    candidates = _linear_modules(model)
    if cfg.targets != ALL_LINEAR:  # an embedding is adapted only where a list or regex names it
        candidates += [(p, m) for p, m in _outside_wrappers(model) if isinstance(m, (nn.Embedding, LoRAEmbedding))]
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
    order = {p: i for i, (p, _) in enumerate(_outside_wrappers(model))}
    chosen.sort(key=order.__getitem__)
    if not chosen:
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in candidates})
        indices = sorted({i for p, _ in candidates if (i := _layer_index(p)) is not None})
        raise ValueError(
            f"LoraConfig(targets={cfg.targets!r}, exclude={list(cfg.exclude)}, layers={cfg.layers}) matched no "
            f"layer. Linear layers in this model (suffixes): {names}; block indices: {indices}; "
            f"example full paths: {[p for p, _ in candidates[:6]]}")
    return chosen


def _parameter_owners(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of every module that may own a targeted parameter, in model order; a module already under
    parameter wrappers appears once, at the outer wrapper's path (where PEFT's keys put it)."""
    for path, module in _outside_wrappers(model):
        if isinstance(module, LoRAParameter):
            yield path, module.owner
        elif not isinstance(module, WRAPPERS):
            yield path, module


def _expert_like(module: nn.Module, param: nn.Parameter) -> bool:
    """A 3-D floating-point weight of a model's own module (not a torch convolution's kernel): a stack of linear
    maps, as transformers 5 keeps a mixture-of-experts layer's experts."""
    return param.dim() == 3 and param.is_floating_point() and not type(module).__module__.startswith("torch.")


def match_parameters(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The parameter paths (``<module path>.<parameter>``) ``cfg.target_parameters`` selects, in PEFT's order: model
    order, then the order in which the module registered them (which decides PEFT's nesting, and so its keys).

    Raises:
        ValueError: a name matched nothing (the message lists the candidates), or matched a parameter of an
            ``nn.Linear`` (adapt the layer through ``targets``) or of a module with parameter-holding submodules.
    """
    if not cfg.target_parameters:
        return []
    chosen, hit, candidates = [], set(), []
    for path, owner in _parameter_owners(model):
        for name, param in owner.named_parameters(recurse=False):
            full = f"{path}.{name}" if path else name
            if not isinstance(owner, (nn.Linear, nn.Embedding, nn.LayerNorm)) and param.dim() >= 2:
                candidates.append(full)
            wanted = [t for t in cfg.target_parameters if full == t or full.endswith("." + t)]
            if not wanted or any(_matches_suffix(path, e) or _matches_suffix(full, e) for e in cfg.exclude) \
                    or (cfg.layers is not None and _layer_index(full) not in cfg.layers):
                continue
            if isinstance(owner, (nn.Linear, nn.Embedding)) or is_linear_like(owner):
                raise ValueError(f"target_parameters {wanted[0]!r} matched {full}, a parameter of a "
                                 f"{type(owner).__name__} layer; adapt the layer itself through targets "
                                 f"(targets=[{path.rsplit('.', 1)[-1]!r}])")
            if any(True for child in owner.children() for _ in child.parameters()):
                raise ValueError(f"target_parameters {wanted[0]!r} matched {full}, but its module also has "
                                 f"submodules with parameters, whose paths wrapping it would move; target "
                                 f"parameters of leaf modules (such as an experts module's stacks)")
            hit.update(wanted)
            chosen.append(full)
    missing = [t for t in cfg.target_parameters if t not in hit]
    if missing:
        raise ValueError(f"LoraConfig.target_parameters {missing} matched no parameter. Parameters of this model "
                         f"that can be targeted (not inside Linear/Embedding/norm layers): "
                         f"{sorted({_short(c) for c in candidates})[:12]}; example full paths: {candidates[:4]}")
    return chosen


def _short(path: str) -> str:
    """``"mlp.experts.gate_up_proj"`` -> ``"experts.gate_up_proj"``: a parameter's name as a target suffix."""
    return ".".join(path.split(".")[-2:])


def _warn_left_out(model: nn.Module, cfg: LoraConfig, parameter_paths: list[str]) -> None:
    """``"all-linear"`` adapts layers, not parameter stacks: say once which expert stacks it left out, and how to
    adapt them (they usually hold most of a mixture-of-experts model's weights)."""
    if cfg.targets != ALL_LINEAR:
        return
    left = [(f"{path}.{name}" if path else name, p) for path, owner in _parameter_owners(model)
            for name, p in owner.named_parameters(recurse=False) if _expert_like(owner, p)]
    left = [(full, p) for full, p in left if full not in parameter_paths]
    if not left:
        return
    suffixes = sorted({_short(full) for full, _ in left})
    share = sum(p.numel() for _, p in left) / max(sum(p.numel() for p in model.parameters()), 1)
    warnings.warn(f"targets='all-linear' wraps linear layers only; it left out {len(left)} expert weight stacks "
                  f"({', '.join(suffixes)}: {100 * share:.0f}% of the model's weights), which this model keeps as "
                  f"3-D parameters. To adapt them too: LoraConfig(target_parameters={suffixes}) (one low-rank "
                  f"update per expert, as PEFT's target_parameters)", stacklevel=3)


def _weight_of(module: nn.Module):
    return module.base_layer.weight if isinstance(module, TrainableTokens) else getattr(module, "weight", None)


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for path, m in _outside_wrappers(model):
        if m is module or (isinstance(m, TrainableTokens) and m.base_layer is module):
            return path
    return None


def match_token_modules(model: nn.Module, cfg: LoraConfig) -> list[tuple[str, tuple[int, ...], str | None]]:
    """Where ``cfg.trainable_tokens`` puts trainable rows: ``(module path, token ids, path of the module whose rows
    it shares or None)``, the modules that own their rows first.

    A list of ids means the input embedding and the output head; a head tied to the embedding shares its rows.
    A mapping names the modules; a module tied to one of them (one matrix) is added, sharing the rows, so that
    both ends of the model keep seeing one matrix.

    Raises:
        ValueError: a name matched nothing, a module is not an embedding or a linear head, or tied modules were
            given different ids.
    """
    rows = cfg.trainable_tokens
    if rows is None:
        return []
    vocab = [(p, m) for p, m in _outside_wrappers(model)
             if isinstance(m, (nn.Embedding, nn.Linear, TrainableTokens)) and p]
    if rows and isinstance(rows[0], tuple):
        wanted: dict[str, tuple[int, ...]] = {}
        for name, ids in rows:
            hits = [p for p, _ in vocab if _matches_suffix(p, name)]
            if not hits:
                raise ValueError(f"trainable_tokens names {name!r}, which matches no embedding or linear module; "
                                 f"embeddings here: {[p for p, m in vocab if not isinstance(m, nn.Linear)]}")
            wanted.update(dict.fromkeys(hits, ids))
    else:
        get_in = getattr(model, "get_input_embeddings", None)
        emb = _path_of(model, get_in() if callable(get_in) else None)
        if emb is None:
            raise ValueError("trainable_tokens as a list of ids needs a model that names its input embedding "
                             "(get_input_embeddings); give a mapping instead: {'<embedding module>': [ids]}")
        wanted = {emb: rows}
        get_out = getattr(model, "get_output_embeddings", None)
        head = _path_of(model, get_out() if callable(get_out) else None)
        if head is not None and isinstance(unwrapped_if(model.get_submodule(head)), nn.Linear):
            wanted[head] = rows
    modules = dict(vocab)
    # one matrix, several modules (a tied head): the first one owns the rows, the others share them
    by_weight: dict[int, list[str]] = {}
    for path, module in vocab:
        weight = _weight_of(module)
        if weight is not None:
            by_weight.setdefault(id(weight), []).append(path)
    out, done = [], set()
    for path, ids in wanted.items():
        if path in done:
            continue
        if not isinstance(unwrapped_if(modules[path]), (nn.Embedding, nn.Linear)):
            raise ValueError(f"trainable_tokens: {path} is a {type(modules[path]).__name__}, not an embedding or "
                             f"a linear output head")
        group = by_weight.get(id(_weight_of(modules[path])), [path])
        group = sorted(group, key=lambda p: not isinstance(unwrapped_if(modules[p]), nn.Embedding))  # owner first
        clash = [p for p in group if p in wanted and wanted[p] != ids]
        if clash:
            raise ValueError(f"trainable_tokens gives {path} and {clash[0]} different token ids, but they share one "
                             f"matrix (tied weights); give them the same ids")
        out.append((group[0], ids, None))
        out.extend((p, ids, group[0]) for p in group[1:])
        done.update(group)
    return out


def unwrapped_if(module: nn.Module) -> nn.Module:
    """The module a trainable-tokens wrapper wraps, or the module itself."""
    return module.base_layer if isinstance(module, TrainableTokens) else module


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
        The wrapped module paths, in model order, then the adapted parameters (``<module path>.<parameter>``).

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
    parameters = match_parameters(model, cfg)
    _warn_left_out(model, cfg, parameters)
    saved = _match_modules_to_save(model, cfg.modules_to_save, paths)
    _check_not_tied(model, saved, "in modules_to_save")
    tokens = match_token_modules(model, cfg)
    for path, _, _ in tokens:
        if path in paths or path in saved or isinstance(model.get_submodule(path), LOW_RANK + (SavedModule,)):
            raise ValueError(f"{path} would both train rows in full (trainable_tokens) and be adapted otherwise "
                             f"(a LoRA target or modules_to_save, in this adapter or another); choose one")
    for path in paths:
        if isinstance(model.get_submodule(path), TrainableTokens):
            raise ValueError(f"{path} trains rows of its matrix (trainable_tokens of another adapter); it cannot "
                             f"also be a LoRA target")

    if cfg.init in RESIDUAL_INITS:  # every target asked before any is touched: no residual to undo, no rounding
        for path in paths:
            problem = principal_init_problem(model.get_submodule(path), cfg)
            if problem:
                raise ValueError(f"{path}: {problem}")
    with unchanged_on_error(model):  # a layer that fails anyway undoes the ones already wrapped
        registry[adapter] = AdapterInfo(cfg, tuple(paths), tuple(saved), tuple(parameters),
                                        tuple(p for p, _, tied in tokens if tied is None))
        for path in paths:
            module = model.get_submodule(path)
            embedding = isinstance(module, (nn.Embedding, LoRAEmbedding))
            _wrapped(model, path, LoRAEmbedding if embedding else LoRALinear).add_adapter(adapter, cfg)
        for full in parameters:
            _parameter_wrapper(model, full).add_adapter(adapter, cfg)
        for path in saved:
            _wrapped(model, path, SavedModule).add_adapter(adapter)
        for path, ids, tied in tokens:
            module = model.get_submodule(path)
            if not isinstance(module, TrainableTokens):
                module = TrainableTokens(module, model.get_submodule(tied) if tied else None).train(module.training)
                _replace(model, path, module)
            module.add_adapter(adapter, ids)
    set_active(model, adapter)
    _set_trainable(model, adapter)
    return paths + parameters


def _parameter_wrapper(model: nn.Module, full: str) -> LoRAParameter:
    """The wrapper of parameter ``full`` (``<module path>.<name>``), put around the module first if it has none
    (around any wrappers of its other parameters, as PEFT nests them)."""
    path, _, name = full.rpartition(".")
    module = model.get_submodule(path) if path else model
    layer = module
    while isinstance(layer, LoRAParameter):
        if layer.parameter_name == name:
            return layer
        layer = layer.base_layer
    wrapper = LoRAParameter(module, name).train(module.training)
    _replace(model, path, wrapper)
    return wrapper


def _wrapped(model: nn.Module, path: str, wrapper: type[nn.Module]):
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
    for _, module in adapter_modules(model):
        if isinstance(module, SavedModule) or adapter not in module.adapters:
            continue
        for p in module.adapter_tensors(adapter).values():  # A/B, DoRA magnitudes, trainable token rows
            p.requires_grad_(True)
        if info.config.bias == "lora_only" and isinstance(module, LoRALinear) and module.base_layer.bias is not None:
            module.base_layer.bias.requires_grad_(True)
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
    for path, layer in adapter_modules(model):
        if adapter in getattr(layer, "merged_adapters", ()):
            raise ValueError(f"adapter {adapter!r} is merged into the base weights; call lora.unmerge(model) first")
    for path, module in list(adapter_modules(model)):
        if adapter in module.adapters:
            module.remove_adapter(adapter)
    _unwrap_empty(model)
    del registry[adapter]


def _unwrap_empty(model: nn.Module) -> None:
    """Replace every wrapper left with no adapter by the module it wraps; inner wrappers first, so that the path of
    an outer one (nested parameter wrappers) still leads to it."""
    for path, module in reversed(list(adapter_modules(model))):
        if not module.adapters:
            _replace(model, path, unwrapped(module))


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
        _unwrap_empty(model)  # a wrapper made for an adapter that then failed
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
    remerge = [layer for layer in layers if getattr(layer, "merged_adapters", None)]
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
    whole = sorted({n for n in names if n is not None and (known[n].parameter_paths or known[n].token_paths)})
    if whole:
        raise ValueError(f"adapter(s) {whole} adapt whole parameters (target_parameters) or vocabulary rows "
                         f"(trainable_tokens), which row_adapters cannot mix per row; run them in batches of their "
                         f"own with lora.set_active")
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
           "lora_layers", "adapter_modules", "unchanged_on_error", "row_adapters", "match_targets", "match_parameters",
           "match_token_modules", "unwrapped", "AdapterInfo", "LOW_RANK", "WRAPPERS"]
