"""GGUF files llama.cpp and Ollama run: the whole model (adapter merged) and the adapter alone, with llama.cpp's
architectures, tensor names and keys from the ``gguf`` package's own tables."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_file
from ..merge import AdapterMerger
from ..models import require_gguf
from .base import BaseWeights, merged_tensors, resolve_base_folder
from .gguf_arch import (GRANITE_SCALES, HEAD_REQUIRED, INTERLEAVED_ROPE, MERGED_ROUTE, NORM_PLUS_ONE, SLIDING_WINDOW,
                        attention_head_dim, default_inv_freq, gguf_config, model_arch, permute_for_llama_cpp,
                        rope_settings, sliding_layers)
from .gguf_tokenizer import add_tokenizer

GGUF_DTYPES = ("f32", "f16", "q8_0")


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
    full, swa = rope_settings(config)
    head_dim = attention_head_dim(config)
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
    if arch in SLIDING_WINDOW:
        sliding = sliding_layers(config)
        writer.add_sliding_window_pattern(sliding)  # per layer, so llama.cpp's default pattern never applies
        if any(sliding):
            writer.add_sliding_window(config.sliding_window)
        if swa:
            writer.add_rope_freq_base_swa(float(swa.get("rope_theta", 10000.0)))
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if config.attn_logit_softcapping:
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if arch == "granite":  # llama.cpp multiplies as transformers does, and divides the logits by logit_scale
        for field, add in GRANITE_SCALES.items():
            getattr(writer, add)(float(getattr(config, field)))


def _rope_freqs(config) -> torch.Tensor:
    """Llama 3's rope scaling as llama.cpp's rope_freqs: what each rotary frequency is divided by.

    Taken from transformers' own rope functions (the default frequencies over the llama3-scaled ones), so the file
    rotates exactly as transformers does.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    full, _ = rope_settings(config)
    dim = int(attention_head_dim(config) * full.get("partial_rotary_factor", 1.0))
    scaled, attention_factor = ROPE_INIT_FUNCTIONS[full["rope_type"]](config, torch.device("cpu"))
    if attention_factor != 1.0:
        raise ValueError(f"rope scaling {full} also scales attention by {attention_factor}, which rope_freqs "
                         f"cannot hold. {MERGED_ROUTE}")
    return (default_inv_freq(full["rope_theta"], dim) / scaled.float()).float()  # (dim / 2,)


_GPT2_CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _gguf_tensors(config, arch: str, tensors: Iterator[tuple[str, torch.Tensor]],
                  gguf) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face tensors renamed and laid out as llama.cpp expects, in fp32, plus llama.cpp's rope_freqs."""
    names = gguf.get_tensor_name_map(model_arch(arch, gguf), config.num_hidden_layers)
    for name, tensor in tensors:
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal-mask buffers, not weights
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd (or gets an explicit copy below)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"tensor {name!r} has no llama.cpp name; this {config.model_type} model has parts "
                             f"the GGUF exporter does not know. {MERGED_ROUTE}")
        tensor = tensor.float()
        if arch == "gpt2" and gguf_name.endswith(_GPT2_CONV1D):
            tensor = tensor.T.contiguous()  # Conv1D stores (in, out); llama.cpp wants (out, in)
        elif arch in NORM_PLUS_ONE and gguf_name.endswith("norm.weight"):
            tensor = tensor + 1.0
        elif arch in INTERLEAVED_ROPE and ".attn_q." in gguf_name:
            tensor = permute_for_llama_cpp(tensor, config.num_attention_heads)
        elif arch in INTERLEAVED_ROPE and ".attn_k." in gguf_name:
            tensor = permute_for_llama_cpp(tensor, config.num_key_value_heads)
        yield gguf_name, tensor
        if gguf_name == "token_embd.weight" and config.tie_word_embeddings and arch in HEAD_REQUIRED:
            yield "output.weight", tensor
    if rope_settings(config)[0].get("rope_type") == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _rope_freqs(config)


# llama.cpp splits text with a list of regexes before BPE, chosen by tokenizer.ggml.pre (llm_tokenizer_bpe in its
# llama-vocab.cpp). These are the types the byte-level tokenizers of the families above use, each with its regexes as
# the Hugging Face tokenizer.json files spell them and whether llama.cpp takes a word found whole in the vocabulary
# before merging (tokenizer.json's ignore_merges). Prefix digits, Llama 3's case-insensitive contractions and
# 1-3 digit groups, Qwen2's single digits: each type splits the probe below differently.
def _write_gguf(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(model: str | os.PathLike, out: str | os.PathLike, adapter: str | os.PathLike | None = None,
                dtype: str = "f16", check_base: bool = True,
               check: Callable[[Path], None] | None = None) -> Path:
    """Write a GGUF file that llama.cpp and Ollama run (and transformers' GGUF loader reads, for the families it
    knows).

    Args:
        model: The base: an embedded name or an HF folder (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-2,
            OLMo 2 or Granite).
        out: The ``.gguf`` file to write (replaced only once complete).
        adapter: Adapter folder to merge in first (None: the base alone).
        dtype: ``"f32"``, ``"f16"`` or ``"q8_0"`` for matrices; norms and biases stay f32. A matrix whose rows
            are not a multiple of 32 falls back to f16 under q8_0 (the block size).
        check_base: Refuse an adapter whose recorded base-model fingerprint does not match this base.
        check: Called with the complete temporary file before it replaces ``out``; an error it raises leaves
            ``out`` as it was (:func:`lora.export.export_gguf` reads the file back there).

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
    config, arch = gguf_config(folder)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tensors = merged_tensors(folder, adapter, check_base)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _add_header(writer, config, arch, out.stem, gguf)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, folder, config, gguf)
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
        if check is not None:  # on the temporary file: a failure leaves `out` as it was
            check(tmp)
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
            if arch in INTERLEAVED_ROPE and ".attn_q." in gguf_name:
                B = permute_for_llama_cpp(B, config.num_attention_heads)
            elif arch in INTERLEAVED_ROPE and ".attn_k." in gguf_name:
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
    config, arch = gguf_config(folder, what="adapter GGUF export")
    merger = AdapterMerger(adapter, BaseWeights(folder), check_base)  # checks it belongs to this base
    cfg = merger.config
    unsupported = [what for what, bad in (("DoRA", cfg.dora), ("trained biases", cfg.bias != "none"),
                                          ("modules_to_save", bool(cfg.modules_to_save))) if bad]
    if unsupported:
        raise ValueError(f"this adapter uses {', '.join(unsupported)}, which llama.cpp/Ollama adapters cannot "
                         f"hold (plain LoRA A/B only). Merge it instead: lora export gguf --adapter {adapter}")
    names = gguf.get_tensor_name_map(model_arch(arch, gguf), config.num_hidden_layers)
    gguf_names = {}
    for weight_name in merger.factors:
        gguf_names[weight_name] = names.get_name(weight_name, try_suffixes=(".weight",))
        if gguf_names[weight_name] is None:
            raise ValueError(f"the adapter targets {weight_name!r}, which has no llama.cpp name; merge it "
                             f"instead: lora export gguf --adapter {adapter}")
    return config, arch, merger, gguf_names
