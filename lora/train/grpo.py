"""GRPO (Shao et al. 2024, DeepSeekMath) the LoRA way: group-relative advantages, the clipped policy-gradient
objective, and a KL penalty to the reference, which is the same model with its adapters off (:func:`lora.disabled`),
never a second copy of the weights.

For each prompt a group of ``G`` completions is sampled from the current policy and scored; a completion's advantage
is its reward minus the group's mean, divided by the group's standard deviation (``scale_rewards``). Per completion
token ``t`` of completion ``i``, with the ratio ``r = pi(t) / pi_old(t)``::

    loss_it = -min(r * A_i, clip(r, 1 - epsilon, 1 + epsilon) * A_i) + beta * (exp(ref - logp) - (ref - logp) - 1)

the last term being the k3 estimator of KL(pi || ref) (Schulman 2020), unbiased and never negative. ``pi_old`` is the
policy that sampled the completions: with one update per batch of generations (``grpo_iterations=1``) it is the
policy itself, detached, so ``r = 1`` and only its gradient acts.

Normalisation (``loss_normalization``): ``"token"`` (the default) sums ``loss_it`` over every completion token of the
optimizer step and divides by their count, as DAPO (Yu et al. 2025) does; ``"sequence"`` averages each completion's
tokens first and then the completions, as the GRPO paper writes it. Per-sequence averaging gives each token of a long
completion less weight than a token of a short one, so a long wrong answer is penalised less per token than a short
one, and a short right answer rewarded more: the length bias Dr. GRPO (Liu et al. 2025) points out. Per-token weighs
every sampled token alike.

The sampling and scoring of each step's groups is :mod:`lora.train.rollouts`; the trainer that runs it,
:mod:`lora.train.grpo_trainer`; reward functions, :mod:`lora.train.rewards`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..generate import cache_argument

NORMALIZATIONS = ("token", "sequence")


@dataclass(frozen=True)
class GRPOConfig:
    """How GRPO samples, scores and weighs; the learning rate, steps and batch shape are :class:`TrainConfig`'s
    (``batch_size``: prompts per micro-batch, each bringing ``group_size`` completions).

    Args:
        group_size: Completions sampled per prompt (G); at least 2, or no completion has a group to be compared
            with.
        max_new_tokens: Longest completion in tokens; one cut there is scored as it stands.
        temperature: Sampling temperature (> 0: at 0 every completion of a group would be the same). The policy's
            log-probabilities in the loss are taken at the same temperature.
        top_k: Sample among the k most likely tokens (0: all).
        top_p: Sample within the nucleus of probability mass ``top_p`` (1.0: all).
        beta: Weight of the KL penalty to the reference (the model with its adapters off); 0 drops the penalty
            and the reference pass with it.
        epsilon: The ratio's clipping range, ``[1 - epsilon, 1 + epsilon]``.
        grpo_iterations: Optimizer steps taken on each batch of generations (PPO's epochs, mu); past the first the
            log-probabilities of the policy that sampled them are kept for the ratio.
        scale_rewards: Divide each advantage by its group's reward standard deviation (False: Dr. GRPO's
            advantages, reward minus the group mean).
        loss_normalization: ``"token"`` (every completion token of the step weighs the same, DAPO) or
            ``"sequence"`` (each completion's mean, then the mean over completions, the GRPO paper); see the
            module's docstring.
        reward_weights: One weight per reward function (None: all 1).
    """

    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    grpo_iterations: int = 1
    scale_rewards: bool = True
    loss_normalization: str = "token"
    reward_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        def fail(field: str, allowed: str) -> None:
            raise ValueError(f"{type(self).__name__}.{field} must be {allowed}, got {getattr(self, field)!r}")

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for field, low in (("group_size", 2), ("max_new_tokens", 1), ("grpo_iterations", 1)):
            if type(getattr(self, field)) is not int or getattr(self, field) < low:
                fail(field, f"an integer >= {low}" + (" (a group needs two completions to compare)"
                                                      if field == "group_size" else ""))
        if type(self.top_k) is not int or self.top_k < 0:
            fail("top_k", "an integer >= 0 (0: no limit)")
        if not number(self.temperature) or self.temperature <= 0:
            fail("temperature", "> 0 (at 0 every completion of a group is the same, and none has an advantage)")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]")
        if not number(self.beta) or self.beta < 0:
            fail("beta", ">= 0 (0: no KL penalty and no reference pass)")
        if not number(self.epsilon) or not 0 < self.epsilon < 1:
            fail("epsilon", "in (0, 1)")
        if not isinstance(self.scale_rewards, bool):
            fail("scale_rewards", "true or false")
        if self.loss_normalization not in NORMALIZATIONS:
            fail("loss_normalization", f"one of {NORMALIZATIONS}")
        if self.reward_weights is not None:
            weights = self.reward_weights
            if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or not all(
                    number(w) for w in weights):
                fail("reward_weights", "None or a list of finite numbers, one per reward function")
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in weights))  # frozen: set once here

    def replace(self, **changes: Any) -> "GRPOConfig":
        return dataclasses.replace(self, **changes)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Each reward minus its group's mean, divided by the group's standard deviation (plus 1e-4) if ``scale``.

    Args:
        rewards: ``(groups * group_size,)``, a group's completions side by side.
        group_size: G.
        scale: Divide by the standard deviation (the unbiased one, as TRL's ``torch.std``).

    Returns:
        ``(groups * group_size,)`` advantages; 0 for every completion of a group whose rewards are all equal.
    """
    grouped = rewards.view(-1, group_size).double()  # (groups, G)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(1, keepdim=True) + 1e-4)
    return advantages.view(-1).to(rewards.dtype)


def token_losses(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
                 advantages: torch.Tensor, epsilon: float, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss at every completion token, ``(rows, T)``, and what it is made of (``kl``, ``clipped``).

    Args:
        logps: ``(rows, T)`` log-probabilities of the sampled tokens under the policy (with gradients).
        old_logps: The same under the policy that sampled them (None: the policy itself, detached).
        ref_logps: The same under the reference (None with ``beta`` 0).
        advantages: ``(rows,)``.
        epsilon: Clipping range of the ratio.
        beta: KL weight.
    """
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)  # (rows, T)
    adv = advantages[:, None].to(logps.dtype)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon)
    loss = -torch.minimum(ratio * adv, clipped_ratio * adv)
    # where the clipped term is the smaller, the ratio carries no gradient: that token is "clipped"
    parts = {"clipped": ((clipped_ratio * adv) < (ratio * adv)).detach()}
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities (ref_logps)")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # k3: >= 0, and unbiased for KL(pi || ref) under samples of pi
        loss = loss + beta * kl
        parts["kl"] = kl.detach()
    return loss, parts


def reduce_losses(losses: torch.Tensor, mask: torch.Tensor, normalization: str) -> torch.Tensor:
    """The summed loss of a micro-batch, to be divided by its terms (:func:`loss_terms`) over the whole step."""
    mask = mask.to(losses.dtype)
    if normalization == "token":
        return (losses * mask).sum()
    return ((losses * mask).sum(1) / mask.sum(1).clamp_min(1)).sum()  # each completion's mean, summed


def loss_terms(mask: torch.Tensor, normalization: str) -> int:
    """What the summed loss is divided by: completion tokens (``"token"``) or completions (``"sequence"``)."""
    return int(mask.sum()) if normalization == "token" else len(mask)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.2, beta: float = 0.04,
              normalization: str = "token") -> torch.Tensor:
    """The GRPO loss of a batch of completions (see the module's docstring for the formula).

    Args:
        logps: ``(rows, T)`` log-probabilities of the completion tokens under the policy.
        old_logps: Under the policy that sampled them (None: ``logps`` detached, one update per generation).
        ref_logps: Under the reference (the adapters off); may be None when ``beta`` is 0.
        advantages: ``(rows,)``, from :func:`group_advantages`.
        mask: ``(rows, T)``, 1 on completion tokens (up to and with the end-of-sequence token), 0 after.
        epsilon: Clipping range.
        beta: KL weight.
        normalization: ``"token"`` or ``"sequence"``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    losses, _ = token_losses(logps, old_logps, ref_logps, advantages, epsilon, beta)
    return reduce_losses(losses, mask, normalization) / max(loss_terms(mask, normalization), 1)


# -- the policy's log-probabilities of sampled completions ------------------------------------------------------------
def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def completion_logps(model: nn.Module, parts: tuple[nn.Module, nn.Module] | None, batch: dict[str, torch.Tensor],
                     temperature: float = 1.0, chunk: int = 1024, shared_prompt: bool = True) -> torch.Tensor:
    """``(rows, T)`` log-probabilities of each row's completion tokens (0 where ``completion_mask`` is 0).

    Args:
        model: A Hugging Face causal LM.
        parts: ``(decoder, head)`` when the head of the decoder's hidden states gives the model's logits (the
            trainer's probe decides); the head then runs on completion positions only. None: the model's logits.
        batch: ``prompt_ids``/``prompt_mask`` ``(P, Tp)`` left-padded, ``completion_ids``/``completion_mask``
            ``(rows, T)``, ``prompt_index`` ``(rows,)``: the prompt each row answers.
        temperature: Logits are divided by it, as when sampling.
        chunk: Positions per head-and-softmax chunk (the ``(chunk, vocab)`` logits exist one chunk at a time).
        shared_prompt: Run each prompt once and give its rows copies of its KV cache (gradients flow back through
            them), instead of the whole prompt again in every row. False joins prompt and completion in each row
            (what gradient checkpointing needs, where the decoder keeps no cache).
    """
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    ids, mask, index = batch["completion_ids"], batch["completion_mask"], batch["prompt_index"]
    rows, width = ids.shape
    runner = model if parts is None else parts[0]
    project = (lambda x: x) if parts is None else parts[1]

    def run(**inputs: Any) -> tuple[torch.Tensor, Any]:
        out = runner(**inputs)
        return (out.logits if parts is None else out.last_hidden_state), _cache_of(out)

    if shared_prompt:
        positions = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
        keep_last = {"logits_to_keep": 1} if parts is None else {}
        hidden, cache = run(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                            use_cache=True, **keep_last)
        first = hidden[:, -1][index]  # (rows, H): the state that predicts each completion's first token
        if width > 1:
            cache.batch_select_indices(index)  # prompt rows -> completion rows (a differentiable gather)
            attention = torch.cat([prompt_mask[index], torch.ones_like(ids[:, :-1])], dim=1)
            start = prompt_mask.sum(1)[index][:, None]  # (rows, 1) each prompt's length
            later, _ = run(input_ids=ids[:, :-1], attention_mask=attention,
                           position_ids=start + torch.arange(width - 1, device=ids.device),
                           **{cache_argument(runner): cache}, use_cache=True)
            hidden = torch.cat([first[:, None], later], dim=1)  # (rows, T, H)
        else:
            hidden = first[:, None]
    else:
        joined = torch.cat([prompt_ids[index], ids], dim=1)  # (rows, Tp + T)
        attention = torch.cat([prompt_mask[index], torch.ones_like(ids)], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        hidden, _ = run(input_ids=joined, attention_mask=attention, position_ids=positions, use_cache=False)
        hidden = hidden[:, prompt_ids.shape[1] - 1:-1]  # position p predicts token p + 1
    keep = mask.bool()
    states, wanted = hidden[keep], ids[keep]  # (N, H), (N,): completion positions only
    pieces = []
    for s in range(0, len(wanted), chunk):
        logits = project(states[s:s + chunk]).float() / temperature
        pieces.append(-F.cross_entropy(logits, wanted[s:s + chunk], reduction="none"))
    values = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
    return torch.zeros((rows, width), dtype=torch.float32, device=ids.device).masked_scatter(keep, values)


def uses_shared_prompt(model: nn.Module) -> bool:
    """Whether the prompt's KV cache can be shared by its rows in training: not under gradient checkpointing
    (transformers' layers then keep no cache, and a recomputed layer would write to it twice)."""
    return not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def summed_loss(objective: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """GRPO's summed loss of a micro-batch for the trainer (:class:`lora.train.objective.BatchLoss`, task
    ``"grpo"``); adds the micro-batch's KL and clipping counts to ``objective.grpo_stats``."""
    cfg: GRPOConfig = objective.grpo
    logps = completion_logps(objective.model, objective.parts, batch, cfg.temperature, objective.loss_chunk,
                             uses_shared_prompt(objective.model))
    losses, parts = token_losses(logps, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"],
                                 cfg.epsilon, cfg.beta)
    mask = batch["completion_mask"]
    stats = objective.grpo_stats
    if "padding" not in batch:
        m = mask.bool()
        stats["tokens"] = stats.get("tokens", 0.0) + float(m.sum())
        stats["clipped"] = stats.get("clipped", 0.0) + float(parts["clipped"][m].sum())
        if "kl" in parts:
            stats["kl"] = stats.get("kl", 0.0) + float(parts["kl"][m].sum())
    return reduce_losses(losses, mask, cfg.loss_normalization)


__all__ = ["GRPOConfig", "group_advantages", "token_losses", "reduce_losses", "loss_terms", "grpo_loss",
           "completion_logps", "uses_shared_prompt", "summed_loss", "NORMALIZATIONS"]
