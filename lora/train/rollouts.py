"""GRPO's micro-batches: for each optimizer step, the prompts it takes, a group of completions sampled for each from
the current policy, their rewards and advantages, and the log-probabilities the loss compares against.

:class:`RolloutPlan` stands where :class:`lora.train.batches.StepPlan` stands for fixed rows: the trainer asks it
for the micro-batches of step ``step`` (``window``), and for what a checkpoint must keep of it (``state``).

- Prompts come in a seeded shuffle per epoch, read as one stream, so every step takes
  ``batch_size x grad_accum x processes`` prompts; each process answers its share, a group staying on one process,
  so advantages need nothing from the others.
- The draws of generation ``g`` come from a generator seeded by (seed, g, process): a resumed run samples exactly
  what the uninterrupted one did, with no generator state to save.
- With ``grpo_iterations`` > 1, generation ``g`` serves steps ``g * iterations`` to ``(g + 1) * iterations - 1``;
  a checkpoint in the middle of them keeps its micro-batches (token ids and log-probabilities), since the policy
  that sampled them is gone.
- A reward that fails on any process stops every process, with the failing function's message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..generate import pad_left, sample_tokens
from ..inject import disabled
from . import budget
from .grpo import GRPOConfig, completion_logps, group_advantages, loss_terms
from .rewards import Rewards

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass
class Rollout:
    """One generation's micro-batches for this process, and the sums its metrics are made of."""

    generation: int
    batches: list[dict[str, torch.Tensor]]
    sums: dict[str, float] = field(default_factory=dict)


def _seed(seed: int, generation: int, rank: int) -> int:
    """A generator seed per (run seed, generation, process), the same on every run."""
    return ((seed * 1_000_003 + generation) * 10_007 + rank) % (2 ** 63)


def decide_together(trainer: Trainer, error: BaseException | None) -> None:
    """Raise on every process if a reward failed on any of them (a process that raised alone would leave the
    others waiting in the next collective)."""
    if trainer.world == 1:
        if error is not None:
            raise error
        return
    if not trainer.processes.any(error is not None):
        return
    from accelerate.utils import gather_object

    messages = gather_object([None if error is None else str(error)])
    first = next((i, m) for i, m in enumerate(messages) if m is not None)
    if error is not None:
        raise error
    raise ValueError(f"{first[1]} (on process {first[0]})")


def completion_lengths(tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """``(rows,)`` tokens of each completion up to and with its first end-of-sequence token (all of them when it
    has none: cut at ``max_new_tokens``)."""
    width = tokens.shape[1]
    if eos_token_id is None:
        return torch.full((tokens.shape[0],), width, dtype=torch.long)
    is_eos = tokens == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], width - 1,
                                                                                 dtype=torch.long))
    return first + 1


