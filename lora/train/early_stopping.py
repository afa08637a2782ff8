"""Early stopping: a validation slice held out from the training data, judged the way the user will judge the run,
patience, and the best weights kept.

The slice comes from the training file, never the eval file, so the held-out evaluation stays untouched by the
choice of when to stop. Its size, how often it is judged and when a stop may first happen are
:mod:`lora.train.budget`'s.

**The rule** (issue 20, chosen on the task suite ``bench/suite.py``; figures in ``bench/RESULTS.md``):

- **What is judged.** Where the slice's answers are short (the median last answer at most
  :data:`SHORT_ANSWER` tokens), by *exact match*: how many of the slice's examples greedy decoding would answer
  exactly. It costs one forward pass, the same as the loss: greedy decoding reproduces an answer exactly if and
  only if every answer token is the most likely one given the tokens before it, so the answer tokens' argmax
  under teacher forcing decides it without generating (the answer's end-of-turn marker included, so a longer
  answer does not count). The loss comes out of the same pass. Long answers (free text) are judged by the loss.
- **What counts as progress.** By exact match: one more example right; or as many right and a validation loss
  ``min_delta`` (a fraction: 0.02 is 2%) below the best. By loss: a loss ``min_delta`` below the best. The
  threshold is relative: an absolute 0.01 asks a loss of 0.06 for a 15% fall every measurement, and a loss of
  0.5 for 2%.
- **When to stop.** After ``patience`` validations in a row without progress, but never before
  ``stop_from`` (warm-up and a minimum share of the budget, :func:`lora.train.budget.first_stop_step`). The
  weights of the best validation are the ones kept.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE
from .budget import validation_count

SHORT_ANSWER = 64  # tokens: the median last answer up to this long is judged by exact match
JUDGES = ("exact match", "loss")


def split_validation(examples: list[dict], split: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(training, validation)``: a seeded random slice of ``examples`` held out for validation, sized by
    :func:`lora.train.budget.validation_count` (empty when the set is too small to spare one), the rest in their
    original order.

    Raises:
        ValueError: a count that would leave no training example.
    """
    count = validation_count(len(examples), split)
    if not count:
        return list(examples), []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def last_answer_lengths(examples: list[dict]) -> list[int]:
    """Tokens in each example's last answer: its last run of target positions."""
    lengths = []
    for e in examples:
        targets = list(e["targets"]) if "targets" in e else []
        n = 0
        for t in reversed(targets):
            if t == IGNORE and n:
                break
            n += t != IGNORE
        lengths.append(n)
    return lengths


def judge_of(task: str, validation: list[dict]) -> str:
    """``"exact match"`` for language-model examples whose last answers are short, else ``"loss"``."""
    if task != "lm" or not validation:
        return "loss"
    return "exact match" if statistics.median(last_answer_lengths(validation)) <= SHORT_ANSWER else "loss"


