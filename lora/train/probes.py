"""What a model allows, decided once on the first examples, by what it does (never by a table of names): whether
the loss may come from ``head(hidden states)`` at target positions, and whether packing keeps examples apart."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import nn

from .objective import packing_gap

if TYPE_CHECKING:
    from .trainer import Trainer


def choose_loss_path(trainer: Trainer, train_data: list[dict]) -> None:
    """Compute the loss through ``head(hidden states)`` only where that equals the model's own logits."""
    objective = trainer.objective
    batch = trainer.batches.make(train_data[:2])
    with trainer.accelerator.autocast():
        exact, gap = trainer.run_whole(lambda: objective.check_shortcut(batch))
    if trainer.processes.all(exact):
        objective.parts = objective.candidate
    elif objective.candidate is not None and not math.isnan(gap):
        trainer.accelerator.print(f"loss from full logits: {type(trainer.model).__name__}'s logits are not its "
                                  f"head's output (max relative gap {gap:.1e}; soft-capping or scaling), so the "
                                  f"memory-saving loss path is off")


def packing_is_exact(trainer: Trainer, model: nn.Module, train_data: list[dict]) -> bool:
    """Pack only if this model keeps packed examples apart: their losses must equal those of padded rows."""
    acc = trainer.accelerator
    if "position_ids" not in trainer.objective.takes:
        # Packed examples are kept apart by positions that restart; a forward without position_ids would let
        # them attend to each other.
        acc.print(f"packing off: {type(model).__name__}.forward takes no position_ids, so packed examples would "
                  f"attend to each other; training on padded rows")
        return False
    with acc.autocast():
        gap = trainer.run_whole(lambda: packing_gap(trainer.objective, train_data, trainer.cfg.seq_len,
                                                    trainer.pad_id))
    # Kept apart, fp32 agrees to ~1e-7 (the families in tests/test_families.py); half precision rounds each
    # token's loss by ~1e-2 of it, which averages to less. Examples that see each other are ~1e-1 off.
    tolerance = 1e-3 if acc.mixed_precision == "no" else 2e-2
    if trainer.processes.all(gap is None or gap <= tolerance):
        return True
    acc.print(f"packing off: packed examples' token losses differ from padded ones by {gap:.1e} of the mean loss "
              f"({type(model).__name__} does not keep packed examples apart); training on padded rows")
    return False
