"""Direct Preference Optimization (Rafailov et al. 2023) the LoRA way: the reference model is the same model with
its adapters switched off (:func:`lora.disabled`), never a second copy of the weights.

The pairs themselves are read by :func:`lora.data.load_preferences`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """The mean sigmoid-DPO loss ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` over a batch of pairs.

    Args:
        policy_chosen_logps: Summed log-probabilities of the chosen completions under the policy, ``(B,)``.
        policy_rejected_logps: The same for the rejected completions, ``(B,)``.
        ref_chosen_logps: The chosen completions under the reference (adapters off), ``(B,)``.
        ref_rejected_logps: The rejected completions under the reference, ``(B,)``.
        beta: How far the policy may move from the reference (the KL penalty's inverse temperature).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    return -F.logsigmoid(beta * margin).mean()