def _example_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, T)``: which example each position belongs to, numbered across the batch. A packed row's examples
    start where its ``position_ids`` restart at 0; an unpacked row is one example."""
    rows, length = batch["targets"].shape
    starts = (batch["position_ids"] == 0).long()  # collate gives every row position_ids (0s in the padding)
    starts[:, 0] = 1
    return (starts.flatten().cumsum(0) - 1).view(rows, length)


@torch.no_grad()
def answer_scores(objective: Any, batch: dict[str, torch.Tensor]) -> tuple[float, int, int, int]:
    """``(summed loss, target tokens, examples answered exactly, examples)`` of a batch, in one forward pass.

    An example is answered exactly when every token of its last answer is the argmax given the true tokens before
    it: what greedy decoding of that prompt would produce.
    """
    targets = batch["targets"]  # (B, T), already shifted: the token each position should predict
    keep = targets != IGNORE
    labelled, head, wanted = objective.labelled(batch)  # (N, ...), (N,)
    loss, hits = 0.0, []
    for rows, logits in objective.chunked_logits(labelled, head):
        loss += float(F.cross_entropy(logits, wanted[rows], reduction="sum"))
        hits.append(logits.argmax(-1) == wanted[rows])
    hit = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool, device=targets.device)
    # The last answer of every example: the last run of labelled positions within it.
    example = _example_ids(batch)
    previous = torch.nn.functional.pad(keep[:, :-1], (1, 0), value=False)
    run_start = keep & (~previous | (example != torch.nn.functional.pad(example[:, :-1], (1, 0), value=-1)))
    run = run_start.flatten().cumsum(0).view_as(keep)[keep]  # (N,) which run each labelled position is in
    owner = example[keep]  # (N,)
    if not len(owner):
        return loss, 0, 0, 0
    count = int(example.max()) + 1
    last_run = torch.full((count,), -1, dtype=run.dtype, device=run.device).scatter_reduce(0, owner, run, "amax")
    in_last = run == last_run[owner]
    misses = torch.zeros(count, dtype=torch.long, device=run.device).index_add(
        0, owner[in_last], (~hit[in_last]).long())
    answered = last_run >= 0  # examples that have an answer at all
    return loss, len(wanted), int((answered & (misses == 0)).sum()), int(answered.sum())


@torch.no_grad()
def validation_scores(objective: Any, batches: Iterable[dict[str, torch.Tensor]],
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) \
        -> dict[str, float]:
    """``validation_loss`` (mean per target token) and ``validation_exact_match`` (share of examples answered
    exactly, see :func:`answer_scores`) with ``validation_correct``, over ``batches``; the model in eval mode."""
    model = objective.model
    loss, tokens, correct, examples = 0.0, 0, 0, 0
    was_training = model.training
    model.eval()
    try:
        with autocast():
            for batch in batches:
                scores = answer_scores(objective, batch)
                loss, tokens = loss + scores[0], tokens + scores[1]
                correct, examples = correct + scores[2], examples + scores[3]
    finally:
        model.train(was_training)
    return {"validation_loss": loss / max(tokens, 1), "validation_exact_match": correct / max(examples, 1),
            "validation_correct": correct}


@dataclass
class EarlyStopping:
    """Tracks validations; ``update`` says when ``patience`` of them in a row made no progress (see the module's
    docstring) at or after step ``stop_from``, and the best trainable weights are kept (on the CPU) to be put back.

    Its state goes into every checkpoint (:meth:`state` and :attr:`best_weights`), so a resumed run makes the same
    decisions as one that was never interrupted.

    Args:
        patience: Validations in a row without progress that stop the run (``math.inf``: never stop).
        min_delta: The relative fall of the validation loss that counts as progress (0.02: 2% below the best).
        judge: ``"exact match"`` or ``"loss"``.
        stop_from: The first step at which a stop may happen.
        held_out: The size of the validation slice (saved, so that a resume under another slice is refused).
    """

    patience: float
    min_delta: float
    judge: str = "loss"
    stop_from: int = 0
    held_out: int = 0
    best_loss: float = math.inf
    best_correct: int = -1
    best_step: int = 0
    bad_evaluations: int = 0
    stopped: bool = False
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.judge not in JUDGES:
            raise ValueError(f"EarlyStopping judge must be one of {JUDGES}, got {self.judge!r}")

    def progress(self, loss: float, correct: int | None) -> bool:
        """Whether a validation of ``loss`` (and ``correct`` examples right) beats the best so far."""
        lower = loss < self.best_loss * (1 - self.min_delta)  # the first finite loss beats inf; NaN never counts
        if self.judge == "loss" or correct is None:
            return lower
        return correct > self.best_correct or (correct == self.best_correct and lower)

    def update(self, step: int, loss: float, model: nn.Module, correct: int | None = None) -> bool:
        """Record the validation after ``step``; True when training should stop."""
        if self.progress(loss, correct):
            self.best_loss, self.best_step, self.bad_evaluations = loss, step, 0
            self.best_correct = -1 if correct is None else correct
            self.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                                 if p.requires_grad}
        else:
            self.bad_evaluations += 1
            self.stopped = self.bad_evaluations >= self.patience and step >= self.stop_from
        return self.stopped

    def restore_best(self, model: nn.Module) -> bool:
        """Put the best weights back into ``model``; whether that changed anything (False if none were kept)."""
        if self.best_weights is None:
            return False
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(self.best_weights[n].to(p.device, p.dtype))
        return True

    def best_exact_match(self) -> float | None:
        """The best validation's share of the slice answered exactly (None when judged by loss)."""
        if self.judge != "exact match" or self.best_correct < 0 or not self.held_out:
            return None
        return self.best_correct / self.held_out

    def best_text(self) -> str:
        """The best validation so far, in words, for the run's messages."""
        loss = f"validation loss {self.best_loss:.4f}"
        if self.judge != "exact match":
            return loss
        return f"{self.best_correct} of {self.held_out} validation examples answered exactly, {loss}"

    def state(self) -> dict[str, Any]:
        """The JSON part of the state (the weights are saved as tensors beside it)."""
        return {"best_loss": None if math.isinf(self.best_loss) else self.best_loss, "best_step": self.best_step,
                "best_correct": self.best_correct, "bad_evaluations": self.bad_evaluations, "stopped": self.stopped,
                "judge": self.judge, "held_out": self.held_out}

    def load(self, state: dict[str, Any], best_weights: dict[str, torch.Tensor]) -> None:
        """Take a checkpoint's state (its slice and judge were checked against this run's before anything loaded,
        by :func:`lora.train.run_state.check_same_settings`)."""
        self.best_loss = math.inf if state["best_loss"] is None else float(state["best_loss"])
        self.best_step, self.bad_evaluations = int(state["best_step"]), int(state["bad_evaluations"])
        self.best_correct = int(state["best_correct"])
        self.stopped = bool(state["stopped"])
        self.best_weights = best_weights or None


__all__ = ["EarlyStopping", "split_validation", "judge_of", "answer_scores", "validation_scores",
           "last_answer_lengths", "SHORT_ANSWER"]
