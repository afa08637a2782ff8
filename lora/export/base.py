"""The base model as export reads it: its Hugging Face folder, and its weights one tensor at a time, the adapter
merged in as they stream."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..merge import AdapterMerger
from ..models import EMBEDDED_MODELS, converted_folder

# Weight files of any layout (Mistral's consolidated.safetensors too): never copied next to the merged weights,
# where a loader that prefers them would serve the unmerged base
WEIGHT_FILES = re.compile(r"^(.*\.(safetensors|bin|pt|pth|ckpt|gguf)|.*\.index\.json)$")
# What an earlier merged export wrote (shards counted otherwise), which a new one replaces
EXPORTED_WEIGHTS = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json)$")


def resolve_base_folder(model: str | os.PathLike) -> Path:
    """A Hugging Face folder with safetensors weights for ``model`` (embedded name or folder).

    Raises:
        ValueError: not an embedded name or a folder with config.json and safetensors weights.
    """
    name = str(model)
    if name in EMBEDDED_MODELS:
        return converted_folder(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        raise ValueError(f"{path} is a GGUF file; export needs the base model as a Hugging Face folder or "
                         f"{sorted(EMBEDDED_MODELS)}. Convert it first: python -c \"import lora; m, t = "
                         f"lora.load_model('{path}'); m.save_pretrained('base'); t.save_pretrained('base')\"")
    if not path.exists():
        raise ValueError(f"no model {name!r}: no such folder, and not one of the embedded models "
                         f"{sorted(EMBEDDED_MODELS)}; pass a Hugging Face model folder or an embedded name")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json); pass a folder written by "
                         f"save_pretrained, or an embedded name such as {sorted(EMBEDDED_MODELS)[0]!r}")
    if not list(path.glob("model*.safetensors")):
        raise ValueError(f"{path} has no model*.safetensors weights (the Hugging Face layout); re-save the model with "
                         f"save_pretrained (safe_serialization=True)")
    return path


def _weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [p.name for p in sorted(folder.glob("model*.safetensors"))]  # Hugging Face's names, not consolidated.*


class BaseWeights(Mapping):
    """A model folder's safetensors tensors by state-dict key, in file order, each read only when asked for."""

    def __init__(self, folder: Path):
        self._file_of: dict[str, Path] = {}
        for file in _weight_files(folder):
            with safe_open(str(folder / file), framework="pt") as f:
                self._file_of.update(dict.fromkeys(f.keys(), folder / file))

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self._file_of[key]), framework="pt") as f:
            return f.get_tensor(key)

    def shape(self, key: str) -> list[int]:
        """The shape of tensor ``key``, read from the file's header without loading the tensor."""
        with safe_open(str(self._file_of[key]), framework="pt") as f:
            return list(f.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def tensor_specs(folder: Path) -> list[tuple[str, str, list[int]]]:
    """(name, safetensors dtype, shape) of every base tensor, in :class:`BaseWeights` order, without loading any."""
    specs = []
    for file in _weight_files(folder):
        with safe_open(str(folder / file), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                specs.append((key, piece.get_dtype(), list(piece.get_shape())))
    return specs


def base_merger(folder: Path, adapter: str | os.PathLike | None, check_base: bool = True,
                grow_vocabulary: bool = False) -> AdapterMerger | None:
    """The adapter's merger against the base folder's weights (None without an adapter), checked (keys, shapes,
    fingerprint) before anything is merged or written.

    Args:
        grow_vocabulary: Accept an adapter trained after tokens were added to its base (lora.add_tokens), whose
            merge grows the embedding and head: only for a writer that also writes the grown tokenizer and config.

    Raises:
        ValueError: the adapter does not belong to this base, or grows the vocabulary where that is not accepted.
    """
    if not adapter:
        return None
    merger = AdapterMerger(adapter, BaseWeights(folder), check_base, whole_model=True)
    if merger.added_tokens and not grow_vocabulary:
        raise ValueError(f"the adapter {adapter} was trained with the tokens {merger.added_tokens['tokens']} added "
                         f"to its base, which this export would write without them in the tokenizer. Merge it "
                         f"first (lora merge --model {folder} --adapter {adapter} --out merged: the merged folder "
                         f"has the grown vocabulary and tokenizer), then export that folder "
                         f"(lora export gguf --model merged --out model.gguf)")
    return merger


def merged_tensors(folder: Path, adapter: str | os.PathLike | None, check_base: bool = True,
                   merger: AdapterMerger | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Base tensors with the adapter merged in (or unchanged without one), one at a time.

    The adapter is checked against the base (keys, shapes, fingerprint) here, before anything is merged or written
    (:func:`base_merger`), unless a ``merger`` made by it is given.
    """
    base = BaseWeights(folder)
    merger = merger or base_merger(folder, adapter, check_base)
    return ((name, merger.merged(name, base[name]) if merger else base[name]) for name in base)
