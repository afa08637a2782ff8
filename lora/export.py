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
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .atomic import atomic_dir, atomic_file, refuse_foreign
from .data import special_prefix
from .merge import AdapterMerger
from .models import EMBEDDED_MODELS, SOURCE_INFO, converted_folder, require_gguf

GGUF_DTYPES = ("f32", "f16", "q8_0")
DEFAULT_SHARD_BYTES = 2 * 1024**3
# Weight files of any layout (Mistral's consolidated.safetensors too): never copied next to the merged weights,
# where a loader that prefers them would serve the unmerged base
_WEIGHT_FILES = re.compile(r"^(.*\.(safetensors|bin|pt|pth|ckpt|gguf)|.*\.index\.json)$")
# What an earlier merged export wrote (shards counted otherwise), which a new one replaces
_EXPORTED_WEIGHTS = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json)$")


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
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, check_base: bool = True, verify: bool = True) -> Path:
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
        verify: Before the new folder replaces ``out``, compare its logits with the adapter model's and print the
            max |dlogit| (:func:`lora.verify.verify_export`). This loads the model twice, one copy after the other,
            in float32: it needs about 4 bytes per parameter, far more than the merge itself.

    Returns:
        The output folder.

    Raises:
        ValueError: the base is not a usable folder, or the adapter does not belong to it (nothing is written), or
            the check failed (``out`` is left as it was).
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
    copied = {item.name for item in folder.iterdir() if item.is_file()}

    def owns(name: str) -> bool:  # an earlier export's files: its shards may be named otherwise
        return name in copied or _EXPORTED_WEIGHTS.match(name) is not None

    refuse_foreign(out, owns)  # before the merge, not after it
    stream = merged_tensors(folder, adapter, check_base)
    with atomic_dir(out, owns=owns) as tmp:
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
        if verify:  # on the temporary folder: a failure leaves `out` as it was
            from .verify import verify_export

            print(verify_export(folder, adapter, tmp, name=str(out)), flush=True)
    return out


# -- GGUF ---------------------------------------------------------------------------------------------------------
# transformers model_type -> llama.cpp architecture (a gguf.MODEL_ARCH_NAMES value): the families whose GGUF files
# tests/test_gguf_families.py reads back through transformers' GGUF loader and compares with the merged model.
_GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
               "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2"}
