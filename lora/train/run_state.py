"""A Trainer's run in checkpoints: saving its current step, resuming one, refusing to resume under other settings,
setting an earlier run's checkpoints aside, and stopping on a non-finite loss with the last good state kept. The
files themselves are :mod:`lora.train.checkpoint`'s."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import Checkpoints, RunShape, gather_rng, optimizer_state, rng_state, whole_parameters
from .config import RUN_SETTINGS, VALIDATION_SETTINGS, TrainConfig

if TYPE_CHECKING:
    from .early_stopping import EarlyStopping
    from .trainer import Trainer


def save_checkpoint(trainer: Trainer) -> Path:
    """Write adapter + optimizer + RNG + data position for the current step, atomically; keep the newest N.

    Called by every process together (each one's RNG state is gathered); the main process writes. Returns the
    checkpoint's folder on every process.
    """
    acc = trainer.accelerator
    rng = trainer.rng_at_step or rng_state()
    rng_tensors = gather_rng(acc, rng)  # a collective: before any process returns
    final = trainer.checkpoints.folder / f"step-{trainer.step:07d}"
    # DeepSpeed's ZeRO keeps the optimizer state partitioned inside its engine, out of reach. FSDP2's moments
    # are shards: every process gathers them (a collective) before the main process writes.
    plan_state = trainer.plan.state()  # GRPO's settings and rollouts under way; every process (it may gather)
    optim_state = None
    if not trainer.deepspeed and (acc.is_main_process or trainer.sharded):
        optim_state = optimizer_state(trainer.optimizer, {id(p): n for n, p in trainer.model.named_parameters()
                                                          if p.requires_grad})
    with whole_parameters(trainer.loss_module):  # FSDP: every process gathers, the main one writes whole tensors
        if acc.is_main_process:
            early = trainer.early_stopping
            trainer.checkpoints.save(trainer.step, trainer.model, optim_state, trainer.adapter, rng, rng_tensors, {
                "total_steps": trainer.total_steps, "shape": dataclasses.asdict(trainer.shape()),
                "history": trainer.history, "config": dataclasses.asdict(trainer.cfg),
                **({"plan": plan_state} if plan_state else {}),
                **({} if early is None else {"early_stopping": early.state()})},
                best_weights=None if early is None else early.best_weights)
    acc.wait_for_everyone()  # every process returns once the checkpoint is complete
    return final


def stop_non_finite(trainer: Trainer, value: float) -> None:
    """A NaN/inf loss (decided by all processes): keep the last good state as a checkpoint and stop.

    The state before this step is saved if the weights are still finite on every process, else the newest
    checkpoint is named; every process raises the same error.
    """
    trainer.optimizer.zero_grad(set_to_none=True)
    weights_ok = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters() if p.requires_grad)
    if trainer.processes.all(weights_ok):
        kept = save_checkpoint(trainer)
    else:
        kept = trainer.processes.main_value(trainer.latest_checkpoint())
    raise FloatingPointError(
        f"the training loss became {value} at step {trainer.step + 1}; training stopped. The last good state is "
        f"in {kept or 'no checkpoint (none was written before the failure)'}. Lower learning_rate, keep "
        f"max_grad_norm set, or check the data; resume=True continues from that checkpoint")


def resume(trainer: Trainer, latest: Path) -> None:
    """Load the trainable weights, optimizer, RNG states and position saved in checkpoint ``latest``."""
    check_same_settings(trainer.cfg, latest, trainer.early_stopping)
    state = Checkpoints.load(latest, trainer.model, trainer.optimizer, trainer.shape(),
                             trainer.accelerator.process_index)
    trainer.step, trainer.history = state["step"], state["history"]
    trainer.plan.load_state(state.get("plan", {}), latest)
    if trainer.early_stopping is not None:
        trainer.early_stopping.load(state["early_stopping"], state["best_weights"])


def check_same_settings(cfg: TrainConfig, latest: Path, early: EarlyStopping | None) -> None:
    """Refuse to resume under settings that change what the steps compute: a resumed run repeats the
    interrupted one exactly, and the saved optimizer groups would otherwise keep some old values silently. Checked
    before anything is loaded. The validation slice must be the same too: its size and its judge (a slice that
    vanished would put its examples back into training)."""
    state = json.loads((latest / "trainer_state.json").read_text())
    saved_early = state.get("early_stopping")
    if (early is None) != (saved_early is None):
        raise ValueError(f"checkpoint {latest} was written {'without' if saved_early is None else 'with'} a "
                         f"validation split, and this run has {'one' if early else 'none'} "
                         f"(validation_split={cfg.validation_split}); resume with the same data and settings, or "
                         f"set resume=False")
    if early is not None and "held_out" not in saved_early:
        raise ValueError(f"checkpoint {latest} was written by an older version of lora, whose early stopping judged "
                         f"by loss alone; this version cannot continue it exactly. Set resume=False to start afresh")
    if early is not None:
        then = (saved_early.get("held_out"), saved_early.get("judge"))
        if then != (early.held_out, early.judge):
            raise ValueError(f"checkpoint {latest} held out {then[0]} examples judged by {then[1]}, this run "
                             f"{early.held_out} judged by {early.judge} (the training data, validation_split or "
                             f"the rule that sizes and judges the slice changed); resume with the same data and "
                             f"settings, or set resume=False")
    saved, now = state.get("config", {}), dataclasses.asdict(cfg)
    keys = RUN_SETTINGS + (VALIDATION_SETTINGS if early is not None else ())
    changed = [key for key in keys if key in saved and saved[key] != now[key]]
    if changed:
        then = ", ".join(f"{k}={saved[k]!r}" for k in changed)
        raise ValueError(f"checkpoint {latest} was written with {then}; this run has "
                         f"{', '.join(f'{k}={now[k]!r}' for k in changed)}. Resume with the "
                         f"checkpoint's settings, or set resume=False to start afresh")


def set_earlier_run_aside(trainer: Trainer) -> None:
    """A fresh run (``resume=False``) in an ``output_dir`` that holds an earlier run's checkpoints moves them
    aside first: otherwise rotation would keep the earlier run's higher steps over this run's, and a later
    ``resume=True`` would continue the earlier run. Aside, not deleted: a re-run that meant resume=True can
    still get them back."""
    acc = trainer.accelerator
    if acc.is_main_process:
        moved, aside = trainer.checkpoints.set_aside()
        if moved:
            names = ", ".join(p.name for p in moved)
            print(f"{trainer.checkpoints.folder} held an earlier run's checkpoints ({names}): moved to {aside}, as "
                  f"this run starts afresh (resume=False). To continue that run instead, move them back and pass "
                  f"resume=True; to keep both runs, give each its own output_dir", flush=True)
    acc.wait_for_everyone()


def run_shape(trainer: Trainer) -> RunShape:
    """What a checkpoint of this run must share with the run that resumes it."""
    cfg = trainer.cfg
    return RunShape(trainer.total_steps, trainer.world, cfg.batch_size, cfg.grad_accum, trainer.plan.steps_per_epoch)
