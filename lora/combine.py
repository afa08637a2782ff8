"""Adapter algebra: a new adapter whose weight delta is a weighted sum of existing adapters' deltas.

Every input's scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) and weight is folded into its B, so inputs of
different ranks, alphas and scalings combine exactly; the result has scale 1 (``alpha = r``) and is a plain LoRA
adapter that saves and loads in PEFT. (PEFT's own ``add_weighted_adapter`` gets rsLoRA and DoRA wrong, peft #3761.)
"""

from __future__ import annotations

import torch
from torch import nn

from .config import RESIDUAL_INITS, LoraConfig
from .inject import adapters_of, inject, lora_layers
from .layers import LoRALinear

METHODS = ("cat", "svd")


def combine_adapters(model: nn.Module, weights: dict[str, float], name: str, method: str = "cat",
                     rank: int | None = None) -> dict[str, float]:
    """Add adapter ``name`` whose update is ``sum(weight * delta(adapter))`` over ``weights``.

    Args:
        model: A model holding the input adapters.
        weights: Input adapter name -> weight (negative weights subtract, e.g. ``{"a": 0.7, "b": -0.3}``).
        name: The new adapter's name; it becomes the active adapter, as after :func:`lora.inject`.
        method: ``"cat"``: exact, A and B concatenated (rank = sum of the input ranks). ``"svd"``: the best
            rank-``rank`` approximation of the summed delta in Frobenius norm (Eckart-Young), per layer.
        rank: The rank for ``"svd"`` (default: the largest input rank); must be None for ``"cat"``.

    Returns:
        Each combined layer's relative error ``||sum - result||_F / ||sum||_F`` (0.0 everywhere for ``"cat"``).

    Raises:
        ValueError: unknown or DoRA inputs, inputs with ``modules_to_save`` or trained biases (not a low-rank
            delta) or on parameters, embeddings or vocabulary rows, a bad method or rank, or a name already taken.
    """
    known = adapters_of(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not weights:
        raise ValueError("weights is empty; give at least one adapter, e.g. {'a': 1.0}")
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(known)}")
    for adapter in weights:
        cfg = known[adapter].config
        if cfg.dora:
            raise ValueError(f"adapter {adapter!r} uses DoRA: its update depends on the base weight's norm, so it is "
                             f"not a low-rank delta that can be summed; merge it instead")
        if cfg.modules_to_save or cfg.bias != "none":
            raise ValueError(f"adapter {adapter!r} also trains modules_to_save or biases in full, which a "
                             f"combination of low-rank deltas cannot hold; combine adapters without them")
        info = known[adapter]
        embeddings = [p for p, layer in lora_layers(model) if not isinstance(layer, LoRALinear) and adapter in
                      layer.adapters]
        if info.parameter_paths or info.token_paths or embeddings:
            what = ("parameters (target_parameters)" if info.parameter_paths else
                    "vocabulary rows (trainable_tokens)" if info.token_paths else f"an embedding ({embeddings[0]})")
            raise ValueError(f"adapter {adapter!r} adapts {what}, which combine_adapters does not sum (it sums "
                             f"linear layers' A/B); combine adapters on linear layers only")
    if method == "cat" and rank is not None:
        raise ValueError("rank is for method='svd'; method='cat' keeps every input's rank (their sum)")
    if method == "svd" and rank is None:
        rank = max(known[a].config.r for a in weights)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")

    layers = {p: layer for p, layer in lora_layers(model) if isinstance(layer, LoRALinear)}  # the others: refused
    paths = [p for p, layer in layers.items() if any(a in layer.lora_A for a in weights)]
    factors = {path: _weighted_factors(layers[path], weights, known) for path in paths}  # (A, B), scales folded
    new_rank = rank if method == "svd" else sum(_delta_rank(known[a].config) for a in weights)
    errors: dict[str, float] = {}
    if method == "svd":
        for path, (A, B) in factors.items():
            factors[path], errors[path] = _best_rank(A, B, rank)
    else:
        errors = dict.fromkeys(paths, 0.0)
    inject(model, LoraConfig(r=new_rank, alpha=new_rank, targets=tuple(paths)), adapter=name)  # scale 1
    with torch.no_grad():
        for path, (A, B) in factors.items():
            layers[path].lora_A[name].weight.copy_(A)
            layers[path].lora_B[name].weight.copy_(B)
    return errors


def _delta_rank(cfg: LoraConfig) -> int:
    """The rank of an adapter's update over the base: a PiSSA/OLoRA adapter's is ``B A - B0 A0``, rank 2r."""
    return 2 * cfg.r if cfg.init in RESIDUAL_INITS else cfg.r


def _weighted_factors(layer, weights: dict[str, float], known) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (sum of ranks x in) and ``B`` (out x sum of ranks) with ``B @ A == sum(weight * delta_i)``, in fp32,
    where ``delta_i`` is ``scale B_i A_i``, less ``scale B0_i A0_i`` for a PiSSA/OLoRA adapter (it started there).

    An input that does not wrap this layer contributes zero rows, so every layer has the same rank.
    """
    As, Bs = [], []
    for adapter, weight in weights.items():
        if adapter in layer.lora_A:
            scale = weight * layer.scaling[adapter]
            As.append(layer.lora_A[adapter].weight.detach().float())
            Bs.append(layer.lora_B[adapter].weight.detach().float() * scale)
            if adapter in layer.initial_factors:
                A0, B0 = layer.initial_factors[adapter]
                As.append(A0.float().to(As[-1].device))
                Bs.append(B0.float().to(Bs[-1].device) * -scale)
        else:
            r = _delta_rank(known[adapter].config)
            As.append(torch.zeros(r, layer.in_features))
            Bs.append(torch.zeros(layer.out_features, r))
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _best_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """The best rank-``rank`` factors of ``B @ A`` (Eckart-Young) and their relative Frobenius error.

    ``B @ A`` is never formed at full size: with ``B = Qb Rb`` and ``A^T = Qa Ra``, ``B A = Qb (Rb Ra^T) Qa^T``,
    so one SVD of the small ``R x R`` core gives the singular values and vectors.
    """
    Qb, Rb = torch.linalg.qr(B.double())  # (out, R), (R, R)
    Qa, Ra = torch.linalg.qr(A.double().T)  # (in, R), (R, R)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # core (R, R)
    k = min(rank, S.numel())
    total = float(S.pow(2).sum())
    error = (float(S[k:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    new_B = torch.zeros(B.shape[0], rank, dtype=torch.float64)
    new_A = torch.zeros(rank, A.shape[1], dtype=torch.float64)
    new_B[:, :k] = (Qb @ U[:, :k]) * S[:k]  # (out, k)
    new_A[:k] = (Qa @ Vh[:k].T).T  # (k, in)
    return (new_A.float(), new_B.float()), error


__all__ = ["combine_adapters"]
