"""New tokens (a chat template's markers, a task's tags): add them to the tokenizer and give each a row in the model's
input embedding and output head, initialised to the mean of the existing rows.

Train the new rows with ``LoraConfig(trainable_tokens=ids)`` (only those rows, PEFT's ``trainable_token_indices``).
The model remembers what was added; :func:`lora.save_adapter` records it in ``adapter_config.json`` (``added_tokens``),
so that loading the adapter on the original base is refused with what to do, and ``lora merge`` grows the base and its
tokenizer in the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .inject import adapters_of

ADDED_TOKENS_KEY = "added_tokens"  # in adapter_config.json: what add_tokens did to the base the adapter was trained on


def added_tokens(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`add_tokens` did to ``model``: ``{"tokens", "ids", "special", "base_vocab_size", "vocab_size"}``, or
    None if it was never called on it."""
    return model.__dict__.get("_lora_added_tokens")


def _vocabulary_modules(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    if not isinstance(embedding, nn.Embedding) or not callable(getattr(model, "resize_token_embeddings", None)):
        raise ValueError(f"add_tokens needs a Hugging Face model (get_input_embeddings, resize_token_embeddings), got "
                         f"{type(model).__name__}; grow its embedding and head yourself and pass "
                         f"LoraConfig(trainable_tokens={{'<embedding module>': ids}})")
    get_out = getattr(model, "get_output_embeddings", None)
    return embedding, get_out() if callable(get_out) else None


@torch.no_grad()
def _fill_mean(weight: torch.Tensor, old_rows: int) -> None:
    """Rows ``old_rows:`` of ``weight`` := the mean of the rows before them (fp32, one cast): a new token starts as
    the average token, so the first logits and outputs barely move (Hewitt 2021, "Initializing new word embeddings")."""
    weight[old_rows:] = weight[:old_rows].float().mean(dim=0).to(weight.dtype)


def add_tokens(model: nn.Module, tokenizer, tokens: list[str] | tuple[str, ...], special: bool = True) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` and grow the model's input embedding and output head (tied or not) to match.

    Each new row, in the embedding and in an untied head alike, starts as the mean of the rows that were there
    before. A token the tokenizer already knows keeps its id and its row. Call it before :func:`lora.inject`, then
    train the new rows with ``LoraConfig(trainable_tokens=ids)``.

    Args:
        model: A Hugging Face model (it has ``resize_token_embeddings``), without adapters yet.
        tokenizer: Its tokenizer; changed in place.
        tokens: The tokens, e.g. ``["<|im_start|>", "<|im_end|>"]``.
        special: Add them as special tokens (never split, dropped by ``decode(..., skip_special_tokens=True)``).

    Returns:
        The id of each token, in the order given.

    Raises:
        ValueError: no tokens, a token that is not a non-empty string, a model with adapters, or one that cannot be
            resized.
    """
    if isinstance(tokens, str) or not isinstance(tokens, (list, tuple)) or not tokens \
            or not all(isinstance(t, str) and t for t in tokens):
        raise ValueError(f"add_tokens takes a non-empty list of tokens (non-empty strings), got {tokens!r}")
    if adapters_of(model):
        raise ValueError(f"the model already has adapters {sorted(adapters_of(model))}, made for its current "
                         f"vocabulary; add tokens first, then lora.inject")
    embedding, head = _vocabulary_modules(model)
    old_rows = embedding.num_embeddings
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=special)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    size = len(tokenizer)
    if size > old_rows:
        tied = head is not None and head.weight is embedding.weight
        old_head_rows = head.weight.shape[0] if head is not None else None
        # transformers grows the matrices (and re-ties them, and sets config.vocab_size); the rows it adds are then
        # set here, so they do not depend on its random or covariance-sampled initialisation
        model.resize_token_embeddings(size, mean_resizing=False)
        embedding, head = _vocabulary_modules(model)
        _fill_mean(embedding.weight, old_rows)
        if head is not None and not tied and head.weight is not embedding.weight:
            _fill_mean(head.weight, old_head_rows)
            if getattr(head, "bias", None) is not None:
                _fill_mean(head.bias.unsqueeze(1), old_head_rows)
    record = model.__dict__.setdefault("_lora_added_tokens", {"tokens": [], "ids": [], "special": special,
                                                              "base_vocab_size": old_rows})
    for token in new:
        record["tokens"].append(token)
        record["ids"].append(tokenizer.convert_tokens_to_ids(token))
    record["vocab_size"] = max(size, old_rows)
    return ids


def read_added_tokens(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``added_tokens`` record of an adapter folder's config, or None."""
    config = Path(adapter_dir) / "adapter_config.json"
    try:
        record = json.loads(config.read_text()).get(ADDED_TOKENS_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) and record.get("tokens") else None


def add_tokens_like(model: nn.Module, tokenizer, record: dict[str, Any]) -> list[int]:
    """Add the tokens an adapter's ``added_tokens`` record names to a fresh base and its tokenizer, as at training.

    Raises:
        ValueError: the tokenizer gives them other ids than they had when the adapter was trained (another
            tokenizer), or the model's vocabulary had another size.
    """
    rows = model.get_input_embeddings().num_embeddings
    if rows != record["base_vocab_size"]:
        raise ValueError(f"the adapter was trained on a base whose vocabulary had {record['base_vocab_size']} rows "
                         f"before tokens were added; this one has {rows}")
    ids = add_tokens(model, tokenizer, list(record["tokens"]), special=bool(record.get("special", True)))
    if ids != list(record["ids"]):
        raise ValueError(f"this tokenizer gives the added tokens {record['tokens']} the ids {ids}, but they had "
                         f"{record['ids']} when the adapter was trained: it is not the tokenizer of that base")
    return ids


__all__ = ["add_tokens", "added_tokens", "read_added_tokens", "add_tokens_like", "ADDED_TOKENS_KEY"]
