"""Direct Preference Optimization (Rafailov et al. 2023) the LoRA way: the reference model is the same model with
its adapters switched off (:func:`lora.disabled`), never a second copy of the weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .data import IGNORE, DataStats, read_jsonl, tokenize_chat


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


def _completion(tokenizer, prompt: str, answer: str, max_length: int | None) -> dict | None:
    """The prompt (as a user turn) and one answer, tokenized with the loss on the answer only; None if cut away."""
    ids, labels = tokenize_chat(tokenizer, [{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": answer}])
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    targets = labels[1:] + [IGNORE]  # position t predicts token t+1
    return {"input_ids": ids, "targets": targets} if any(t != IGNORE for t in targets) else None


def load_preferences(path: str | Path, tokenizer, max_length: int | None = None) -> tuple[list[dict], DataStats]:
    """Read preference pairs from JSONL (``{"prompt", "chosen", "rejected"}`` per line) and tokenize them.

    Returns:
        ``(pairs, stats)``: each pair is ``{"chosen": example, "rejected": example}``, an example being
        ``input_ids`` + ``targets`` with the loss on the answer; a pair either of whose answers is cut away by
        ``max_length`` is dropped and counted.

    Raises:
        ValueError: ``file:line`` and what is wrong there, or no pair left.
    """
    _, records = read_jsonl(path, format="preference")
    pairs, stats = [], DataStats()
    for record in records:
        stats.examples += 1
        chosen = _completion(tokenizer, record["prompt"], record["chosen"], max_length)
        rejected = _completion(tokenizer, record["prompt"], record["rejected"], max_length)
        if chosen is None or rejected is None:
            stats.dropped += 1
            continue
        pairs.append({"chosen": chosen, "rejected": rejected})
        for example in (chosen, rejected):
            stats.tokens += len(example["input_ids"])
            stats.target_tokens += sum(t != IGNORE for t in example["targets"])
    if not pairs:
        raise ValueError(f"{path} holds no usable preference pair ({stats.describe()}); check the file, or raise "
                         f"max_length")
    return pairs, stats


__all__ = ["dpo_loss", "load_preferences"]
