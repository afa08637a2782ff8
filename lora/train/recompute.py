"""Gradient checkpointing for any ``nn.Module``: the repeated blocks are found by structure and recomputed.

Hugging Face models bring their own switch (``gradient_checkpointing_enable``), which also turns off the KV cache and
knows which layer arguments are caches; they keep it. A hand-written model (``lora.inject`` promises any
``nn.Module``) has none: here its blocks are found as what every transformer is made of, the same module class
repeated in an ``nn.ModuleList`` or ``nn.Sequential``, and each block's forward runs under
:func:`torch.utils.checkpoint.checkpoint`. Only the block's input is kept; its activations (attention, the MLP's
``4 x hidden`` intermediate, the LoRA factors' inputs) are recomputed in the backward pass, with the random state of
the forward, so dropout draws the same masks and the gradients are those of the run without it.

The forward is replaced on each block instance (an instance attribute), never by wrapping the block in another
module: module paths, and so the keys of saved adapters and checkpoints, stay as they were.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import LoRALinear, is_linear_like

_MARK = "_lora_recomputed"  # set on a block whose forward this module replaced


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks to recompute: in every ``nn.ModuleList``/``nn.Sequential``, the children whose class occurs at
    least twice there and that hold parameters, other than single linear layers; outermost first, none inside
    another (a block's own inner lists, such as per-head layers, are recomputed with it)."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()  # ids of modules within a chosen block
    for module in model.modules():  # parents before their children
        if id(module) in inside or not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        counts = Counter(type(c) for c in children)
        # a block holds layers: a single linear layer (plain or LoRA-wrapped) saves only its input, which the
        # recomputation would keep anyway, and a parameter-free activation saves next to nothing
        chosen = [c for c in children if counts[type(c)] >= 2 and not is_linear_like(c)
                  and not isinstance(c, LoRALinear) and any(True for _ in c.parameters())]
        for block in chosen:
            blocks.append(block)
            inside.update(id(m) for m in block.modules())
    return blocks


def _recomputed_forward(block: nn.Module, forward, *args, **kwargs):
    # Only where a backward pass will follow: under no_grad (evaluation, generation) there is nothing to save.
    if block.training and torch.is_grad_enabled():
        # use_reentrant=False: gradients flow even when no input requires them (a frozen embedding below the
        # first block), keyword arguments pass through, and the random state is restored for the recomputation.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def recompute_blocks(model: nn.Module) -> list[nn.Module]:
    """Recompute the activations of ``model``'s repeated blocks (:func:`repeated_blocks`) in the backward pass; in
    place, idempotent. Returns the blocks.

    Raises:
        ValueError: the model has no repeated blocks to recompute.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"gradient_checkpointing=True found no repeated blocks in {type(model).__name__} (the same "
                         f"module class at least twice in an nn.ModuleList or nn.Sequential, as transformer layers "
                         f"are kept); hold the layers in an nn.ModuleList, or set gradient_checkpointing=False")
    for block in blocks:
        if not getattr(block, _MARK, False):
            block.forward = functools.partial(_recomputed_forward, block, block.forward)
            setattr(block, _MARK, True)
    return blocks


def stop_recomputing(model: nn.Module) -> None:
    """Undo :func:`recompute_blocks`: every block runs its own forward again."""
    for module in model.modules():
        if getattr(module, _MARK, False):
            del module.forward  # the instance attribute; the class's forward shows through again
            delattr(module, _MARK)


def enable_gradient_checkpointing(model: nn.Module) -> str:
    """Recompute activations in the backward pass instead of keeping them (``TrainConfig.gradient_checkpointing``).

    A Hugging Face model that supports it uses its own switch (``activation_checkpointing_enable``, formerly
    ``gradient_checkpointing_enable``; non-reentrant, as here), which also knows its cache arguments;
    any other model has its repeated blocks recomputed (:func:`recompute_blocks`). Returns which: ``"hf"`` or
    ``"blocks"``.

    Raises:
        ValueError: the model is neither, so nothing could be recomputed.
    """
    if getattr(model, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers' newer name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            return "hf"
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            return "hf"
    recompute_blocks(model)
    return "blocks"


__all__ = ["enable_gradient_checkpointing", "recompute_blocks", "repeated_blocks", "stop_recomputing"]
