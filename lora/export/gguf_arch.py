"""llama.cpp's view of a model: which families it runs as transformers does, their settings (rope, Gemma's
norms and soft-capping, sliding windows), and the Q/K row order of its Llama architecture."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

# -- GGUF ---------------------------------------------------------------------------------------------------------
# transformers model_type -> llama.cpp architecture (a gguf.MODEL_ARCH_NAMES value): the families whose GGUF files
# tests/test_gguf_families.py reads back (through transformers' GGUF loader, or gguf_reader's own for the
# architectures that loader does not read) and tests/test_llama_cpp.py runs in llama.cpp.
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
              "gemma3_text": "gemma3", "phi3": "phi3", "olmo2": "olmo2", "granite": "granite", "gpt2": "gpt2"}
MERGED_ROUTE = "Export a merged folder instead (lora merge) and convert it with llama.cpp's convert_hf_to_gguf.py"
# llama.cpp's Gemma graphs multiply by a norm's stored weight, where Hugging Face's Gemma norms compute x * (1 + w):
# llama.cpp's converter stores w + 1 (and transformers' GGUF reader subtracts the 1 again).
NORM_PLUS_ONE = ("gemma2", "gemma3")
# The families whose llama.cpp graphs attend through a sliding window on the layers the file marks (the others attend
# over the whole context).
SLIDING_WINDOW = ("gemma2", "gemma3")
# llama.cpp rotates a head's interleaved pairs (its "normal" rope) for these; Hugging Face pairs the head's two halves,
# as llama.cpp's NEOX rope does for the other families here, so only these get their Q/K rows permuted
# (llama_model_rope_type in llama.cpp; tests/test_llama_cpp.py asks the library itself).
INTERLEAVED_ROPE = ("llama", "granite")
# llama.cpp's loaders for these require an output.weight even where the head is tied to the embedding: a tied head
# is written as a copy of it (the others fall back to token_embd when the file has no head).
HEAD_REQUIRED = ("gpt2", "olmo2")
# Granite's four multipliers: Hugging Face config field -> the gguf writer method that stores it under llama.cpp's key
# (which reads 0 or a missing key as "not set": no scaling, or 1/sqrt(head_dim) for the attention scale).
GRANITE_SCALES = {"embedding_multiplier": "add_embedding_scale", "residual_multiplier": "add_residual_scale",
                  "attention_multiplier": "add_attention_scale", "logits_scaling": "add_logit_scale"}
# Rope scalings llama.cpp can be told about, and where: "linear" through rope.scaling keys (every family), "llama3"
# through the per-frequency rope_freqs tensor, which llama.cpp reads for the llama architecture.
_ROPE_TYPES = {"default": tuple(GGUF_ARCHS.values()), "linear": tuple(GGUF_ARCHS.values()), "llama3": ("llama",)}
# llama.cpp scales Gemma's queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 27B shape (told apart by
# its layer count); it reads no query_pre_attn_scalar (its gemma2.cpp / gemma3.cpp load_arch_hparams).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def llama_cpp_query_scalar(config, arch: str) -> int:
    """What llama.cpp scales a Gemma model's queries by (1/sqrt of it), from the shape alone."""
    if config.num_hidden_layers == GEMMA_27B_LAYERS[arch]:
        return config.hidden_size // config.num_attention_heads
    return config.head_dim


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Unscaled rotary frequencies, (dim / 2,): what llama.cpp's rope_freqs divides."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def rope_settings(config) -> tuple[dict, dict | None]:
    """(rope parameters of full-attention layers, those of sliding-window layers when they differ, else None)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:  # Gemma 3: one set per layer type
        return params["full_attention"], params.get("sliding_attention")
    return params, None


def sliding_layers(config) -> list[bool]:
    """Which layers attend through a sliding window, as transformers runs the model."""
    types = getattr(config, "layer_types", None)
    if types:
        return [kind == "sliding_attention" for kind in types]
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return [bool(window)] * config.num_hidden_layers


def gguf_config(folder: Path, what: str = "GGUF export"):
    """The base's config and llama.cpp architecture, checked to be something llama.cpp runs as transformers does.

    Raises:
        ValueError: a family or setting this exporter does not write exactly; the message names the merged route.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    arch = GGUF_ARCHS.get(config.model_type)
    if arch is None:
        raise ValueError(f"{what} supports {', '.join(GGUF_ARCHS)} models; {folder} is a {config.model_type!r} "
                         f"model. {MERGED_ROUTE}")
    full, swa = rope_settings(config)
    rope_type = full.get("rope_type", "default")
    if arch not in _ROPE_TYPES.get(rope_type, ()) or (swa or {}).get("rope_type", "default") != "default":
        raise ValueError(f"{folder} uses {rope_type!r} rope scaling ({full}), which {what} does not write for a "
                         f"{config.model_type!r} model. {MERGED_ROUTE}, and check that llama.cpp supports it")
    problems = []
    if arch in GEMMA_27B_LAYERS:  # Gemma 2 and 3
        llama_cpp_scalar = llama_cpp_query_scalar(config, arch)
        if config.query_pre_attn_scalar != llama_cpp_scalar:
            problems.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar}, where llama.cpp scales queries "
                            f"by 1/sqrt({llama_cpp_scalar}) for this shape")
        if arch == "gemma2" and not config.tie_word_embeddings:
            problems.append("an output head of its own (llama.cpp's Gemma 2 always reuses the embedding)")
        if arch == "gemma2" and not (config.attn_logit_softcapping and config.final_logit_softcapping):
            problems.append("no logit soft-capping (llama.cpp's Gemma 2 always soft-caps)")
        if arch == "gemma3" and config.attn_logit_softcapping:
            problems.append("attention soft-capping (llama.cpp's Gemma 3 has none)")
    if arch == "olmo2" and config.attention_bias:
        problems.append("attention biases (llama.cpp's OLMo 2 has none)")
    if arch == "granite":
        problems += [f"{field}=0 (llama.cpp reads 0 as not set)" for field in GRANITE_SCALES
                     if not getattr(config, field)]
    if problems:
        raise ValueError(f"{folder} is a {config.model_type!r} model with {'; '.join(problems)}, so llama.cpp "
                         f"would compute something else. {MERGED_ROUTE}")
    if arch not in SLIDING_WINDOW and any(sliding_layers(config)) \
            and config.sliding_window < config.max_position_embeddings:
        warnings.warn(f"{folder} attends through a {config.sliding_window}-token sliding window; llama.cpp's "
                      f"{arch!r} graph attends over the whole context (as after its own converter), so outputs agree "
                      f"only on prompts up to that length")
    return config, arch


def model_arch(arch: str, gguf):
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


def attention_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
