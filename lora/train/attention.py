"""Attention for packed rows: each example attends within itself, computed one example at a time.

A packed row holds several examples whose positions restart at 0. Hugging Face models keep them apart with a
block-diagonal ``(T, T)`` mask, and SDPA then computes the whole masked product: for 512-token rows of ~90-token
examples, ~80% of the attention work (a fifth of a training step on SmolLM2) goes to scores that are masked out.
Here each example's span runs as its own causal SDPA call.

It is an attention implementation registered with transformers (:data:`NAME`); it takes this route only inside
:func:`packed_rows`, which the trainer enters for packed batches, and otherwise calls SDPA exactly as the model
would have. Anything this route does not model (soft-capping, attention sinks, position biases, a sliding window
shorter than an example, a KV cache) goes to SDPA as well. The trainer's packing probe compares packed and padded
losses with this implementation in place, so a model it does not suit trains on padded rows instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

NAME = "lora_packed_sdpa"
# Process-wide, not a context variable: on a GPU, autograd recomputes checkpointed layers in its own threads,
# and the recomputation must take the same route as the forward.
_packed = [False]


@contextlib.contextmanager
def packed_rows(active: bool = True) -> Iterator[None]:
    """Within this block, the batches a model sees are packed rows (positions restart at 0 for every example, pad
    tails included, and no padding mask): attention runs per example, and the model's block-diagonal mask is
    ignored."""
    before, _packed[0] = _packed[0], active
    try:
        yield
    finally:
        _packed[0] = before


def _spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` of every run of positions that starts at 0."""
    rows, width = position_ids.shape
    starts = (position_ids == 0).nonzero().tolist()
    spans: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
    for (row, start), (next_row, next_start) in zip(starts, starts[1:] + [[rows, 0]]):
        spans[row].append((start, next_start if next_row == row else width))
    return spans


def _unsupported(module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool:
    """What the per-example route does not reproduce: hand those calls to SDPA with the model's own mask."""
    if not _packed[0] or kwargs.get("position_ids") is None or query.shape[2] != key.shape[2]:
        return True
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        return True
    return any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias"))


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``(B, heads, T, D)``, ``key``/``value``
    ``(B, kv_heads, T, D)``; returns ``((B, T, heads, D), None)``."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    spans = None if _unsupported(module, query, key, kwargs) else _spans(position_ids.reshape(-1, query.shape[2]))
    window = kwargs.get("sliding_window")
    if spans is None or len(spans) != query.shape[0] or any(
            not row or row[0][0] != 0 or (window and max(e - s for s, e in row) > window) for row in spans):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    # unbind and split, not slicing: their backward joins the pieces' gradients in one cat/stack, where each
    # slice's backward would fill a zero tensor of the whole row
    for row, q, k, v in zip(spans, query.unbind(0), key.unbind(0), value.unbind(0)):
        lengths = [e - s for s, e in row]
        parts = [torch.nn.functional.scaled_dot_product_attention(
            qi[None], ki[None], vi[None], dropout_p=dropout, scale=scaling, is_causal=True)[0]
            for qi, ki, vi in zip(q.split(lengths, dim=1), k.split(lengths, dim=1), v.split(lengths, dim=1))]
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    out = torch.stack(rows)  # (B, heads, T, D)
    return out.transpose(1, 2).contiguous(), None


def use_packed_attention(model: nn.Module) -> bool:
    """Route ``model``'s attention through :func:`packed_attention` if it uses SDPA; whether it now does.

    Outside :func:`packed_rows` the model computes exactly what SDPA computed before (the same function is called).
    """
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == NAME:
        return True
    if implementation != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False  # eager (soft-capping models), flash-attention kernels: left as the model chose
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the model's own block-diagonal mask, for the calls SDPA takes
    model.set_attn_implementation(NAME)
    return getattr(model.config, "_attn_implementation", None) == NAME


__all__ = ["NAME", "packed_attention", "packed_rows", "use_packed_attention"]
