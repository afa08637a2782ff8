"""Export: a merged Hugging Face folder, a GGUF file (llama.cpp / Ollama), an Ollama Modelfile, an adapter GGUF.

Everything streams from the base model's safetensors through :class:`AdapterMerger`, one tensor at a time, so
merging needs about one copy of the model in memory. Outputs are written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .atomic import atomic_dir, atomic_file
from .merge import AdapterMerger
from .models import EMBEDDED_MODELS, SOURCE_INFO, converted_folder, require_gguf

GGUF_DTYPES = ("f32", "f16", "q8_0")
DEFAULT_SHARD_BYTES = 2 * 1024**3
_WEIGHT_FILES = re.compile(r"^(model.*\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin)$")


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
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"{path} has no safetensors weights; re-save the model with save_pretrained "
                         f"(safe_serialization=True)")
    return path


def _weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [p.name for p in sorted(folder.glob("*.safetensors"))]


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

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _tensor_specs(folder: Path) -> list[tuple[str, str, list[int]]]:
    """(name, safetensors dtype, shape) of every base tensor, in :class:`BaseWeights` order, without loading any."""
    specs = []
    for file in _weight_files(folder):
        with safe_open(str(folder / file), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                specs.append((key, piece.get_dtype(), list(piece.get_shape())))
    return specs


def merged_tensors(folder: Path, adapter: str | os.PathLike | None,
                   check_base: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Base tensors with the adapter merged in (or unchanged without one), one at a time.

    The adapter is checked against the base (keys, shapes, fingerprint) here, before anything is merged or written.
    """
    base = BaseWeights(folder)
    merger = AdapterMerger(adapter, base, check_base) if adapter else None
    return ((name, merger.merged(name, base[name]) if merger else base[name]) for name in base)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(spec: tuple[str, str, list[int]]) -> int:
    """Bytes of a tensor described by a :func:`_tensor_specs` entry."""
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


def export_merged(model: str | os.PathLike, adapter: str | os.PathLike | None, out: str | os.PathLike,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, check_base: bool = True) -> Path:
    """Write a Hugging Face folder with the adapter merged into the base weights, streaming.

    Each base tensor is read, merged and written before the next is read, so memory stays near one tensor plus
    what the operating system caches. ``config.json``, tokenizer files and generation config are copied from the
    base; weights go to ``model.safetensors``, or to shards plus ``model.safetensors.index.json`` above
    ``max_shard_bytes``.

    Args:
        model: The base: an embedded name or an HF folder with safetensors weights.
        adapter: Adapter folder (ours or PEFT's); None copies the base.
        out: Output folder (replaced only once the new one is complete).
        max_shard_bytes: Largest shard.
        check_base: Refuse an adapter whose recorded base-model fingerprint does not match this base.

    Returns:
        The output folder.

    Raises:
        ValueError: the base is not a usable folder, or the adapter does not belong to it (nothing is written).
    """
    folder, out = resolve_base_folder(model), Path(out)
    specs = _tensor_specs(folder)
    shards: list[list[tuple[str, str, list[int]]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = _nbytes(spec)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    stream = merged_tensors(folder, adapter, check_base)
    with atomic_dir(out) as tmp:
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
            if item.is_file() and not _WEIGHT_FILES.match(item.name) and item.name != SOURCE_INFO:
                shutil.copy2(item, tmp / item.name)
    return out


# -- GGUF ---------------------------------------------------------------------------------------------------------
_GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "gpt2": "gpt2"}  # transformers model_type -> llama.cpp arch


def _gguf_config(folder: Path, archs=tuple(_GGUF_ARCHS)):
    """The base's config, checked to be an architecture this exporter writes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in archs:
        raise ValueError(f"GGUF export supports {', '.join(archs)} models; {folder} is a {config.model_type!r} "
                         f"model. Export a merged folder instead (lora merge) and convert it with llama.cpp's "
                         f"convert_hf_to_gguf.py")
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"{folder} uses rope scaling {scaling}, which this GGUF exporter does not write yet; "
                         f"export a merged folder (lora merge) and convert it with llama.cpp")
    return config


def permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder Q/K rows (or a LoRA B's rows) from Hugging Face's rotary layout to llama.cpp's.

    Hugging Face keeps each head's rotary pairs as two halves; llama.cpp interleaves them. transformers' GGUF
    loader applies the inverse when reading.
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _add_header(writer, config, name: str) -> None:
    """Hyperparameters under llama.cpp's keys for the config's architecture."""
    writer.add_name(name)
    if config.model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                    or (config.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)


_GPT2_CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _gguf_tensors(config, tensors: Iterator[tuple[str, torch.Tensor]], gguf) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face tensors renamed and laid out as llama.cpp expects, in fp32."""
    arch = gguf.MODEL_ARCH.GPT2 if config.model_type == "gpt2" else gguf.MODEL_ARCH.LLAMA
    layers = config.n_layer if config.model_type == "gpt2" else config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, layers)
    for name, tensor in tensors:
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers, not weights
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd (GPT-2 gets an explicit copy below)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"tensor {name!r} has no llama.cpp name; this {config.model_type} model has parts "
                             f"the GGUF exporter does not know")
        tensor = tensor.float()
        if config.model_type == "gpt2":
            if gguf_name.endswith(_GPT2_CONV1D):
                tensor = tensor.T.contiguous()  # Conv1D stores (in, out); llama.cpp wants (out, in)
            yield gguf_name, tensor
            if gguf_name == "token_embd.weight" and config.tie_word_embeddings:
                yield "output.weight", tensor  # llama.cpp's GPT-2 graph reads an explicit output matrix
            continue
        if ".attn_q." in gguf_name:
            tensor = permute_for_llama_cpp(tensor, config.num_attention_heads)
        elif ".attn_k." in gguf_name:
            tensor = permute_for_llama_cpp(tensor, config.num_key_value_heads)
        yield gguf_name, tensor


