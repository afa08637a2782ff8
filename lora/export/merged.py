"""A merged Hugging Face folder (config, safetensors, tokenizer), streamed tensor by tensor: about one copy of the
model in memory, shards and an index above the shard size, written under a temporary name and renamed."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..adapter_io import read_adapter
from ..atomic import atomic_dir, refuse_foreign
from ..tokens import read_added_tokens
from ..models import SOURCE_INFO
from .base import EXPORTED_WEIGHTS, WEIGHT_FILES, base_merger, merged_tensors, resolve_base_folder, tensor_specs

DEFAULT_SHARD_BYTES = 2 * 1024**3
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(spec: tuple[str, str, list[int]]) -> int:
    """Bytes of a tensor described by a :func:`tensor_specs` entry."""
    _, dtype, shape = spec
    return _DTYPE_BYTES[dtype] * math.prod(shape)


def _write_safetensors_stream(path: Path, specs: list[tuple[str, str, list[int]]],
                              tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Write a safetensors file tensor by tensor, holding one tensor at a time.

    The safetensors package only writes whole dicts; merged weights have exactly the base's names, dtypes and
    shapes, so the header (8-byte little-endian length, then JSON with byte offsets) can be written first.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        name, dtype, shape = spec
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + _nbytes(spec)]}
        offset += _nbytes(spec)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, _, shape in specs:
            got_name, tensor = next(tensors)
            if got_name != name or list(tensor.shape) != shape:
                raise RuntimeError(f"merged tensor {got_name} {list(tensor.shape)} arrived where {name} {shape} "
                                   f"was planned")
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _merge_in_model(folder: Path, adapter, tmp: Path, max_shard_bytes: int, check_base: bool, specs) -> None:
    """Merge an adapter on parameters (mixture-of-experts stacks) in the model itself, and let transformers write it.

    transformers keeps a model's experts in memory as 3-D stacks, but its checkpoints may hold them expert by
    expert under other names (its checkpoint conversion, undone on save), so the merge cannot stream the folder's
    tensors: the model is loaded in the dtype the folder stores (about one copy of it in memory), the adapter
    merged into it (fp32 math, one cast back), and transformers writes its own checkpoint layout.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..adapter_io import load_adapter
    from ..merge import merge_and_unload
    from ..tokens import add_tokens_like

    dtype = next((_TORCH_DTYPES[d] for _, d, _ in specs if d in _TORCH_DTYPES), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    record = read_added_tokens(adapter)
    if record:  # trained after lora.add_tokens: the base grows the same way first
        add_tokens_like(model, AutoTokenizer.from_pretrained(folder, local_files_only=True), record)
    load_adapter(model, adapter, check_base=check_base)
    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        merge_and_unload(model).save_pretrained(scratch, max_shard_size=max_shard_bytes)
        for item in Path(scratch).iterdir():  # the weights; config and the rest are the base's own files
            if EXPORTED_WEIGHTS.match(item.name):
                shutil.move(str(item), tmp / item.name)


def _grow_vocabulary(folder: Path, tmp: Path, record: dict) -> None:
    """The merged folder's config and tokenizer with the tokens the adapter's base had added (lora.add_tokens):
    ``vocab_size`` grown, and the base's tokenizer files rewritten with the tokens at the ids they had in training.

    Raises:
        ValueError: the base's tokenizer gives the tokens other ids (it is not the tokenizer the adapter saw).
    """
    from transformers import AutoTokenizer

    config = json.loads((tmp / "config.json").read_text())
    for part in [config] + [v for v in config.values() if isinstance(v, dict) and "vocab_size" in v]:
        if part.get("vocab_size") == record["base_vocab_size"]:
            part["vocab_size"] = record["vocab_size"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_tokens(list(record["tokens"]), special_tokens=bool(record.get("special", True)))
    ids = tokenizer.convert_tokens_to_ids(list(record["tokens"]))
    if ids != list(record["ids"]):
        raise ValueError(f"the base's tokenizer gives the added tokens {record['tokens']} the ids {ids}, but they had "
                         f"{record['ids']} when the adapter was trained: {folder} is not the base it was trained on")
    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        tokenizer.save_pretrained(scratch)
        for item in Path(scratch).iterdir():  # the base's own tokenizer files, rewritten; it had none of the others
            if (folder / item.name).is_file():
                shutil.copy2(item, tmp / item.name)


def write_merged(model: str | os.PathLike, adapter: str | os.PathLike | None, out: str | os.PathLike,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, check_base: bool = True,
                 check: Callable[[Path], None] | None = None) -> Path:
    """Write a Hugging Face folder with the adapter merged into the base weights, streaming.

    Each base tensor is read, merged and written before the next is read, so memory stays near one tensor plus
    what the operating system caches. ``config.json``, tokenizer files and generation config are copied from the
    base; weights go to ``model.safetensors``, or to shards plus ``model.safetensors.index.json`` above
    ``max_shard_bytes``. An adapter trained after :func:`lora.add_tokens` grew its base's vocabulary gets the
    grown embedding and head, ``vocab_size`` and tokenizer. An adapter on parameters (``target_parameters``:
    mixture-of-experts stacks) is merged in the loaded model instead (:func:`_merge_in_model`).

    Args:
        model: The base: an embedded name or an HF folder with safetensors weights.
        adapter: Adapter folder (ours or PEFT's); None copies the base.
        out: Output folder (replaced only once the new one is complete).
        max_shard_bytes: Largest shard.
        check_base: Refuse an adapter whose recorded base-model fingerprint does not match this base.
        check: Called with the complete temporary folder before it replaces ``out``; an error it raises leaves
            ``out`` as it was (:func:`lora.export.export_merged` reads the folder back there).

    Returns:
        The output folder.

    Raises:
        ValueError: the base is not a usable folder, or the adapter does not belong to it (nothing is written), or
            the check failed (``out`` is left as it was).
    """
    folder, out = resolve_base_folder(model), Path(out)
    specs = tensor_specs(folder)
    copied = {item.name for item in folder.iterdir() if item.is_file()}

    def owns(name: str) -> bool:  # an earlier export's files: its shards may be named otherwise
        return name in copied or EXPORTED_WEIGHTS.match(name) is not None

    refuse_foreign(out, owns)  # before the merge, not after it
    if adapter and read_adapter(adapter)[0].target_parameters:
        merger, shards, stream = None, [], None  # merged in the model: see _merge_in_model
    else:
        # an adapter trained after lora.add_tokens grows the embedding and head; config and tokenizer grow with them
        merger = base_merger(folder, adapter, check_base, grow_vocabulary=True)
        if merger is not None:
            specs = [(name, dtype, merger.shape(name, shape)) for name, dtype, shape in specs]
        shards = [[]]
        size = 0
        for spec in specs:
            nbytes = _nbytes(spec)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += nbytes
        stream = merged_tensors(folder, adapter, check_base, merger=merger)
    with atomic_dir(out, owns=owns) as tmp:
        if stream is None:
            _merge_in_model(folder, adapter, tmp, max_shard_bytes, check_base, specs)
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        for name, shard in zip(names, shards):
            _write_safetensors_stream(tmp / name, shard, stream)
        if len(shards) > 1:
            total = sum(_nbytes(spec) for spec in specs)
            weight_map = {spec[0]: name for name, shard in zip(names, shards) for spec in shard}
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for item in folder.iterdir():
            if item.is_file() and not WEIGHT_FILES.match(item.name) and item.name != SOURCE_INFO:
                shutil.copy2(item, tmp / item.name)
        record = merger.added_tokens if merger is not None else read_added_tokens(adapter) if adapter else None
        if record:
            _grow_vocabulary(folder, tmp, record)
        if check is not None:  # on the temporary folder: a failure leaves `out` as it was
            check(tmp)
    return out
