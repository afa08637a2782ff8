"""Merging adapters into base weights: in a live model, or as a pure function over state dicts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .adapter_io import (PEFT_PREFIX, TOKEN_ROWS, TRANSPOSED_KEY, check_base_fingerprint, fingerprint_sample,
                         read_adapter)
from .inject import adapter_modules, adapters_of, unwrapped
from .layers import LoRALinear, SavedModule, embedding_delta, merged_weight, parameter_delta
from .tokens import ADDED_TOKENS_KEY


def _mergeable(model: nn.Module) -> list[nn.Module]:
    """Every wrapper that merges into a base tensor: LoRA layers, parameters and embeddings, trainable rows."""
    return [module for _, module in adapter_modules(model) if not isinstance(module, SavedModule)]


def merge(model: nn.Module) -> nn.Module:
    """Add every active adapter into its base weight, in place (fp32 math, one cast back). Idempotent.

    Raises:
        ValueError: two DoRA adapters would be merged in one step, or two adapters train the same vocabulary rows
            (checked before any layer changes).
    """
    layers = _mergeable(model)
    for layer in layers:
        layer.check_mergeable()
    for layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the base weights. Idempotent."""
    for layer in _mergeable(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and replace every LoRA wrapper by its plain base layer.

    The result has exactly the base model's modules and state-dict keys, ready for ``save_pretrained`` or export.
    A module trained in full (``modules_to_save``) is replaced by the active adapter's copy, in the original's
    dtype. Inactive adapters are discarded.
    """
    merge(model)
    # inner wrappers first: the path of an outer one (nested parameter wrappers) then still leads to it
    for path, module in reversed(list(adapter_modules(model))):
        if isinstance(module, SavedModule):
            original = next(module.original_module.parameters(), None)
            plain = module.current()
            if original is not None:
                plain = plain.to(original.dtype)
        else:
            if isinstance(module, LoRALinear):
                for name in set(module.adapters) - set(module.merged_adapters):
                    module.remove_adapter(name)  # discarded; a PiSSA/OLoRA one gives its initial part back
            plain = unwrapped(module)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, plain)
    adapters_of(model).clear()
    return model


class AdapterMerger:
    """Merges one adapter folder into base tensors one at a time, so an export can stream a model tensor by tensor.

    Built against the base's tensors (a mapping from state-dict key to tensor, which may load lazily), it checks
    before any merging that the adapter belongs to that base: every adapted weight exists with the adapter's shape,
    and the recorded base fingerprint matches. ``merged(name, tensor)`` then returns the tensor to write under base
    key ``name`` (unchanged when the adapter does not touch it), by the math of :mod:`lora.layers` every other path
    uses (:func:`~lora.layers.merged_weight`, :func:`~lora.layers.parameter_delta`,
    :func:`~lora.layers.embedding_delta`, trainable rows written in place), cast back to the base tensor's dtype once.

    An adapter trained after :func:`lora.add_tokens` grew the vocabulary (its ``added_tokens`` record) grows the
    base's embedding and head the same way: each tensor of ``base_vocab_size`` rows gets the new rows, the mean of
    its rows, before anything is merged into it (:meth:`shape` gives the grown shapes).

    Args:
        adapter_dir: The adapter folder (ours or PEFT's).
        base: The base's tensors by state-dict key.
        check_base: Refuse an adapter whose recorded base fingerprint does not match ``base``.
        whole_model: Merge every kind of adapter. False: the adapter is to be read as pairs of A/B per linear
            weight (:attr:`factors`, what a llama.cpp adapter file holds), and one that also adapts parameters,
            embeddings or vocabulary rows, or grows the vocabulary, is refused.
    """

    def __init__(self, adapter_dir: str | Path, base: Mapping[str, torch.Tensor], check_base: bool = True,
                 whole_model: bool = False):
        self.config, self.peft_config, tensors = read_adapter(adapter_dir)
        self.scale = self.config.scale
        self.fan_in_fan_out = bool(self.peft_config.get("fan_in_fan_out", False))
        record = self.peft_config.get(ADDED_TOKENS_KEY)
        self.added_tokens: dict | None = record if isinstance(record, dict) and record.get("tokens") else None
        self.factors: dict[str, dict[str, torch.Tensor]] = {}  # base weight key -> {"A", "B", "m"}: LoRA layers
        self.parameters: dict[str, dict] = {}  # base key -> {"A", "B", "transposed"}: target_parameters
        self.embeddings: dict[str, dict[str, torch.Tensor]] = {}  # base key -> {"A", "B"}: LoRA on an embedding
        self.rows: dict[str, tuple[list[int], torch.Tensor]] = {}  # base key -> (token ids, their rows)
        self._replace: dict[str, torch.Tensor] = {}  # base key -> tensor (modules_to_save, trained biases)
        keys = set(base.keys())
        low_rank: dict[str, dict[str, torch.Tensor]] = {}  # adapter module path -> {"A", "B", "m"}
        for key, tensor in tensors.items():
            path = key[len(PEFT_PREFIX):]
            if path.endswith(TOKEN_ROWS):
                self.rows[path[: -len(TOKEN_ROWS)]] = ([], tensor)
                continue
            for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector", "m"),
                                 (".lora_embedding_A", "eA"), (".lora_embedding_B", "eB")):
                if path.endswith(suffix):
                    low_rank.setdefault(path[: -len(suffix)], {})[slot] = tensor
                    break
            else:
                self._replace[path.replace(".base_layer.", ".")] = tensor  # a wrapped layer's own bias
        self._prefix = self._outer_prefix(keys, [p.split(".base_layer")[0] for p in low_rank] + list(self.rows)
                                          + [k.rsplit(".", 1)[0] for k in self._replace])
        strip = len(self._prefix)
        self._replace = {k[strip:]: v for k, v in self._replace.items()}
        self._rows_from_config(adapter_dir, strip)
        by_module: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # parameter adapters: module -> depth -> A/B
        for path, parts in low_rank.items():
            module = path[strip:]
            if "eA" in parts or "eB" in parts:
                self.embeddings[module + ".weight"] = {"A": parts.get("eA"), "B": parts.get("eB")}
                continue
            owner, depth = module, 0
            while owner.endswith(".base_layer"):
                owner, depth = owner[: -len(".base_layer")], depth + 1
            if self._targeted_parameters(owner, keys):
                by_module.setdefault(owner, {})[depth] = parts
            else:
                self.factors[module + ".weight"] = parts
        for owner, depths in by_module.items():
            self._resolve_parameters(adapter_dir, owner, depths, base)
        self._vocab = self._grown_keys(base)
        self._tie_rows(base)
        if not whole_model:
            kinds = [what for what, there in (("expert or other parameters (target_parameters)", self.parameters),
                                              ("embeddings", self.embeddings), ("vocabulary rows", self.rows),
                                              ("added tokens", self.added_tokens)) if there]
            if kinds:
                raise ValueError(f"the adapter {adapter_dir} also adapts {' and '.join(kinds)}, which an adapter "
                                 f"file of pairs of A and B per linear weight (llama.cpp's) cannot hold. Merge it "
                                 f"into the whole model instead: lora merge --model <base> --adapter {adapter_dir} "
                                 f"--out merged, then export the merged folder (lora export gguf --model merged)")
        self._check_fits(adapter_dir, base)
        if check_base:
            first = next(iter(self.factors), None) or next(iter(self.parameters), None) \
                or next(iter(self.embeddings), None)
            dtype = base[first].dtype if first else torch.float32
            check_base_fingerprint(adapter_dir, self.peft_config, lambda path: fingerprint_sample(
                self._fingerprinted(base, path.removeprefix(self._prefix))), dtype)

    # -- reading the file -------------------------------------------------------------------------------------
    @staticmethod
    def _outer_prefix(keys: set[str], modules: list[str]) -> str:
        """The module prefix the adapter's paths have and the base folder's keys do not (``"transformer."``): a base
        model saved without its head, as GPT-2 is on the Hugging Face hub, stores ``h.0...`` where the causal LM
        the adapter was trained on has ``transformer.h.0...``. Empty when the paths already agree."""
        def found(prefix: str) -> bool:
            return all(any(k.startswith(m[len(prefix):] + ".") for k in keys) for m in modules)

        if not modules or found(""):
            return ""
        outer = {m.split(".", 1)[0] for m in modules}
        prefix = f"{outer.pop()}." if len(outer) == 1 else ""
        return prefix if prefix and all(m.startswith(prefix) for m in modules) and found(prefix) else ""

    def _rows_from_config(self, adapter_dir, strip: int) -> None:
        indices = self.peft_config.get("trainable_token_indices")
        rows = {}
        for module, (_, tensor) in self.rows.items():
            if isinstance(indices, dict):
                ids = next((v for k, v in indices.items() if module == k or module.endswith("." + k)), None)
            else:
                ids = indices
            if not ids or len(ids) != tensor.shape[0]:
                raise ValueError(f"the adapter {adapter_dir} holds {tensor.shape[0]} trainable rows for {module}, but "
                                 f"its trainable_token_indices give {len(ids or [])} ids for it; re-save the adapter")
            rows[module[strip:] + ".weight"] = (list(ids), tensor)
        self.rows = rows

    def _targeted_parameters(self, owner: str, keys: set[str]) -> list[str]:
        """The parameters of module ``owner`` (base keys ``owner.<name>``) the adapter's target_parameters name."""
        targets = self.config.target_parameters
        if not targets:
            return []
        full = self._prefix + owner
        names = [k[len(owner) + 1:] for k in keys if k.startswith(owner + ".") and "." not in k[len(owner) + 1:]]
        return [n for n in names if any(f"{full}.{n}" == t or f"{full}.{n}".endswith("." + t) for t in targets)]

    def _resolve_parameters(self, adapter_dir, owner: str, depths: dict[int, dict[str, torch.Tensor]],
                            base: Mapping[str, torch.Tensor]) -> None:
        """Which parameter of ``owner`` each nesting depth's A/B adapts, and the parameter's layout.

        Our files list target_parameters in PEFT's nesting order (innermost first) and name the transposed stacks.
        A file PEFT wrote lists them sorted, so there the shapes decide, and an assignment they leave open (square
        expert stacks) is refused: only the model's experts module knows its layout.
        """
        names = self._targeted_parameters(owner, set(base.keys()))
        ours = TRANSPOSED_KEY in self.peft_config
        r = self.config.r
        if ours:
            listed = [t.removeprefix(self._prefix) for t in self.config.target_parameters]
            order = [p.rsplit(".", 1)[1] for p in listed if p.rsplit(".", 1)[0] == owner]
            transposed = {t.removeprefix(self._prefix) for t in self.peft_config[TRANSPOSED_KEY]}
            if sorted(order) != sorted(names) or len(order) != len(depths):
                raise ValueError(f"the adapter {adapter_dir} adapts parameters {order} of {owner}, but the base has "
                                 f"{names} there; it was trained on a different model")
            for depth, parts in depths.items():
                name = order[len(order) - 1 - depth]
                self.parameters[f"{owner}.{name}"] = dict(parts, transposed=f"{owner}.{name}" in transposed)
            return
        fits: dict[int, list[tuple[str, bool]]] = {}
        for depth, parts in depths.items():
            A, B = parts.get("A"), parts.get("B")
            if A is None or B is None:
                raise ValueError(f"the adapter {adapter_dir} has only one of lora_A/lora_B for a parameter of {owner}; "
                                 f"the file is incomplete, re-save the adapter")
            experts, out, inp = A.shape[0] // r, B.shape[0], A.shape[1]
            fits[depth] = []
            for name in names:
                shape = tuple(base[f"{owner}.{name}"].shape)
                for transposed, want in ((False, (experts, out, inp)), (True, (experts, inp, out))):
                    if shape == want or (len(shape) == 2 and not transposed and experts == 1 and shape == (out, inp)):
                        fits[depth].append((name, transposed))
        taken = set()
        for depth, options in sorted(fits.items(), key=lambda kv: len(kv[1])):
            options = [o for o in options if o[0] not in taken]
            if len(options) != 1:
                raise ValueError(f"the adapter {adapter_dir} (written by PEFT) adapts parameters of {owner} whose "
                                 f"shapes do not say {'which parameter' if options else 'any parameter'} each update "
                                 f"is for{' or how it is laid out' if options else ''}; merge it in the model instead: "
                                 f"lora.load_adapter(model, folder), then lora.merge_and_unload(model)")
            name, transposed = options[0]
            taken.add(name)
            self.parameters[f"{owner}.{name}"] = dict(depths[depth], transposed=transposed)

    def _grown_keys(self, base: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Base keys whose first dimension is the vocabulary the adapter's added tokens grew, with the new size."""
        record = self.added_tokens
        if record is None or record["vocab_size"] <= record["base_vocab_size"]:
            return {}
        old, new = record["base_vocab_size"], record["vocab_size"]
        grown = {}
        for key in base.keys():
            shape = self._shape_of(base, key)
            if len(shape) in (1, 2) and shape[0] == old and (len(shape) == 2 or key.endswith("bias")):
                grown[key] = new
        if not any(len(self._shape_of(base, k)) == 2 for k in grown):
            raise ValueError(f"the adapter's base had {old} vocabulary rows before tokens were added, but no tensor "
                             f"of this base has {old} rows; it was trained on a different model")
        return grown

    def _tie_rows(self, base: Mapping[str, torch.Tensor]) -> None:
        """A live state dict lists a tied head under its own key, the very tensor of the embedding: it gets the
        embedding's trained rows too. (A model folder stores a tied matrix once.)"""
        if not isinstance(base, dict) or not self.rows:
            return
        for name, rows in list(self.rows.items()):
            tensor = base[name]
            for key, other in base.items():
                if key != name and key not in self.rows and other.data_ptr() == tensor.data_ptr() \
                        and other.shape == tensor.shape:
                    self.rows[key] = rows

    @staticmethod
    def _shape_of(base: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
        shape_of = getattr(base, "shape", None)  # a lazily loading mapping may know shapes without reading tensors
        return tuple(shape_of(key)) if callable(shape_of) else tuple(base[key].shape)

    # -- checking -----------------------------------------------------------------------------------------------
    def _out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.T if self.fan_in_fan_out else tensor  # GPT-2's Conv1D stores (in, out)

    def shape(self, name: str, shape: tuple[int, ...] | list[int]) -> list[int]:
        """The shape the merged tensor ``name`` has, given the base's: grown where the adapter added tokens."""
        shape = list(shape)
        if name in self._vocab:
            shape[0] = self._vocab[name]
        return shape

    def _grow(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` with the rows :func:`lora.add_tokens` gave the new tokens: the mean of the existing rows."""
        new = self._vocab.get(name)
        if new is None:
            return tensor
        mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)  # as lora.tokens._fill_mean
        return torch.cat([tensor, mean.expand(new - tensor.shape[0], *tensor.shape[1:])], dim=0)

    def _fingerprinted(self, base: Mapping[str, torch.Tensor], path: str) -> torch.Tensor:
        """The base tensor a fingerprint entry samples: a parameter's own key, or a module's weight."""
        if path in base:
            return self._grow(path, base[path])
        return self._out_in(self._grow(path + ".weight", base[path + ".weight"]))

    def _check_fits(self, adapter_dir, base: Mapping[str, torch.Tensor]) -> None:
        """Every adapter tensor has a base tensor of the matching shape, or the adapter belongs to another model."""
        keys = set(base.keys())
        mine = set(self.factors) | set(self._replace) | set(self.embeddings) | set(self.rows)
        missing = sorted(mine - keys)
        heads = [k for k in missing if k.split(".", 1)[0] in ("score", "classifier")]
        base_name = self.peft_config.get('base_model_name_or_path')
        if heads:
            raise ValueError(f"the adapter {adapter_dir} trains a classification head ({heads[0]}), which this base "
                             f"folder, a causal language model, does not have. Merge it into the classifier: load "
                             f"AutoModelForSequenceClassification from the base, lora.load_adapter(model, "
                             f"'{adapter_dir}'), then lora.merge_and_unload(model).save_pretrained(out)")
        if missing and self.config.target_parameters:
            raise ValueError(f"the adapter {adapter_dir} adapts parameters ({list(self.config.target_parameters)}) "
                             f"that these base tensors do not hold as such ({missing[:3]}): transformers may store a "
                             f"model's expert stacks expert by expert on disk. Merge in the model instead: lora merge "
                             f"--model <base folder> --adapter {adapter_dir}, or lora.load_adapter(model, folder) "
                             f"then lora.merge_and_unload(model)")
        if missing:
            raise ValueError(f"the adapter {adapter_dir} has weights for {missing[:5]} (of {len(missing)}) that are "
                             f"not in the base state dict; it was trained on a different model. Use the base it "
                             f"was trained on ({base_name!r})")
        if self.config.target_parameters and not self.parameters:
            raise ValueError(f"the adapter {adapter_dir} targets parameters {list(self.config.target_parameters)} "
                             f"that this base does not have; it was trained on a different model ({base_name!r})")
        for name, parts in list(self.factors.items()) + list(self.embeddings.items()):
            if parts.get("A") is None or parts.get("B") is None:
                raise ValueError(f"the adapter {adapter_dir} has only one of its A/B pair for {name}; every LoRA "
                                 f"layer needs both. The file is incomplete; re-save the adapter")
        for name, parts in self.factors.items():
            shape = self._grown_shape(base, name)
            self._same(adapter_dir, name, shape[::-1] if self.fan_in_fan_out else shape,
                       (parts["B"].shape[0], parts["A"].shape[1]), "out x in")
        for name, parts in self.embeddings.items():
            self._same(adapter_dir, name, self._grown_shape(base, name), (parts["A"].shape[1], parts["B"].shape[0]),
                       "rows x dim")
        for name, (ids, rows) in self.rows.items():
            shape = self._grown_shape(base, name)
            if max(ids) >= shape[0] or rows.shape[1] != shape[1]:
                self._same(adapter_dir, name, shape, (max(ids) + 1, rows.shape[1]), "rows x dim (at least)")

    def _grown_shape(self, base: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
        return tuple(self.shape(name, self._shape_of(base, name)))

    def _same(self, adapter_dir, name: str, have: tuple, want: tuple, layout: str) -> None:
        if tuple(have) == tuple(want):
            return
        vocabulary = len(have) == 2 and len(want) == 2 and have[1] == want[1] and want[0] > have[0]
        hint = (" It was trained with a grown vocabulary: merge it into a base with the same tokens added "
                "(lora.add_tokens), or one of that vocabulary size" if vocabulary else
                " It was trained on a different model size")
        raise ValueError(f"the adapter {adapter_dir} adapts {name} as {tuple(want)} ({layout}) but the base tensor "
                         f"is {tuple(have)}.{hint}; use the base it was trained on "
                         f"({self.peft_config.get('base_model_name_or_path')!r})")

    # -- merging ------------------------------------------------------------------------------------------------
    def merged(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """What to write under base key ``name`` for the base's ``tensor``."""
        tensor = self._grow(name, tensor)
        if name in self._replace:
            tensor = self._replace[name].to(tensor.dtype)
        parts = self.factors.get(name)
        if parts is not None:
            W = merged_weight(self._out_in(tensor), parts["A"], parts["B"], self.scale, parts.get("m"))
            tensor = self._out_in(W).to(tensor.dtype).contiguous()
        if name in self.parameters:
            p = self.parameters[name]
            delta = parameter_delta(p["A"], p["B"], self.scale, tensor.shape, p["transposed"])
            tensor = (tensor.float() + delta).to(tensor.dtype)
        if name in self.embeddings:
            e = self.embeddings[name]
            tensor = (tensor.float() + embedding_delta(e["A"], e["B"], self.scale)).to(tensor.dtype)
        if name in self.rows:
            ids, rows = self.rows[name]
            tensor = tensor.index_copy(0, torch.tensor(ids), rows.to(tensor.dtype))
        return tensor


def merge_state_dict(base_state_dict: Mapping[str, torch.Tensor], adapter_dir: str | Path,
                     check_base: bool = True) -> dict[str, torch.Tensor]:
    """Merge the adapter in ``adapter_dir`` into a base state dict, without building a model.

    Args:
        base_state_dict: The base model's tensors under its own keys (``model.layers.0.self_attn.q_proj.weight``).
        adapter_dir: A folder written by :func:`lora.save_adapter` or by PEFT.
        check_base: Refuse an adapter whose recorded base-model fingerprint does not match these weights.

    Returns:
        A new dict with the same keys; adapted weights replaced by their merged values (the embedding and head
        grown by the tokens the adapter's base had added, see :class:`AdapterMerger`).

    Raises:
        ValueError: the adapter has tensors the state dict lacks or of other shapes, or was trained on another base.
    """
    merger = AdapterMerger(adapter_dir, base_state_dict, check_base, whole_model=True)
    return {name: merger.merged(name, tensor) for name, tensor in base_state_dict.items()}


__all__ = ["merge", "unmerge", "merge_and_unload", "merge_state_dict", "AdapterMerger"]
