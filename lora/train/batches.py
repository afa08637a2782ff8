"""Rows -> micro-batches: the batch of each task on the device, and which rows each process runs at each step."""

from __future__ import annotations

import math

import torch

from ..data import IGNORE, collate, join_rows
from . import budget


class Batches:
    """Stacks rows into one micro-batch for the task: causal LM (``input_ids`` + ``targets``), classification
    (``labels``) or preference pairs (the chosen completions, then the rejected ones)."""

    def __init__(self, task: str, pad_id: int, device: torch.device):
        self.task, self.pad_id, self.device = task, pad_id, device
        self.joins_rows = False  # set once the trainer knows attention runs per example (see Trainer.__init__)

    def make(self, rows: list[dict], packed: bool = False) -> dict[str, torch.Tensor]:
        """One micro-batch on the device; ``packed``: ``rows`` come from :func:`lora.data.pack`."""
        if self.task == "classification":
            batch = collate([{"input_ids": r["input_ids"], "targets": r["input_ids"]} for r in rows], self.pad_id)
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
            batch = {"input_ids": batch["input_ids"], "attention_mask": mask, "real_tokens": batch["real_tokens"],
                     "labels": torch.tensor([r["label"] for r in rows])}
        elif self.task == "preference":  # the chosen completions, then the rejected ones, row for row
            batch = collate([r["chosen"] for r in rows] + [r["rejected"] for r in rows], self.pad_id)
            batch["pairs"] = torch.tensor(len(rows))
        else:
            batch = collate([join_rows(rows)] if packed and self.joins_rows else rows, self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def terms(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss terms a batch holds: examples for classification, pairs for preferences, else target
        tokens (none in a padding micro-batch)."""
        if "padding" in batch:
            return 0
        if "terms" in batch:  # a batch that says its own (GRPO's completion tokens, or completions)
            return int(batch["terms"])
        if self.task == "preference":
            return int(batch["pairs"])
        if self.task == "classification":
            return len(batch["labels"])
        return int((batch["targets"] != IGNORE).sum())


class StepPlan:
    """Which rows each process runs at each optimizer step: a fresh seeded shuffle every epoch, ``batch_size`` rows
    per micro-batch, ``grad_accum`` micro-batches per process; the last step of an epoch takes the rows left over,
    so every row is trained on in every epoch."""

    def __init__(self, rows: list[dict], batches: Batches, batch_size: int, grad_accum: int, world: int, rank: int,
                 seed: int, packed: bool):
        self.rows, self.batches, self.batch_size = rows, batches, batch_size
        self.world, self.rank, self.seed, self.packed = world, rank, seed, packed
        self.rows_per_step = batch_size * grad_accum * world
        self.steps_per_epoch = budget.steps_per_epoch(len(rows), self.rows_per_step)
        self.step_size = (self.rows_per_step, "rows")  # what the run's plan line says one step takes

    def step_rows(self, step: int) -> list[list[dict]]:
        """This process's micro-batches (lists of rows) for optimizer step ``step``."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch))
        start = index * self.rows_per_step
        chosen = [self.rows[i] for i in order[start:start + self.rows_per_step].tolist()]
        mine = chosen[self.rank::self.world]
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def metrics(self, step: int) -> dict[str, float]:
        """What the plan adds to a step's metrics: nothing for fixed rows (GRPO's plan adds its rewards)."""
        return {}

    def state(self) -> dict:
        """What a checkpoint must keep of the plan beyond the step number: nothing for fixed rows."""
        return {}

    def load_state(self, state: dict, source) -> None:
        """Take back :meth:`state` from checkpoint ``source``."""

    def window(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches this process runs for optimizer step ``step``: its own, then padding up to the count
        of the process with the most.

        With fewer rows in a step than processes x batch_size x grad_accum (a small data set), some process would
        have fewer micro-batches, or none, and skip a forward/backward that the others wait on in a collective
        (DDP's gradient all-reduce, FSDP's all-gathers): the run hangs. Padding micro-batches run forward and
        backward like the others with weight 0, so they add nothing to gradients, loss or token counts.
        """
        rows = self.step_rows(step)
        index = step % self.steps_per_epoch
        in_step = min(len(self.rows) - index * self.rows_per_step, self.rows_per_step)  # the epoch's last: fewer
        # rank 0 gets the most: ceil(in_step / world) rows
        most = math.ceil(math.ceil(in_step / self.world) / self.batch_size)
        batches = [self.batches.make(r, self.packed) for r in rows]
        for _ in range(most - len(batches)):
            batches.append({**self.batches.make(self.rows[:1], self.packed), "padding": torch.tensor(True)})
        return batches