_MERGED_ROUTE = "Export a merged folder instead (lora merge) and convert it with llama.cpp's convert_hf_to_gguf.py"
# llama.cpp's Gemma graphs multiply by a norm's stored weight, where Hugging Face's Gemma norms compute x * (1 + w):
# llama.cpp's converter stores w + 1 (and transformers' GGUF reader subtracts the 1 again).
_NORM_PLUS_ONE = ("gemma2", "gemma3")
# The families whose llama.cpp graphs attend through a sliding window on the layers the file marks (the others attend
# over the whole context).
_SLIDING_WINDOW = ("gemma2", "gemma3")
# llama.cpp rotates a head's interleaved pairs (its "normal" rope) for these; Hugging Face pairs the head's two halves,
# as llama.cpp's NEOX rope does for the other families here, so only these get their Q/K rows permuted.
_INTERLEAVED_ROPE = ("llama",)
# Rope scalings llama.cpp can be told about, and where: "linear" through rope.scaling keys (every family), "llama3"
# through the per-frequency rope_freqs tensor, which llama.cpp reads for the llama architecture.
_ROPE_TYPES = {"default": tuple(_GGUF_ARCHS.values()), "linear": tuple(_GGUF_ARCHS.values()), "llama3": ("llama",)}
# llama.cpp scales Gemma's queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 27B shape (told apart by
# its layer count); it reads no query_pre_attn_scalar (its gemma2.cpp / gemma3.cpp load_arch_hparams).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _llama_cpp_query_scalar(config, arch: str) -> int:
    """What llama.cpp scales a Gemma model's queries by (1/sqrt of it), from the shape alone."""
    if config.num_hidden_layers == _GEMMA_27B_LAYERS[arch]:
        return config.hidden_size // config.num_attention_heads
    return config.head_dim


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Unscaled rotary frequencies, (dim / 2,): what llama.cpp's rope_freqs divides."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def _rope(config) -> tuple[dict, dict | None]:
    """(rope parameters of full-attention layers, those of sliding-window layers when they differ, else None)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:  # Gemma 3: one set per layer type
        return params["full_attention"], params.get("sliding_attention")
    return params, None


def _sliding_layers(config) -> list[bool]:
    """Which layers attend through a sliding window, as transformers runs the model."""
    types = getattr(config, "layer_types", None)
    if types:
        return [kind == "sliding_attention" for kind in types]
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return [bool(window)] * config.num_hidden_layers


def _gguf_config(folder: Path, what: str = "GGUF export"):
    """The base's config and llama.cpp architecture, checked to be something llama.cpp runs as transformers does.

    Raises:
        ValueError: a family or setting this exporter does not write exactly; the message names the merged route.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    arch = _GGUF_ARCHS.get(config.model_type)
    if arch is None:
        raise ValueError(f"{what} supports {', '.join(_GGUF_ARCHS)} models; {folder} is a {config.model_type!r} "
                         f"model. {_MERGED_ROUTE}")
    full, swa = _rope(config)
    rope_type = full.get("rope_type", "default")
    if arch not in _ROPE_TYPES.get(rope_type, ()) or (swa or {}).get("rope_type", "default") != "default":
        raise ValueError(f"{folder} uses {rope_type!r} rope scaling ({full}), which {what} does not write for a "
                         f"{config.model_type!r} model. {_MERGED_ROUTE}, and check that llama.cpp supports it")
    problems = []
    if arch in _GEMMA_27B_LAYERS:  # Gemma 2 and 3
        llama_cpp_scalar = _llama_cpp_query_scalar(config, arch)
        if config.query_pre_attn_scalar != llama_cpp_scalar:
            problems.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar}, where llama.cpp scales queries "
                            f"by 1/sqrt({llama_cpp_scalar}) for this shape")
        if arch == "gemma2" and not config.tie_word_embeddings:
            problems.append("an output head of its own (llama.cpp's Gemma 2 always reuses the embedding)")
        if arch == "gemma2" and not (config.attn_logit_softcapping and config.final_logit_softcapping):
            problems.append("no logit soft-capping (llama.cpp's Gemma 2 always soft-caps)")
        if arch == "gemma3" and config.attn_logit_softcapping:
            problems.append("attention soft-capping (llama.cpp's Gemma 3 has none)")
    if problems:
        raise ValueError(f"{folder} is a {config.model_type!r} model with {'; '.join(problems)}, so llama.cpp "
                         f"would compute something else. {_MERGED_ROUTE}")
    if arch not in _SLIDING_WINDOW and any(_sliding_layers(config)) \
            and config.sliding_window < config.max_position_embeddings:
        warnings.warn(f"{folder} attends through a {config.sliding_window}-token sliding window; llama.cpp's "
                      f"{arch!r} graph attends over the whole context (as after its own converter), so outputs agree "
                      f"only on prompts up to that length")
    return config, arch


