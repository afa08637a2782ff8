"""Early stopping: the loss on a validation slice held out from the training data, patience, the best weights kept.

The slice comes from the training file, never the eval file, so the held-out evaluation stays untouched by the
choice of when to stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def split_validation(examples: list[dict], split: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(training, validation)``: a seeded random ``split`` of ``examples`` (a fraction below 1, or a count) held
    out for validation, the rest in their original order.

    Raises:
        ValueError: the split would leave no training or no validation example.
    """
    count = max(1, round(split * len(examples))) if split < 1 else int(split)  # a fraction holds out one at least
    if count < 1 or count >= len(examples):
        raise ValueError(f"validation_split={split} of {len(examples)} training examples leaves "
                         f"{count} for validation and {len(examples) - count} for training; both need at least one "
                         f"(use a fraction such as 0.05, or a count below {len(examples)})")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


@dataclass
class EarlyStopping:
    """Tracks validation losses; ``update`` says when ``patience`` evaluations in a row failed to beat the best
    by more than ``min_delta``, and the best trainable weights are kept (on the CPU) to be put back.

    Its state goes into every checkpoint (:meth:`state` and :attr:`best_weights`), so a resumed run makes the same
    decisions as one that was never interrupted.
    """

    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_step: int = 0
    bad_evaluations: int = 0
    stopped: bool = False
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def update(self, step: int, loss: float, model: nn.Module) -> bool:
        """Record the validation ``loss`` after ``step``; True when training should stop."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad_evaluations = loss, step, 0
            self.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                                 if p.requires_grad}
        else:
            self.bad_evaluations += 1
            self.stopped = self.bad_evaluations >= self.patience
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

    def state(self) -> dict[str, Any]:
        """The JSON part of the state (the weights are saved as tensors beside it)."""
        return {"best_loss": None if math.isinf(self.best_loss) else self.best_loss, "best_step": self.best_step,
                "bad_evaluations": self.bad_evaluations, "stopped": self.stopped}

    def load(self, state: dict[str, Any], best_weights: dict[str, torch.Tensor]) -> None:
        self.best_loss = math.inf if state["best_loss"] is None else float(state["best_loss"])
        self.best_step, self.bad_evaluations = int(state["best_step"]), int(state["bad_evaluations"])
        self.stopped = bool(state["stopped"])
        self.best_weights = best_weights or None


__all__ = ["EarlyStopping", "split_validation"]
