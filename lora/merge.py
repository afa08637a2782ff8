"""Merging adapters into base weights: in a live model, or as a pure function over state dicts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .adapter_io import PEFT_PREFIX, read_adapter
from .inject import adapters_of, lora_layers


def merge(model: nn.Module) -> nn.Module:
    """Add every active adapter into its base weight, in place (fp32 math, one cast back). Idempotent."""
    for _, layer in lora_layers(model):
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
    Inactive adapters are discarded.
    """
    merge(model)
    for path, layer in list(lora_layers(model)):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.base_layer)
    adapters_of(model).clear()
    return model


class AdapterMerger:
    """Merges one adapter folder into base tensors one at a time, so an export can stream a model tensor by tensor.

    ``merged(name, tensor)`` returns the tensor to write under base key ``name`` (unchanged when the adapter does
    not touch it). The math is the same as :meth:`LoRALinear.delta_weight`: ``W + scale * B @ A`` in fp32 (DoRA:
    ``m / ||W + dW||_row * (W + dW)``), cast back to the base tensor's dtype once.
    """

    def __init__(self, adapter_dir: str | Path):
        cfg, self.peft_config, tensors = read_adapter(adapter_dir)
        self.scale = cfg.scale
        self.fan_in_fan_out = bool(self.peft_config.get("fan_in_fan_out", False))
        self._lora: dict[str, dict[str, torch.Tensor]] = {}  # base weight key -> {"A", "B", "m"}
        self._replace: dict[str, torch.Tensor] = {}  # base key -> tensor (modules_to_save, trained biases)
        for key, tensor in tensors.items():
            path = key[len(PEFT_PREFIX):].replace(".base_layer.", ".")  # a wrapped layer's own bias
            for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector", "m")):
                if path.endswith(suffix):
                    self._lora.setdefault(path[: -len(suffix)] + ".weight", {})[slot] = tensor
                    break
            else:
                self._replace[path] = tensor
        self.pending = set(self._lora) | set(self._replace)

    def merged(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.pending.discard(name)
        if name in self._replace:
            return self._replace[name].to(tensor.dtype)
        parts = self._lora.get(name)
        if parts is None:
            return tensor
        W = tensor.float().T if self.fan_in_fan_out else tensor.float()  # (out, in)
        combined = W + (parts["B"].float() @ parts["A"].float()) * self.scale
        if "m" in parts:
            combined = parts["m"].float().unsqueeze(1) / combined.norm(dim=1, keepdim=True) * combined
        return (combined.T if self.fan_in_fan_out else combined).to(tensor.dtype).contiguous()

    def check_all_used(self) -> None:
        """Raise if some adapter tensor found no base tensor: the adapter belongs to another architecture."""
        if self.pending:
            raise ValueError(f"the adapter has weights for {sorted(self.pending)[:5]} (of {len(self.pending)}) "
                             f"that are not in the base state dict; it was trained on a different model")


def merge_state_dict(base_state_dict: Mapping[str, torch.Tensor], adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Merge the adapter in ``adapter_dir`` into a base state dict, without building a model.

    Args:
        base_state_dict: The base model's tensors under its own keys (``model.layers.0.self_attn.q_proj.weight``).
        adapter_dir: A folder written by :func:`lora.save_adapter` or by PEFT.

    Returns:
        A new dict with the same keys; adapted weights replaced by their merged values.

    Raises:
        ValueError: the adapter has tensors the state dict lacks (it was trained on another model).
    """
    merger = AdapterMerger(adapter_dir)
    out = {name: merger.merged(name, tensor) for name, tensor in base_state_dict.items()}
    merger.check_all_used()
    return out


__all__ = ["merge", "unmerge", "merge_and_unload", "merge_state_dict", "AdapterMerger"]
