"""Evaluation of a training objective on held-out batches: loss and perplexity, accuracy for classification, and
DPO's preference accuracy and reward margin for preference pairs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..data import IGNORE
from .dpo import dpo_loss


@torch.no_grad()
def evaluate(objective: Any, batches: Iterable[dict[str, torch.Tensor]],
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """Held-out metrics of ``objective`` (the trainer's :class:`lora.train.objective.BatchLoss`) over ``batches``.

    The model runs in eval mode (no dropout) and is put back in the mode it was in.

    Args:
        objective: The summed-loss module; its ``task`` says which metrics apply and ``dpo_beta`` DPO's beta.
        batches: Collated batches of the task's kind.
        autocast: The precision context (``accelerator.autocast``).

    Returns:
        ``eval_loss`` (mean per target token, example or pair) and ``perplexity`` (capped at exp(50)); plus
        ``accuracy`` for classification; ``preference_accuracy`` (the share of pairs whose chosen completion has
        the higher log-probability) and ``reward_margin`` (DPO's implicit reward, beta times the log-ratio to the
        reference, of chosen minus rejected) for preference pairs, without perplexity. Empty for no batches.
    """
    model, task = objective.model, objective.task
    total, count, correct, margin, seen = 0.0, 0, 0, 0.0, False
    was_training = model.training
    model.eval()
    try:
        with autocast():
            for batch in batches:
                seen = True
                if task == "classification":
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    total += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
                    correct += int((logits.argmax(-1) == batch["labels"]).sum())
                    count += len(batch["labels"])
                elif task == "preference":
                    policy, reference = objective.pair_logps(batch)
                    n = len(policy) // 2
                    rewards = objective.dpo_beta * (policy - reference)  # (2n,)
                    total += float(dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:],
                                            objective.dpo_beta)) * n
                    correct += int((policy[:n] > policy[n:]).sum())
                    margin += float((rewards[:n] - rewards[n:]).sum())
                    count += n
                else:
                    total += float(objective.summed_loss(batch))
                    count += int((batch["targets"] != IGNORE).sum())
    finally:
        model.train(was_training)
    if not seen:
        return {}
    count = max(count, 1)
    result = {"eval_loss": total / count}
    if task == "preference":
        result["preference_accuracy"] = correct / count
        result["reward_margin"] = margin / count
        return result
    result["perplexity"] = math.exp(min(result["eval_loss"], 50.0))  # capped so a diverged model cannot overflow
    if task == "classification":
        result["accuracy"] = correct / count
    return result


__all__ = ["evaluate"]
