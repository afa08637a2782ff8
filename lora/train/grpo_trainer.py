"""The Trainer on a reward: :class:`GRPOTrainer` runs the same loop (accumulation, clipping, schedule, checkpoints
and exact resume, Ctrl-C, the NaN stop, several processes, metrics and the plot), with each step's micro-batches
sampled and scored by :class:`lora.train.rollouts.RolloutPlan` instead of read from fixed rows, and the GRPO loss of
:mod:`lora.train.grpo`. Evaluation answers held-out prompts greedily and scores them with the same rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..data import IGNORE
from ..generate import _is_hf, pad_left, sample_tokens
from ..inject import adapters_of
from . import budget
from .config import TrainConfig
from .grpo import GRPOConfig
from .rewards import RewardFunction, Rewards
from .rollouts import RolloutPlan, completion_lengths, decide_together
from .trainer import Trainer


class GRPOTrainer(Trainer):
    """Fine-tunes the adapter of ``model`` to raise the reward of its sampled answers (GRPO).

    Args:
        model: A Hugging Face causal LM with an adapter (:func:`lora.inject`); the reference of the KL penalty is
            this model with its adapters off, so no second copy of the weights is made.
        config: The :class:`TrainConfig`: learning rate, steps, schedule, checkpoints. ``batch_size`` counts
            prompts per micro-batch (each brings ``group_size`` completions); ``seq_len`` must hold the longest
            prompt plus ``max_new_tokens``.
        grpo: The :class:`GRPOConfig`.
        prompts: Training prompts from :func:`lora.data.load_prompts`.
        rewards: Reward functions (callables or names, see :mod:`lora.train.rewards`), weighted by
            ``grpo.reward_weights``; or a :class:`Rewards`.
        tokenizer: The model's tokenizer (decodes completions; its EOS ends them).
        eval_prompts: Held-out prompts: :meth:`evaluate` answers them greedily and reports ``eval_reward`` (the
            mean weighted reward), ``eval_accuracy`` (the share the first reward function scores 1 or more: right,
            for the built-in checks) and ``eval_reward/<function>``.
        eval_batch_size: Held-out prompts answered per batch.
        adapter: The adapter saved in checkpoints.
        callbacks: As for :class:`Trainer`; ``metrics`` holds the step's rewards too.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, grpo: GRPOConfig, prompts: list[dict],
                 rewards: Sequence[RewardFunction | str] | Rewards, tokenizer, eval_prompts: list[dict] | None = None,
                 eval_batch_size: int = 32, adapter: str = "default",
                 callbacks: list[Callable[[Trainer, int, dict], None]] | None = None):
        if not _is_hf(model):
            raise ValueError(f"GRPO samples with the KV cache and left-padded prompts, which needs a Hugging Face "
                             f"causal LM; {type(model).__name__} is not one")
        if not prompts:
            raise ValueError("no training prompts; load them with lora.data.load_prompts")
        longest = max(len(p["input_ids"]) for p in prompts)
        if longest + grpo.max_new_tokens > config.seq_len:
            raise ValueError(f"the longest prompt has {longest} tokens, and with max_new_tokens="
                             f"{grpo.max_new_tokens} a completion can reach {longest + grpo.max_new_tokens} tokens, "
                             f"more than seq_len={config.seq_len}; raise seq_len, or load the prompts with "
                             f"max_length=seq_len - max_new_tokens")
        if config.validation_split:
            raise ValueError("validation_split measures a loss on held-out answers, which GRPO does not have; set "
                             "validation_split=0 (held-out prompts are scored by evaluate, eval_every=N)")
        if adapter in adapters_of(model) and grpo.beta and adapters_of(model)[adapter].config.bias != "none":
            raise ValueError(f"the KL penalty compares against the base model (adapters switched off), and bias="
                             f"{adapters_of(model)[adapter].config.bias!r} trains the base's own biases, so the "
                             f"reference would drift as training goes; inject the adapter with bias='none', or set "
                             f"beta=0")
        self.rewards = rewards if isinstance(rewards, Rewards) else Rewards(rewards, grpo.reward_weights)
        self.grpo = grpo
        self.eval_prompts = eval_prompts
        self.eval_batch_size = eval_batch_size
        self.eval_completions: list[str] = []
        # The base trainer probes the model (the loss shortcut) on rows; the prompts, as rows, serve. GRPO's rows
        # are sampled each step, so they are never packed.
        rows = [{"input_ids": p["input_ids"], "targets": p["input_ids"][1:] + [IGNORE]} for p in prompts]
        # min_steps is applied below, on the plan's steps: the base trainer would count prompts as rows and shrink
        # grad_accum for them
        super().__init__(model, config.replace(packing=False, min_steps=0), rows, tokenizer=tokenizer,
                         adapter=adapter, callbacks=callbacks)
        if self.sharded:
            raise ValueError("GRPO samples outside the wrapped forward, which FSDP and DeepSpeed ZeRO-3 need for "
                             "their sharded weights; train with DDP (or ZeRO-2)")
        self.cfg = self.cfg.replace(min_steps=config.min_steps)  # the run's own, in checkpoints and model cards
        self.task = self.objective.task = "grpo"
        self.objective.grpo = grpo
        self.plan = RolloutPlan(self, prompts, self.rewards, grpo, tokenizer)
        self.total_steps = budget.total_steps(self.plan.steps_per_epoch, config.epochs, config.max_steps,
                                              config.min_steps)

    @torch.no_grad()
    def evaluate(self, data: Any = None) -> dict[str, float]:
        """Greedy answers to the held-out prompts (``data``: other prompts), scored by the reward functions:
        ``eval_reward``, ``eval_accuracy`` and ``eval_reward/<function>`` (see the class); the answers are kept in
        ``eval_completions``. Every process answers all of them, as the base trainer's exact match does."""
        prompts = self.eval_prompts if data is None else data
        if not prompts:
            return {}
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["input_ids"]))
        texts: list[str] = [""] * len(prompts)
        device = self.accelerator.device
        for start in range(0, len(order), self.eval_batch_size):
            rows = order[start:start + self.eval_batch_size]
            ids, mask = pad_left([prompts[i]["input_ids"] for i in rows], self.pad_id, device)
            with self.accelerator.autocast():
                tokens = sample_tokens(self.model, ids, mask, self.grpo.max_new_tokens, temperature=0,
                                       eos_token_id=self.tokenizer.eos_token_id)
            lengths = completion_lengths(tokens, self.tokenizer.eos_token_id)
            decoded = self.tokenizer.batch_decode([t[:n].tolist() for t, n in zip(tokens, lengths)],
                                                  skip_special_tokens=True)
            for i, text in zip(rows, decoded):
                texts[i] = text
        columns = {k: [p["columns"][k] for p in prompts] for k in prompts[0]["columns"]}
        error, (totals, by_name) = None, ([], {})
        try:
            totals, by_name = self.rewards.score([p["prompt"] for p in prompts], texts, columns)
        except ValueError as e:
            error = e
        decide_together(self, error)
        self.eval_completions = texts
        first = by_name[self.rewards.names[0]]
        return {"eval_reward": sum(totals) / len(totals), "eval_accuracy": sum(s >= 1 for s in first) / len(first),
                **{f"eval_reward/{name}": sum(v) / len(v) for name, v in by_name.items()}}


__all__ = ["GRPOTrainer"]