class RolloutPlan:
    """The micro-batches of every GRPO optimizer step, sampled and scored when the step asks for them.

    Args:
        trainer: The trainer (its model, objective, processes, precision, config).
        prompts: From :func:`lora.data.load_prompts`.
        rewards: The reward functions and weights.
        config: GRPO's settings.
        tokenizer: Decodes completions for the reward functions; its EOS ends a completion.
    """

    def __init__(self, trainer: Trainer, prompts: list[dict], rewards: Rewards, config: GRPOConfig, tokenizer):
        cfg = trainer.cfg
        self.trainer, self.prompts, self.rewards, self.config, self.tokenizer = (trainer, prompts, rewards, config,
                                                                                  tokenizer)
        self.batch_size, self.world, self.rank = cfg.batch_size, trainer.world, trainer.accelerator.process_index
        self.seed = cfg.seed
        self.prompts_per_step = cfg.batch_size * cfg.grad_accum * trainer.world
        self.generations_per_epoch = budget.steps_per_epoch(len(prompts), self.prompts_per_step)
        self.step_size = (self.prompts_per_step, "prompts")  # what the run's plan line says one step takes
        self.steps_per_epoch = self.generations_per_epoch * config.grpo_iterations
        self.eos_token_id = tokenizer.eos_token_id
        self.current: Rollout | None = None

    # -- which prompts -------------------------------------------------------------------------------------------------
    def step_prompts(self, generation: int) -> list[list[dict]]:
        """This process's micro-batches of prompts for generation ``generation``."""
        n, start = len(self.prompts), generation * self.prompts_per_step
        orders: dict[int, list[int]] = {}
        chosen = []
        for position in range(start, start + self.prompts_per_step):
            epoch = position // n
            if epoch not in orders:
                orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            chosen.append(self.prompts[orders[epoch][position % n]])
        mine = chosen[self.rank::self.world]
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    # -- the trainer's interface ---------------------------------------------------------------------------------------
    def window(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches this process runs for optimizer step ``step``."""
        generation = step // self.config.grpo_iterations
        if self.current is None or self.current.generation != generation:
            self.current = self.rollout(generation)
        return self.current.batches

    def metrics(self, step: int) -> dict[str, float]:
        """The step's reward and policy metrics over all processes (a collective: every process calls it).

        ``reward`` (mean weighted reward of the sampled completions), ``reward/<function>``, ``reward_std`` (mean
        standard deviation within a group), ``groups_with_signal`` (share of groups whose rewards differ),
        ``completion_length``, ``clip_ratio`` (share of completion tokens whose ratio was clipped) and ``kl``
        (mean k3 estimate, with ``beta`` > 0).
        """
        acc, stats = self.trainer.accelerator, self.trainer.objective.grpo_stats
        sums = dict(self.current.sums) if self.current is not None else {}
        names = ["completions", "reward", "reward_std", "groups", "signal", "length",
                 *[f"reward/{n}" for n in self.rewards.names]]
        values = [sums.get(k, 0.0) for k in names] + [stats.get(k, 0.0) for k in ("tokens", "clipped", "kl")]
        stats.clear()
        if self.world > 1:
            values = acc.reduce(torch.tensor(values, dtype=torch.float64, device=acc.device), "sum").tolist()
        total = dict(zip(names + ["tokens", "clipped", "kl"], values))
        n, groups = max(total["completions"], 1), max(total["groups"], 1)
        out = {"reward": total["reward"] / n, "reward_std": total["reward_std"] / groups,
               "groups_with_signal": total["signal"] / groups, "completion_length": total["length"] / n,
               **{k: total[k] / n for k in names if k.startswith("reward/")}}
        if total["tokens"]:
            out["clip_ratio"] = total["clipped"] / total["tokens"]
            if self.config.beta:
                out["kl"] = total["kl"] / total["tokens"]
        return out

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the GRPO settings (a resumed run must share them) and, between the updates of
        one generation (``grpo_iterations`` > 1), every process's micro-batches of it. Every process calls it."""
        state: dict[str, Any] = {"grpo": _jsonable(self.config)}
        step = self.trainer.step
        if self.config.grpo_iterations > 1 and step % self.config.grpo_iterations and self.current is not None:
            mine = {"generation": self.current.generation, "sums": self.current.sums,
                    "batches": [{k: _tensor_to_json(v) for k, v in b.items()} for b in self.current.batches]}
            if self.world > 1:
                from accelerate.utils import gather_object

                everyone = gather_object([mine])
            else:
                everyone = [mine]
            state["rollouts"] = everyone
        return state

    def load_state(self, state: dict[str, Any], source: Any) -> None:
        """Take back what :meth:`state` saved, refusing other GRPO settings."""
        saved = state.get("grpo")
        now = _jsonable(self.config)
        if saved is not None and saved != now:
            changed = sorted(k for k in now if saved.get(k) != now[k])
            raise ValueError(f"checkpoint {source} was written with "
                             f"{', '.join(f'{k}={saved.get(k)!r}' for k in changed)}; this run has "
                             f"{', '.join(f'{k}={now[k]!r}' for k in changed)}. Resume with the checkpoint's GRPO "
                             f"settings, or set resume=False to start afresh")
        rollouts = state.get("rollouts")
        if rollouts:
            if len(rollouts) != self.world:
                raise ValueError(f"checkpoint {source} was written by {len(rollouts)} process(es) between the "
                                 f"updates of one batch of generations (grpo_iterations="
                                 f"{self.config.grpo_iterations}); resume it with {len(rollouts)} process(es)")
            mine = rollouts[self.rank]
            device = self.trainer.accelerator.device
            self.current = Rollout(mine["generation"], [{k: _tensor_from_json(v, device) for k, v in b.items()}
                                                        for b in mine["batches"]], dict(mine["sums"]))

    # -- sampling and scoring ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[dict], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``group_size`` completions of each prompt: ``(tokens (rows, T), lengths (rows,), texts)``."""
        cfg, trainer = self.config, self.trainer
        device = trainer.accelerator.device
        ids, mask = pad_left([p["input_ids"] for p in prompts], trainer.pad_id, device)
        with trainer.accelerator.autocast():
            tokens = sample_tokens(trainer.model, ids, mask, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                   generator, self.eos_token_id, num_samples=cfg.group_size)
        lengths = completion_lengths(tokens, self.eos_token_id)
        texts = self.tokenizer.batch_decode([t[:n].tolist() for t, n in zip(tokens, lengths)],
                                            skip_special_tokens=True)
        return tokens, lengths, texts

    def score(self, prompts: list[dict], texts: list[str], repeat: int) -> tuple[list[float], dict[str, list[float]]]:
        """The rewards of ``texts``, ``repeat`` completions per prompt; a failure stops every process together."""
        asked = [p["prompt"] for p in prompts for _ in range(repeat)]
        columns = {k: [p["columns"][k] for p in prompts for _ in range(repeat)] for k in prompts[0]["columns"]}
        error, scores = None, ([], {})
        try:
            scores = self.rewards.score(asked, texts, columns)
        except ValueError as e:
            error = e
        decide_together(self.trainer, error)
        return scores

    def rollout(self, generation: int) -> Rollout:
        """Sample, score and weigh generation ``generation``'s groups: this process's micro-batches."""
        cfg, trainer = self.config, self.trainer
        device = trainer.accelerator.device
        generator = torch.Generator(device=device).manual_seed(_seed(self.seed, generation, self.rank))
        groups = self.step_prompts(generation)
        sampled = [self.sample(prompts, generator) for prompts in groups]
        every_prompt = [p for prompts in groups for p in prompts]
        totals, by_name = self.score(every_prompt, [t for _, _, texts in sampled for t in texts], cfg.group_size)
        rewards = torch.tensor(totals, dtype=torch.float32)
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        grouped = rewards.view(-1, cfg.group_size)
        lengths_all = torch.cat([lengths for _, lengths, _ in sampled])
        sums = {"completions": float(len(rewards)), "reward": float(rewards.sum()),
                "reward_std": float(grouped.std(1).sum()), "groups": float(len(grouped)),
                "signal": float((grouped.max(1).values > grouped.min(1).values).sum()),
                "length": float(lengths_all.sum()),
                **{f"reward/{n}": float(sum(v)) for n, v in by_name.items()}}
        batches, offset = [], 0
        for prompts, (tokens, lengths, _) in zip(groups, sampled):
            rows = len(tokens)
            batches.append(self._micro_batch(prompts, tokens, lengths, advantages[offset:offset + rows]))
            offset += rows
        return Rollout(generation, batches, sums)

    @torch.no_grad()
    def _micro_batch(self, prompts: list[dict], tokens: torch.Tensor, lengths: torch.Tensor,
                     advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """The trainer's micro-batch for one batch of prompts and their groups.

        With ``beta`` 0 a completion whose advantage is 0 (all of a group scored alike) adds nothing to the loss or
        its gradient, so it is left out of the forward and backward; its tokens still count in the divisor, so the
        step is exactly the one computed with it.
        """
        cfg, trainer = self.config, self.trainer
        device = trainer.accelerator.device
        width = int(lengths.max())
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (rows, T)
        terms = loss_terms(mask, cfg.loss_normalization)
        kept = torch.arange(len(tokens)) if cfg.beta else (advantages != 0).nonzero().squeeze(1)
        if len(kept) == 0:  # nothing to learn here (the stand-in's advantage is 0), but every process must still
            kept = torch.tensor([0])  # run a forward and backward: DDP's gradient all-reduce waits for it
        group_of = kept // cfg.group_size  # the prompt each kept row answers
        used = sorted(set(group_of.tolist()))
        prompt_ids, prompt_mask = pad_left([prompts[i]["input_ids"] for i in used], trainer.pad_id, device)
        remap = {g: i for i, g in enumerate(used)}
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                 "prompt_index": torch.tensor([remap[g] for g in group_of.tolist()], device=device),
                 "completion_ids": tokens[kept][:, :width].to(device), "completion_mask": mask[kept].to(device),
                 "advantages": advantages[kept].to(device), "terms": torch.tensor(terms),
                 "real_tokens": torch.tensor(int(prompt_mask.sum()) + int(mask[kept].sum()))}
        model, objective = trainer.model, trainer.objective
        was_training = model.training
        model.eval()  # no dropout in the log-probabilities the loss compares against
        try:
            with trainer.accelerator.autocast():
                if cfg.grpo_iterations > 1:
                    batch["old_logps"] = completion_logps(model, objective.parts, batch, cfg.temperature,
                                                          objective.loss_chunk)
                if cfg.beta:
                    with disabled(model):
                        batch["ref_logps"] = completion_logps(model, objective.parts, batch, cfg.temperature,
                                                              objective.loss_chunk)
        finally:
            model.train(was_training)
        return batch


def _jsonable(config: GRPOConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _tensor_to_json(t: torch.Tensor) -> dict[str, Any]:
    # float32 -> Python float -> JSON keeps every bit (a float64 holds any float32, and JSON writes floats exactly)
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "values": t.flatten().tolist()}


def _tensor_from_json(d: dict[str, Any], device: torch.device) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"])
    return torch.tensor(d["values"], dtype=dtype).view(d["shape"]).to(device)


__all__ = ["RolloutPlan", "Rollout", "completion_lengths", "decide_together"]
