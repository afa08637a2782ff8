"""Merging adapters into base weights: in a live model, or as a pure function over state dicts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .adapter_io import PEFT_PREFIX, check_base_fingerprint, fingerprint_sample, read_adapter
from .inject import adapter_modules, adapters_of, lora_layers
from .layers import LoRALinear, merged_weight


def merge(model: nn.Module) -> nn.Module:
    """Add every active adapter into its base weight, in place (fp32 math, one cast back). Idempotent.

    Raises:
        ValueError: two DoRA adapters would be merged in one step (checked before any layer changes).
    """
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.check_mergeable()
    for layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the base weights. Idempotent."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and replace every LoRA wrapper by its plain base layer.

    The result has exactly the base model's modules and state-dict keys, ready for ``save_pretrained`` or export.
    A module trained in full (``modules_to_save``) is replaced by the active adapter's copy, in the original's
    dtype. Inactive adapters are discarded.
    """
    merge(model)
    for path, module in list(adapter_modules(model)):
        if isinstance(module, LoRALinear):
            for name in set(module.adapters) - set(module.merged_adapters):
                module.remove_adapter(name)  # discarded; a PiSSA/OLoRA one gives its initial part back to the base
            plain = module.base_layer
        else:
            original = next(module.original_module.parameters(), None)
            plain = module.current()
            if original is not None:
                plain = plain.to(original.dtype)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, plain)
    adapters_of(model).clear()
    return model


class AdapterMerger:
    """Merges one adapter folder into base tensors one at a time, so an export can stream a model tensor by tensor.

    Built against the base's tensors (a mapping from state-dict key to tensor, which may load lazily), it checks
    before any merging that the adapter belongs to that base: every adapted weight exists with the adapter's shape,
    and the recorded base fingerprint matches. ``merged(name, tensor)`` then returns the tensor to write under base
    key ``name`` (unchanged when the adapter does not touch it), by :func:`lora.layers.merged_weight`, the math
    every other path uses, cast back to the base tensor's dtype once.
    """

    def __init__(self, adapter_dir: str | Path, base: Mapping[str, torch.Tensor], check_base: bool = True):
        self.config, self.peft_config, tensors = read_adapter(adapter_dir)
        self.scale = self.config.scale
        self.fan_in_fan_out = bool(self.peft_config.get("fan_in_fan_out", False))
        self.factors: dict[str, dict[str, torch.Tensor]] = {}  # base weight key -> {"A", "B", "m"}: LoRA layers
        self._replace: dict[str, torch.Tensor] = {}  # base key -> tensor (modules_to_save, trained biases)
        for key, tensor in tensors.items():
            path = key[len(PEFT_PREFIX):].replace(".base_layer.", ".")  # a wrapped layer's own bias
            for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector", "m")):
                if path.endswith(suffix):
                    self.factors.setdefault(path[: -len(suffix)] + ".weight", {})[slot] = tensor
                    break
            else:
                self._replace[path] = tensor
        self._prefix = self._outer_prefix(base)
        if self._prefix:  # keys as the base folder stores them
            self.factors = {k[len(self._prefix):]: v for k, v in self.factors.items()}
            self._replace = {k[len(self._prefix):]: v for k, v in self._replace.items()}
        self._check_fits(adapter_dir, base)
        if check_base:
            dtype = base[next(iter(self.factors))].dtype if self.factors else torch.float32
            check_base_fingerprint(adapter_dir, self.peft_config, lambda path: fingerprint_sample(
                self._out_in(base[path.removeprefix(self._prefix) + ".weight"])), dtype)

    def _outer_prefix(self, base: Mapping[str, torch.Tensor]) -> str:
        """The module prefix the adapter's keys have and the base folder's do not (``"transformer."``): a base
        model saved without its head, as GPT-2 is on the Hugging Face hub, stores ``h.0...`` where the causal LM
        the adapter was trained on has ``transformer.h.0...``. Empty when the keys already agree."""
        keys, ours = set(base.keys()), set(self.factors) | set(self._replace)
        if not ours or ours <= keys:
            return ""
        outer = {k.split(".", 1)[0] for k in ours}
        prefix = f"{outer.pop()}." if len(outer) == 1 else ""
        return prefix if prefix and {k[len(prefix):] for k in ours} <= keys else ""

    def _out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.T if self.fan_in_fan_out else tensor  # GPT-2's Conv1D stores (in, out)

    def _check_fits(self, adapter_dir, base: Mapping[str, torch.Tensor]) -> None:
        """Every adapter tensor has a base tensor of the matching shape, or the adapter belongs to another model."""
        keys = set(base.keys())
        missing = sorted(set(self.factors) - keys | set(self._replace) - keys)
        heads = [k for k in missing if k.split(".", 1)[0] in ("score", "classifier")]
        if heads:
            raise ValueError(f"the adapter {adapter_dir} trains a classification head ({heads[0]}), which this base "
                             f"folder, a causal language model, does not have. Merge it into the classifier: load "
                             f"AutoModelForSequenceClassification from the base, lora.load_adapter(model, "
                             f"'{adapter_dir}'), then lora.merge_and_unload(model).save_pretrained(out)")
        if missing:
            raise ValueError(f"the adapter {adapter_dir} has weights for {missing[:5]} (of {len(missing)}) that are "
                             f"not in the base state dict; it was trained on a different model. Use the base it "
                             f"was trained on ({self.peft_config.get('base_model_name_or_path')!r})")
        for name, parts in self.factors.items():
            if not {"A", "B"} <= set(parts):
                raise ValueError(f"the adapter {adapter_dir} has {'lora_A' if 'A' in parts else 'lora_B'} but not "
                                 f"{'lora_B' if 'A' in parts else 'lora_A'} for {name}; every LoRA layer needs both. "
                                 f"The file is incomplete; re-save the adapter")
            shape = tuple(self._out_in(base[name]).shape)
            want = (parts["B"].shape[0], parts["A"].shape[1])
            if shape != want:
                raise ValueError(f"the adapter {adapter_dir} adapts {name} as {want} (out x in) but the base weight "
                                 f"is {shape}; it was trained on a different model size. Use the base it was "
                                 f"trained on ({self.peft_config.get('base_model_name_or_path')!r})")

    def merged(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name in self._replace:
            return self._replace[name].to(tensor.dtype)
        parts = self.factors.get(name)
        if parts is None:
            return tensor
        merged = merged_weight(self._out_in(tensor), parts["A"], parts["B"], self.scale, parts.get("m"))
        return self._out_in(merged).to(tensor.dtype).contiguous()


def merge_state_dict(base_state_dict: Mapping[str, torch.Tensor], adapter_dir: str | Path,
                     check_base: bool = True) -> dict[str, torch.Tensor]:
    """Merge the adapter in ``adapter_dir`` into a base state dict, without building a model.

    Args:
        base_state_dict: The base model's tensors under its own keys (``model.layers.0.self_attn.q_proj.weight``).
        adapter_dir: A folder written by :func:`lora.save_adapter` or by PEFT.
        check_base: Refuse an adapter whose recorded base-model fingerprint does not match these weights.

    Returns:
        A new dict with the same keys; adapted weights replaced by their merged values.

    Raises:
        ValueError: the adapter has tensors the state dict lacks or of other shapes, or was trained on another base.
    """
    merger = AdapterMerger(adapter_dir, base_state_dict, check_base)
    return {name: merger.merged(name, tensor) for name, tensor in base_state_dict.items()}


__all__ = ["merge", "unmerge", "merge_and_unload", "merge_state_dict", "AdapterMerger"]