def _add_tokenizer(writer, folder: Path, config, gguf) -> None:
    """The Hugging Face byte-level BPE tokenizer as llama.cpp's "gpt2" tokenizer model, plus the chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"the tokenizer in {folder} is {spec['model']['type']}, not byte-level BPE; GGUF export "
                         f"handles BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen style) only")
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    source = folder / SOURCE_INFO
    # llama.cpp picks its pre-tokenizer regex by this name; it is known when the base came from a GGUF file.
    pre = json.loads(source.read_text()).get("tokenizer.ggml.pre", "default") if source.is_file() else "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _write_gguf(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(model: str | os.PathLike, out: str | os.PathLike, adapter: str | os.PathLike | None = None,
                dtype: str = "f16", check_base: bool = True) -> Path:
    """Write a GGUF file that llama.cpp, Ollama and transformers' GGUF loader read.

    Args:
        model: The base: an embedded name or an HF folder (Llama family, or GPT-2).
        out: The ``.gguf`` file to write (replaced only once complete).
        adapter: Adapter folder to merge in first (None: the base alone).
        dtype: ``"f32"``, ``"f16"`` or ``"q8_0"`` for matrices; norms and biases stay f32. A matrix whose rows
            are not a multiple of 32 falls back to f16 under q8_0 (the block size).
        check_base: Refuse an adapter whose recorded base-model fingerprint does not match this base.

    Returns:
        The file written.
    """
    gguf = require_gguf()
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    folder, out = resolve_base_folder(model), Path(out)
    config = _gguf_config(folder)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tensors = merged_tensors(folder, adapter, check_base)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), _GGUF_ARCHS[config.model_type])
        _add_header(writer, config, out.stem)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, folder, config, gguf)
        for gguf_name, tensor in _gguf_tensors(config, tensors, gguf):
            array = tensor.numpy()
            if array.ndim == 1 or dtype == "f32":
                writer.add_tensor(gguf_name, array.astype(np.float32))
            elif dtype == "q8_0" and array.shape[-1] % 32 == 0:
                qtype = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(gguf_name, array.astype(np.float16))
        _write_gguf(writer)
    return out


def export_adapter_gguf(model: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                        check_base: bool = True) -> Path:
    """Write the adapter alone as a llama.cpp LoRA GGUF (Ollama's ``ADAPTER`` line, ``llama-cli --lora``).

    Raises:
        ValueError: DoRA, trained biases or ``modules_to_save`` (llama.cpp adapters hold plain A/B pairs only), or
            an adapter that does not belong to the base ``model`` it will be applied to.
    """
    gguf = require_gguf()
    folder, out = resolve_base_folder(model), Path(out)
    config = _gguf_config(folder, archs=("llama", "mistral"))  # Ollama's ADAPTER line serves the Llama family
    merger = AdapterMerger(adapter, BaseWeights(folder), check_base)  # checks it belongs to this base
    cfg = merger.config
    unsupported = [what for what, bad in (("DoRA", cfg.dora), ("trained biases", cfg.bias != "none"),
                                          ("modules_to_save", bool(cfg.modules_to_save))) if bad]
    if unsupported:
        raise ValueError(f"this adapter uses {', '.join(unsupported)}, which llama.cpp/Ollama adapters cannot "
                         f"hold (plain LoRA A/B only). Merge it instead: lora export gguf --adapter {adapter}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales by alpha / rank; writing scale * r keeps rsLoRA's alpha / sqrt(r) exact too.
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.scale * cfg.r))
        for weight_name in sorted(merger.factors):
            gguf_name = names.get_name(weight_name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise ValueError(f"the adapter targets {weight_name!r}, which has no llama.cpp name; merge it "
                                 f"instead: lora export gguf --adapter {adapter}")
            A = merger.factors[weight_name]["A"].float()  # (r, in)
            B = merger.factors[weight_name]["B"].float()  # (out, r)
            if ".attn_q." in gguf_name:
                B = permute_for_llama_cpp(B, config.num_attention_heads)
            elif ".attn_k." in gguf_name:
                B = permute_for_llama_cpp(B, config.num_key_value_heads)
            writer.add_tensor(gguf_name + ".lora_a", A.numpy())
            writer.add_tensor(gguf_name + ".lora_b", B.numpy())
        _write_gguf(writer)
    return out


# -- Ollama ---------------------------------------------------------------------------------------------------------
_CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def ollama_modelfile(gguf_file: str, chat_template: str | None, stop_tokens: list[str], temperature: float,
                     adapter_file: str | None = None) -> str:
    """The text of an Ollama Modelfile for ``gguf_file`` (paths relative to the Modelfile).

    ChatML templates (SmolLM, Qwen, ...) are converted to Ollama's Go template, with the template's default system
    prompt as ``SYSTEM``. Other templates are left out: Ollama then falls back to the GGUF's own chat template.
    """
    lines = [f"FROM ./{gguf_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
        default_system = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", chat_template, re.S)
        if default_system and "{{" not in default_system.group(1):
            lines.append(f'SYSTEM """{default_system.group(1)}"""')
    for token in stop_tokens:
        lines.append(f'PARAMETER stop "{token}"')
    lines.append(f"PARAMETER temperature {temperature}")
    return "\n".join(lines) + "\n"


def write_modelfile(model: str | os.PathLike, gguf_path: str | os.PathLike, temperature: float = 0.7,
                    adapter_gguf: str | os.PathLike | None = None) -> Path:
    """Write an Ollama ``Modelfile`` beside ``gguf_path`` (``ollama create NAME -f Modelfile`` in that folder).

    The chat template and stop token come from the base model's tokenizer; ``adapter_gguf`` (in the same folder)
    adds an ``ADAPTER`` line for the adapter-only route.
    """
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_folder(model), local_files_only=True)
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    text = ollama_modelfile(gguf_path.name, tokenizer.chat_template, stops, temperature,
                            Path(adapter_gguf).name if adapter_gguf else None)
    path = gguf_path.parent / "Modelfile"
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path


__all__ = ["export_merged", "export_gguf", "export_adapter_gguf", "write_modelfile", "ollama_modelfile",
           "resolve_base_folder", "BaseWeights", "merged_tensors", "permute_for_llama_cpp", "GGUF_DTYPES"]