def _model_arch(arch: str, gguf):
    """gguf's MODEL_ARCH member for a llama.cpp architecture name."""
    return next(member for member, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder Q/K rows (or a LoRA B's rows) from Hugging Face's rotary layout to llama.cpp's.

    Hugging Face keeps each head's rotary pairs as two halves; llama.cpp interleaves them. transformers' GGUF
    loader applies the inverse when reading.
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_from_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_for_llama_cpp`: llama.cpp's interleaved rotary rows back to two halves per
    head."""
    return (weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_header(writer, config, arch: str, name: str, gguf) -> None:
    """Hyperparameters under llama.cpp's keys for the architecture."""
    writer.add_name(name)
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    full, swa = _rope(config)
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)  # llama.cpp assumes hidden/heads without these (Mistral's and Gemma's differ)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * full.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch in _SLIDING_WINDOW:
        sliding = _sliding_layers(config)
        writer.add_sliding_window_pattern(sliding)  # per layer, so llama.cpp's default pattern never applies
        if any(sliding):
            writer.add_sliding_window(config.sliding_window)
        if swa:
            writer.add_rope_freq_base_swa(float(swa.get("rope_theta", 10000.0)))
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if config.attn_logit_softcapping:
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))


def _rope_freqs(config) -> torch.Tensor:
    """Llama 3's rope scaling as llama.cpp's rope_freqs: what each rotary frequency is divided by.

    Taken from transformers' own rope functions (the default frequencies over the llama3-scaled ones), so the file
    rotates exactly as transformers does.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    full, _ = _rope(config)
    dim = int(_head_dim(config) * full.get("partial_rotary_factor", 1.0))
    scaled, attention_factor = ROPE_INIT_FUNCTIONS[full["rope_type"]](config, torch.device("cpu"))
    if attention_factor != 1.0:
        raise ValueError(f"rope scaling {full} also scales attention by {attention_factor}, which rope_freqs "
                         f"cannot hold. {_MERGED_ROUTE}")
    return (_default_inv_freq(full["rope_theta"], dim) / scaled.float()).float()  # (dim / 2,)


_GPT2_CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _gguf_tensors(config, arch: str, tensors: Iterator[tuple[str, torch.Tensor]],
                  gguf) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face tensors renamed and laid out as llama.cpp expects, in fp32, plus llama.cpp's rope_freqs."""
    names = gguf.get_tensor_name_map(_model_arch(arch, gguf), config.num_hidden_layers)
    for name, tensor in tensors:
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers, not weights
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd (GPT-2 gets an explicit copy below)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"tensor {name!r} has no llama.cpp name; this {config.model_type} model has parts "
                             f"the GGUF exporter does not know. {_MERGED_ROUTE}")
        tensor = tensor.float()
        if arch == "gpt2":
            if gguf_name.endswith(_GPT2_CONV1D):
                tensor = tensor.T.contiguous()  # Conv1D stores (in, out); llama.cpp wants (out, in)
            yield gguf_name, tensor
            if gguf_name == "token_embd.weight" and config.tie_word_embeddings:
                yield "output.weight", tensor  # llama.cpp builds before its tied-head fallback need this copy
            continue
        if arch in _NORM_PLUS_ONE and gguf_name.endswith("norm.weight"):
            tensor = tensor + 1.0
        if arch in _INTERLEAVED_ROPE and ".attn_q." in gguf_name:
            tensor = permute_for_llama_cpp(tensor, config.num_attention_heads)
        elif arch in _INTERLEAVED_ROPE and ".attn_k." in gguf_name:
            tensor = permute_for_llama_cpp(tensor, config.num_key_value_heads)
        yield gguf_name, tensor
    if _rope(config)[0].get("rope_type") == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _rope_freqs(config)


# llama.cpp splits text with a list of regexes before BPE, chosen by tokenizer.ggml.pre (llm_tokenizer_bpe in its
# llama-vocab.cpp). These are the types the byte-level tokenizers of the families above use, each with its regexes as
# the Hugging Face tokenizer.json files spell them and whether llama.cpp takes a word found whole in the vocabulary
# before merging (tokenizer.json's ignore_merges). Prefix digits, Llama 3's case-insensitive contractions and
# 1-3 digit groups, Qwen2's single digits: each type splits the probe below differently.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA_CPP_PRE_TOKENIZERS = (("gpt-2", (_GPT2_SPLIT,), False), ("smollm", (r"\p{N}", _GPT2_SPLIT), False),
                             ("llama-bpe", (_LLAMA3_SPLIT,), True), ("smaug-bpe", (_LLAMA3_SPLIT,), False),
                             ("qwen2", (_QWEN2_SPLIT,), False))
_PRE_TOKENIZER_PROBE = ("Hello WORLD, it's I'LL  don't: 1234567 3.14159 $price (x+y)=z\n\n\tTabbed   three\r\n"
                        "  end ünïcödé 東京タワー 😀!! 'quoted' ...\n")


def _regex_split(text: str, patterns: tuple[str, ...]) -> list[str]:
    """``text`` cut as llama.cpp's BPE pre-tokenizer cuts it: each regex in turn splits every piece further into its
    matches and the gaps between them."""
    import regex  # transformers' own dependency; Python's re knows no \p{L}

    pieces = [text]
    for pattern in patterns:
        compiled, split = regex.compile(pattern), []
        for piece in pieces:
            end = 0
            for match in compiled.finditer(piece):
                split += [piece[end:match.start()]] * (match.start() > end) + [match.group()] * bool(match.group())
                end = match.end()
            split += [piece[end:]] * (end < len(piece))
        pieces = split
    return pieces


def llama_cpp_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` type for a Hugging Face byte-level BPE tokenizer, or None if no known type
    splits text as this tokenizer does.

    Decided by behaviour, as llama.cpp's converter does (it hashes the tokens of a probe text): the tokenizer's own
    pre-tokenizer cuts a probe text, and the first type whose regexes cut it identically wins.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = tokenizer.backend_tokenizer
    if backend.pre_tokenizer is None:
        return None
    spec = json.loads(backend.to_str())
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(_PRE_TOKENIZER_PROBE)]
    if "ByteLevel" in json.dumps(spec["pre_tokenizer"]):  # pieces come back in GPT-2's printable byte alphabet
        unbyte = {char: byte for byte, char in bytes_to_unicode().items()}
        pieces = [bytes(unbyte[c] for c in piece).decode("utf-8", errors="replace") for piece in pieces]
    ignore_merges = bool(spec["model"].get("ignore_merges", False))
    matches = [(name, whole) for name, patterns, whole in _LLAMA_CPP_PRE_TOKENIZERS
               if _regex_split(_PRE_TOKENIZER_PROBE, patterns) == pieces]
    return next((name for name, whole in matches if whole == ignore_merges), matches[0][0] if matches else None)


def _gguf_pre_tokenizer(tokenizer, folder: Path) -> str:
    """``tokenizer.ggml.pre`` for the base: recorded when the base was converted from a GGUF file, else derived."""
    source = folder / SOURCE_INFO
    recorded = json.loads(source.read_text()).get("tokenizer.ggml.pre") if source.is_file() else None
    if recorded is not None:
        return recorded
    pre = llama_cpp_pre_tokenizer(tokenizer)
    if pre is None:
        # A warning, not a refusal: the vocabulary and merges are the model's own, so llama.cpp runs the model and
        # tokenizes most text the same; refusing would leave no GGUF at all, and the exact route stays open.
        warnings.warn(f"the tokenizer in {folder} splits text before BPE in a way none of llama.cpp's pre-tokenizer "
                      f"types known here does ({', '.join(name for name, _, _ in _LLAMA_CPP_PRE_TOKENIZERS)}); "
                      f"writing tokenizer.ggml.pre='default', so llama.cpp will tokenize some text differently from "
                      f"Hugging Face. For an exact tokenizer: lora merge, then llama.cpp's convert_hf_to_gguf.py "
                      f"(which recognises more tokenizers by their output)")
        return "default"
    return pre


def _add_tokenizer(writer, folder: Path, config, gguf) -> None:
    """The Hugging Face tokenizer under llama.cpp's keys, plus the chat template.

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) becomes llama.cpp's "gpt2" tokenizer model with the pre-tokenizer
    type it splits text by; SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3) becomes its
    "llama" model, whose merges are chosen by token score: a token's score ranks the first merge that makes it, as
    SentencePiece's own scores do. Both also carry the merges, from which transformers' GGUF reader rebuilds them.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    sentencepiece = bool(spec["model"].get("byte_fallback")) and not byte_level
    if spec["model"]["type"] != "BPE" or not (byte_level or sentencepiece):
        raise ValueError(f"the tokenizer in {folder} is a {spec['model']['type']} tokenizer that is neither "
                         f"byte-level BPE nor BPE with byte fallback; GGUF export writes those two kinds only. "
                         f"{_MERGED_ROUTE}")
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
        if sentencepiece and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[i] = gguf.TokenType.BYTE  # what llama.cpp falls back to for a character it has no token for
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    if sentencepiece:
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
        first_merge = {}
        for rank, merge in enumerate(merges):
            first_merge.setdefault(merge.replace(" ", ""), rank)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([-(first_merge[token] + 1.0) if token in first_merge else 0.0 for token in tokens])
        # llama.cpp prepends "▁" to the text unless told not to; Gemma's normalizer, for one, does not
        marked = tokenizer.backend_tokenizer.normalizer.normalize_str("a") \
            if tokenizer.backend_tokenizer.normalizer else "a"
        if tokenizer.backend_tokenizer.pre_tokenizer:
            marked = "".join(piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(marked))
        writer.add_add_space_prefix(marked.startswith("\u2581"))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_gguf_pre_tokenizer(tokenizer, folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    # by what the tokenizer does: Llama-3-style tokenizers add BOS in their post-processor, without add_bos_token
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and special_prefix(tokenizer)[:1] == [bos])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _write_gguf(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(model: str | os.PathLike, out: str | os.PathLike, adapter: str | os.PathLike | None = None,
                dtype: str = "f16", check_base: bool = True, verify: bool = True) -> Path:
    """Write a GGUF file that llama.cpp, Ollama and transformers' GGUF loader read.

    Args:
        model: The base: an embedded name or an HF folder (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3 or GPT-2).
        out: The ``.gguf`` file to write (replaced only once complete).
        adapter: Adapter folder to merge in first (None: the base alone).
        dtype: ``"f32"``, ``"f16"`` or ``"q8_0"`` for matrices; norms and biases stay f32. A matrix whose rows
            are not a multiple of 32 falls back to f16 under q8_0 (the block size).
        check_base: Refuse an adapter whose recorded base-model fingerprint does not match this base.
        verify: Before the new file replaces ``out``, read it back through transformers' GGUF loader, compare its
            logits with the adapter model's and print the max |dlogit| (:func:`lora.verify.verify_export`). This
            loads the model twice, one copy after the other, in float32 (about 4 bytes per parameter, twice that
            while transformers dequantizes the file); a failure raises ValueError and leaves ``out`` as it was.

    Returns:
        The file written.

    Raises:
        ValueError: a family, rope scaling, Gemma setting or tokenizer kind that llama.cpp would not run as
            transformers does (the message names the merged-folder route), or an adapter for another base.
    """
    gguf = require_gguf()
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    folder, out = resolve_base_folder(model), Path(out)
    config, arch = _gguf_config(folder)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tensors = merged_tensors(folder, adapter, check_base)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _add_header(writer, config, arch, out.stem, gguf)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, folder, config, gguf)
        for gguf_name, tensor in _gguf_tensors(config, arch, tensors, gguf):
            array = tensor.numpy()
            if array.ndim == 1 or dtype == "f32":
                writer.add_tensor(gguf_name, array.astype(np.float32))
            elif dtype == "q8_0" and array.shape[-1] % 32 == 0:
                qtype = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(gguf_name, array.astype(np.float16))
        _write_gguf(writer)
        if verify:  # on the temporary file: a failure leaves `out` as it was
            from .verify import verify_export

            print(verify_export(folder, adapter, tmp, name=str(out)), flush=True)
    return out


def export_adapter_gguf(model: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                        check_base: bool = True) -> Path:
    """Write the adapter alone as a llama.cpp LoRA GGUF (Ollama's ``ADAPTER`` line, ``llama-cli --lora``).

    llama.cpp applies ``alpha / rank * B @ A`` per tensor, with one ``adapter.lora.alpha`` for the file and each
    tensor's own rank (``llama_adapter_lora_weight::get_scale``). Each module's own scale (``alpha / r``, or
    ``alpha / sqrt(r)`` with rsLoRA) is folded into its B instead, and the file's alpha makes llama.cpp's factor
    exactly 1, so any scaling rule comes out exact. Q/K rows are permuted as in the base GGUF.

    Raises:
        ValueError: DoRA, trained biases or ``modules_to_save`` (llama.cpp adapters hold plain A/B pairs only), a
            family :func:`export_gguf` does not write, or an adapter that does not belong to the base ``model``.
    """
    gguf = require_gguf()
    config, arch, merger, gguf_names = check_adapter_gguf(model, adapter, check_base)
    ranks = {parts["A"].shape[0] for parts in merger.factors.values()}
    # alpha / rank == 1 exactly (x / x) when every pair has one rank, for any reader that applies alpha / rank; with
    # several ranks no single alpha does, and llama.cpp reads alpha 0 as "no scaling" (a factor of exactly 1).
    alpha = float(next(iter(ranks))) if len(ranks) == 1 else 0.0
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for weight_name in sorted(merger.factors):
            gguf_name = gguf_names[weight_name]
            A = merger.factors[weight_name]["A"].float()  # (r, in)
            B = merger.scale * merger.factors[weight_name]["B"].float()  # (out, r), the module's scale folded in
            if arch in _INTERLEAVED_ROPE and ".attn_q." in gguf_name:
                B = permute_for_llama_cpp(B, config.num_attention_heads)
            elif arch in _INTERLEAVED_ROPE and ".attn_k." in gguf_name:
                B = permute_for_llama_cpp(B, config.num_key_value_heads)
            writer.add_tensor(gguf_name + ".lora_a", A.contiguous().numpy())
            writer.add_tensor(gguf_name + ".lora_b", B.contiguous().numpy())
        _write_gguf(writer)
    return Path(out)


def check_adapter_gguf(model: str | os.PathLike, adapter: str | os.PathLike,
                       check_base: bool = True) -> tuple[Any, str, AdapterMerger, dict[str, str]]:
    """Everything :func:`export_adapter_gguf` refuses, checked before anything is written: returns the base's
    config and llama.cpp architecture, the adapter's :class:`AdapterMerger` and each weight's llama.cpp name."""
    gguf = require_gguf()
    folder = resolve_base_folder(model)
    config, arch = _gguf_config(folder, what="adapter GGUF export")
    merger = AdapterMerger(adapter, BaseWeights(folder), check_base)  # checks it belongs to this base
    cfg = merger.config
    unsupported = [what for what, bad in (("DoRA", cfg.dora), ("trained biases", cfg.bias != "none"),
                                          ("modules_to_save", bool(cfg.modules_to_save))) if bad]
    if unsupported:
        raise ValueError(f"this adapter uses {', '.join(unsupported)}, which llama.cpp/Ollama adapters cannot "
                         f"hold (plain LoRA A/B only). Merge it instead: lora export gguf --adapter {adapter}")
    names = gguf.get_tensor_name_map(_model_arch(arch, gguf), config.num_hidden_layers)
    gguf_names = {}
    for weight_name in merger.factors:
        gguf_names[weight_name] = names.get_name(weight_name, try_suffixes=(".weight",))
        if gguf_names[weight_name] is None:
            raise ValueError(f"the adapter targets {weight_name!r}, which has no llama.cpp name; merge it "
                             f"instead: lora export gguf --adapter {adapter}")
    return config, arch, merger, gguf_names


def read_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A GGUF file as transformers' GGUF loader reads it, with the settings that loader leaves at its config classes'
    defaults taken from the keys and tensors llama.cpp runs on instead.

    The loader reads no rope scaling (Llama 3's rope_freqs, linear), no Gemma query scale, soft-capping or per-layer
    sliding pattern, no head size outside Llama and Gemma, and GPT-2's context length as n_ctx only; a file of those
    families read plainly gives a model that computes something else than llama.cpp does with it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf, path = require_gguf(), Path(path)
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()

    def key(name: str):
        field = reader.get_field(name.format(arch=arch))
        return None if field is None else field.contents()

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if arch == "gpt2":
        config.n_positions = key(gguf.Keys.LLM.CONTEXT_LENGTH)
    elif key(gguf.Keys.Attention.KEY_LENGTH):
        config.head_dim = key(gguf.Keys.Attention.KEY_LENGTH)
    if arch in _GEMMA_27B_LAYERS:  # Gemma 2 and 3
        config.query_pre_attn_scalar = _llama_cpp_query_scalar(config, arch)
        config.final_logit_softcapping = key(gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING)
        config.attn_logit_softcapping = key(gguf.Keys.LLM.ATTN_LOGIT_SOFTCAPPING)
        pattern = key(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN)
        if isinstance(pattern, list):
            config.layer_types = ["sliding_attention" if swa else "full_attention" for swa in pattern]
    if arch != "gpt2":
        full, swa = config.rope_parameters.get("full_attention", config.rope_parameters), \
            config.rope_parameters.get("sliding_attention")
        if swa is not None and key(gguf.Keys.Rope.FREQ_BASE_SWA) is not None:
            swa["rope_theta"] = key(gguf.Keys.Rope.FREQ_BASE_SWA)
        if key(gguf.Keys.Rope.SCALING_TYPE) == "linear":
            full.update(rope_type="linear", factor=key(gguf.Keys.Rope.SCALING_FACTOR))
        if key(gguf.Keys.Rope.DIMENSION_COUNT) and key(gguf.Keys.Rope.DIMENSION_COUNT) != _head_dim(config):
            full["partial_rotary_factor"] = key(gguf.Keys.Rope.DIMENSION_COUNT) / _head_dim(config)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=dtype)
    freqs = [t for t in reader.tensors if t.name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"]
    if freqs:  # llama.cpp divides rotary frequency i by rope_freqs[i]
        dim, base = key(gguf.Keys.Rope.DIMENSION_COUNT), key(gguf.Keys.Rope.FREQ_BASE)
        inv_freq = _default_inv_freq(base, dim) / torch.from_numpy(np.array(freqs[0].data, dtype=np.float32))
        for module in model.modules():
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
                module.inv_freq, module.original_inv_freq = inv_freq.clone(), inv_freq.clone()
    return model.eval()


# -- Ollama ---------------------------------------------------------------------------------------------------------
# Ollama hands a template both `.System` (every system message, joined) and `.Messages` (all messages, the system
# ones included: `collate` in ollama's template/template.go), and puts the Modelfile's SYSTEM into `.Messages` as a
# first system message when a request brings none (server/routes.go). So the template renders `.Messages` alone:
# each system prompt once, where the conversation has it, as the Hugging Face ChatML templates do. Rendering
# `.System` as well showed it twice.
_CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
_PROBE = "lora-probe-7f3a"  # a user message no template adds anything to


def _plain_template(eos_token: str) -> str:
    """The plain ``role: content`` format :func:`lora.data.render_chat` trains a tokenizer without a chat template
    on, as Ollama's Go template: each turn ``"role: content"``, a newline after a prompt turn, EOS after an answer,
    then ``"assistant:"``. Those piece boundaries fall where byte-level BPE splits anyway, so Ollama tokenizing the
    whole text gives the ids training saw."""
    return ('{{- range .Messages }}{{ .Role }}: {{ .Content }}{{ if eq .Role "assistant" }}' + eos_token
            + '{{ else }}\n{{ end }}{{ end }}assistant:')


def _default_system_prompt(chat_template: str) -> str | None:
    """The system prompt a ChatML ``chat_template`` adds when the conversation brings none, else None.

    Found by rendering the template (with transformers' own renderer) on a one-message conversation, so a default
    behind any Jinja logic is found (Qwen2.5 keeps it in an ``else`` branch) and template text that is no default
    is not taken for one.
    """
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template([[{"role": "user", "content": _PROBE}]], chat_template=chat_template)
    except (TemplateError, TypeError, ValueError):  # needs more than a plain conversation: no default to offer
        return None
    head, found, _ = rendered[0].partition(f"<|im_start|>user\n{_PROBE}<|im_end|>\n")
    opening, closing = "<|im_start|>system\n", "<|im_end|>\n"
    if not found or not head.startswith(opening) or not head.endswith(closing):
        return None
    system = head[len(opening):-len(closing)]
    # one ChatML block, and text that fits in the Modelfile's """...""" quotes
    return system if system and "<|im_start|>" not in system and '"""' not in system else None


def ollama_modelfile(gguf_file: str, chat_template: str | None, stop_tokens: list[str], temperature: float,
                     adapter_file: str | None = None) -> str:
    """The text of an Ollama Modelfile for ``gguf_file`` (paths relative to the Modelfile).

    ChatML templates (SmolLM, Qwen, ...) are converted to Ollama's Go template, with the system prompt the template
    adds to a conversation that has none as ``SYSTEM`` (Ollama too injects it only when a request brings no system
    prompt first), so Ollama's prompt equals ``apply_chat_template(messages, add_generation_prompt=True)``. A
    tokenizer without a chat template gets the plain format training used (:func:`lora.data.render_chat`). Other
    templates are left out: Ollama then falls back to the GGUF's own chat template.
    """
    lines = [f"FROM ./{gguf_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if not chat_template and stop_tokens:
        lines.append(f'TEMPLATE """{_plain_template(stop_tokens[0])}"""')
    elif chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
        default_system = _default_system_prompt(chat_template)
        if default_system:
            lines.append(f'SYSTEM """{default_system}"""')
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
           "resolve_base_folder", "BaseWeights", "merged_tensors", "permute_for_llama_cpp", "unpermute_from_llama_cpp",
           "GGUF_DTYPES",
           "read_gguf_model", "llama_cpp_pre_tokenizer"]
