"""A GGUF file read back as a transformers model: through transformers' GGUF loader, with what it misses taken from
the file, or, for the architectures that loader does not read (OLMo 2, Granite), by this module's own reader, which
builds the model from the base's config with the settings and weights llama.cpp would take from the file."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch

from ..models import require_gguf
from .gguf_arch import (GEMMA_27B_LAYERS, GGUF_ARCHS, GRANITE_SCALES, INTERLEAVED_ROPE, NORM_PLUS_ONE,
                        attention_head_dim, default_inv_freq, llama_cpp_query_scalar, model_arch,
                        unpermute_from_llama_cpp)


def transformers_reads(arch: str) -> bool:
    """Whether transformers' GGUF loader reads files of this llama.cpp architecture (by its own table)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return arch in GGUF_SUPPORTED_ARCHITECTURES


def _field(reader, gguf, name: str):
    """A key's value (``{arch}`` filled in with the file's architecture), or None when the file lacks it."""
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    field = reader.get_field(name.format(arch=arch))
    return None if field is None else field.contents()


def _apply_rope_freqs(model, reader, gguf) -> None:
    """llama.cpp divides rotary frequency i by the file's rope_freqs[i] (Llama 3's scaling): the same in ``model``."""
    freqs = [t for t in reader.tensors if t.name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"]
    if not freqs:
        return
    dim, base = _field(reader, gguf, gguf.Keys.Rope.DIMENSION_COUNT), _field(reader, gguf, gguf.Keys.Rope.FREQ_BASE)
    inv_freq = default_inv_freq(base, dim) / torch.from_numpy(np.array(freqs[0].data, dtype=np.float32))
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            module.inv_freq, module.original_inv_freq = inv_freq.clone(), inv_freq.clone()


def read_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    base: str | os.PathLike | None = None):
    """A GGUF file as transformers' GGUF loader reads it, with the settings that loader leaves at its config classes'
    defaults taken from the keys and tensors llama.cpp runs on instead; an architecture that loader does not read
    (OLMo 2, Granite) is read by :func:`read_gguf_with_config` from the ``base`` folder's config.

    The loader reads no rope scaling (Llama 3's rope_freqs, linear), no Gemma query scale, soft-capping or per-layer
    sliding pattern, no head size outside Llama and Gemma, and GPT-2's context length as n_ctx only; a file of those
    families read plainly gives a model that computes something else than llama.cpp does with it.

    Args:
        path: The GGUF file.
        dtype: The model's dtype (the file's weights are dequantized to it).
        base: The Hugging Face folder the file was written from; needed only for the architectures transformers'
            loader does not read.

    Raises:
        ValueError: an architecture transformers does not read and no ``base`` to build it from, or (through
            :func:`read_gguf_with_config`) a file that does not fit the base's model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf, path = require_gguf(), Path(path)
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    if not transformers_reads(arch):
        if base is None:
            raise ValueError(f"transformers' GGUF loader does not read {arch!r} files; pass the Hugging Face folder "
                             f"the file was written from as base= to build the model from its config")
        return read_gguf_with_config(path, AutoConfig.from_pretrained(base, local_files_only=True), dtype, reader)

    def key(name: str):
        return _field(reader, gguf, name)

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if arch == "gpt2":
        config.n_positions = key(gguf.Keys.LLM.CONTEXT_LENGTH)
    elif key(gguf.Keys.Attention.KEY_LENGTH):
        config.head_dim = key(gguf.Keys.Attention.KEY_LENGTH)
    if arch in GEMMA_27B_LAYERS:  # Gemma 2 and 3
        config.query_pre_attn_scalar = llama_cpp_query_scalar(config, arch)
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
        rotary, dim = key(gguf.Keys.Rope.DIMENSION_COUNT), attention_head_dim(config)
        if rotary and rotary != dim:
            full["partial_rotary_factor"] = rotary / dim
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=dtype)
    _apply_rope_freqs(model, reader, gguf)
    return model.eval()


def _llama_cpp_config(reader, gguf, config, arch: str):
    """``config`` (the base's, copied) with every setting llama.cpp takes from the file's keys replaced by the file's
    value, or by llama.cpp's default where the file has no such key: the model llama.cpp builds from this file.

    Raises:
        ValueError: a key llama.cpp requires is missing.
    """
    config = copy.deepcopy(config)

    def key(name: str, default=None, required: bool = False):
        value = _field(reader, gguf, name)
        if value is None and required:
            raise ValueError(f"the file has no {name.format(arch=arch)}, which llama.cpp requires")
        return default if value is None else value

    LLM, Attention, Rope = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    config.hidden_size = key(LLM.EMBEDDING_LENGTH, required=True)
    config.num_hidden_layers = key(LLM.BLOCK_COUNT, required=True)
    config.intermediate_size = key(LLM.FEED_FORWARD_LENGTH, required=True)
    config.num_attention_heads = key(Attention.HEAD_COUNT, required=True)
    config.num_key_value_heads = key(Attention.HEAD_COUNT_KV, config.num_attention_heads)
    config.max_position_embeddings = key(LLM.CONTEXT_LENGTH, required=True)
    config.rms_norm_eps = key(Attention.LAYERNORM_RMS_EPS, required=True)
    head_dim = key(Attention.KEY_LENGTH, config.hidden_size // config.num_attention_heads)
    if key(Attention.VALUE_LENGTH, head_dim) != head_dim:
        raise ValueError("the file's key and value head sizes differ, which no model read here has")
    config.head_dim = head_dim  # every family read here sizes its heads by config.head_dim when it is set
    rope = {"rope_type": "default", "rope_theta": float(key(Rope.FREQ_BASE, 10000.0))}
    if key(Rope.SCALING_TYPE) == "linear":
        rope.update(rope_type="linear", factor=float(key(Rope.SCALING_FACTOR, 1.0)))
    rotary = key(Rope.DIMENSION_COUNT, head_dim)
    if rotary != head_dim:
        rope["partial_rotary_factor"] = rotary / head_dim
    config.rope_parameters = rope
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}  # innermost dim last
    embedding = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    if embedding not in shapes:
        raise ValueError(f"the file has no {embedding}")
    config.vocab_size = shapes[embedding][0]
    # llama.cpp reuses the embedding as the head when the file has none of its own
    config.tie_word_embeddings = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight" not in shapes
    if arch == "granite":  # llama.cpp: a missing (or 0) scale is no scaling, or 1/sqrt(head_dim) for attention
        defaults = {"attention_multiplier": head_dim ** -0.5}
        keys = {"embedding_multiplier": LLM.EMBEDDING_SCALE, "residual_multiplier": LLM.RESIDUAL_SCALE,
                "attention_multiplier": Attention.SCALE, "logits_scaling": LLM.LOGIT_SCALE}
        for field in GRANITE_SCALES:
            setattr(config, field, float(key(keys[field], 0.0)) or defaults.get(field, 1.0))
    return config


def read_gguf_with_config(path: str | os.PathLike, config, dtype: torch.dtype = torch.float32, reader=None):
    """A GGUF file read without transformers' GGUF loader: the model built from ``config`` (the base's) with every
    setting llama.cpp reads from the file taken from it, and the file's tensors, dequantized by ``gguf``, loaded
    under their Hugging Face names.

    Each weight's llama.cpp name comes from ``gguf``'s own name table (the same that named it when written) and
    its layout is put back as llama.cpp's converter changes it (Q/K rows interleaved for the rotary pairs of
    llama.cpp's "normal" rope). Settings: sizes, head counts and sizes, norm epsilon, rope base, linear rope
    scaling, rotary dimensions, Llama 3's rope_freqs, Granite's four multipliers, a tied head (no output.weight),
    each from the file, with llama.cpp's default where a key llama.cpp does not require is missing; the rest of
    the family's structure comes from ``config``. So a missing key, a wrong scale or a tensor left unpermuted
    gives a model that computes something else, as llama.cpp would, instead of being filled in from the base.

    Memory: the model once in ``dtype``, plus one dequantized tensor at a time.

    Args:
        path: The GGUF file (a whole model, not an adapter).
        config: The Hugging Face config of the model the file was written from.
        dtype: The model's dtype.
        reader: The file's ``gguf.GGUFReader``, when the caller has one open.

    Raises:
        ValueError: a file of another family than ``config``'s, an architecture whose settings this reader does
            not take from the file (Gemma's, GPT-2's: :func:`read_gguf_model` reads those through transformers),
            a missing key llama.cpp requires, or tensors that do not fit the model (missing, extra, misshapen).
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    gguf = require_gguf()
    reader = reader or gguf.GGUFReader(str(path))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    kind = _field(reader, gguf, gguf.Keys.General.TYPE)
    if kind not in (None, "model"):
        raise ValueError(f"{path} is a GGUF {kind} file, not a model")
    if arch in NORM_PLUS_ONE or arch == "gpt2":
        raise ValueError(f"{path} is a {arch!r} file, whose settings this reader does not take from the file; "
                         f"read it with read_gguf_model (transformers' GGUF loader)")
    if GGUF_ARCHS.get(config.model_type) != arch:
        raise ValueError(f"{path} is a llama.cpp {arch!r} file; a {config.model_type!r} model is not written as one")
    config = _llama_cpp_config(reader, gguf, config, arch)
    with no_init_weights():  # every weight is overwritten from the file below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # part of the initialisation skipped above: a tied head is the embedding itself
    names = gguf.get_tensor_name_map(model_arch(arch, gguf), config.num_hidden_layers)
    stored = {t.name: t for t in reader.tensors}
    unused = set(stored) - {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"}
    missing = []
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied head is listed once, as the embedding
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name not in stored:
                missing.append(f"{name} ({gguf_name})")
                continue
            tensor = stored[gguf_name]
            shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
            if shape != tuple(param.shape):
                raise ValueError(f"{gguf_name} is {shape} in the file, where the model's {name} is "
                                 f"{tuple(param.shape)}")
            values = torch.from_numpy(np.array(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type),
                                               dtype=np.float32).reshape(shape))  # a copy: the file is read-only
            if arch in INTERLEAVED_ROPE and ".attn_q." in gguf_name:
                values = unpermute_from_llama_cpp(values, config.num_attention_heads)
            elif arch in INTERLEAVED_ROPE and ".attn_k." in gguf_name:
                values = unpermute_from_llama_cpp(values, config.num_key_value_heads)
            param.copy_(values)
            unused.discard(gguf_name)
    if missing or unused:
        raise ValueError(f"the file's tensors do not fit a {config.model_type!r} model of its settings: "
                         + "; ".join(f"{what} {sorted(which)[:4]}" for what, which in
                                     (("missing", missing), ("not in the model", unused)) if which))
    _apply_rope_freqs(model, reader, gguf)
    return model.eval()
