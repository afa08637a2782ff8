"""TrainConfig (how to train, checked on construction), TrainResult (what a run measured) and the schedule."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .tracking import check_installed

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
LOGGERS = ("none", "tensorboard", "wandb", "mlflow")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. A recipe's YAML keys are exactly these fields (plus the recipe's own and LoraConfig's).

    Args:
        learning_rate: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay on the trainable parameters.
        batch_size: Rows per micro-batch and process (a row is one packed sequence, or one example).
        grad_accum: Micro-batches per optimizer step.
        epochs: Passes over the training rows (may be fractional); ignored when ``max_steps`` is set.
        max_steps: Optimizer steps to run, overriding ``epochs`` and ``min_steps``.
        min_steps: The fewest optimizer steps a run takes: when ``epochs`` passes give fewer (a small set), the
            steps first get smaller (fewer of ``grad_accum``'s micro-batches each, down to 1: a smaller effective
            batch), then the run makes more passes until it has them (see :mod:`lora.train.budget`); 0 for no
            minimum.
        warmup_ratio: Fraction of the steps spent warming the learning rate up linearly from 0.
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` after warm-up.
        min_lr_ratio: Floor of the decay, as a fraction of ``learning_rate``.
        max_grad_norm: Clip the global gradient norm to this (None: no clipping).
        precision: ``"auto"`` (bf16 on GPUs that have it, fp16 with a grad scaler on older GPUs, fp32 on CPU),
            or ``"fp32"``, ``"bf16"``, ``"fp16"``.
        seq_len: Longest example in tokens (longer ones are refused: load the data with ``max_length=seq_len``),
            and the packed row length.
        packing: Pack several examples per row (no padding, no cross-attention between them), where a probe on
            the first batch shows the model keeps packed examples apart (else padded rows, with a notice).
        overlong: ``"truncate"`` or ``"drop"`` examples longer than ``seq_len``, as the recipes load their data
            (``lora.load_dataset(..., max_length=seq_len, overlong=...)``).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        eval_every: Evaluate every N steps (0: only at the end).
        save_every: Write a checkpoint every N steps (0: only at the end).
        log_every: Log every N steps.
        keep_checkpoints: How many of the newest checkpoints to keep.
        output_dir: Where checkpoints, logs, the loss curve and ``metrics.json`` go.
        seed: Seeds data order, initialisation and dropout.
        logger: ``"tensorboard"``, ``"wandb"`` or ``"mlflow"`` (through accelerate's trackers: the same scalars
            and the run's settings, files under ``output_dir``; see :mod:`lora.train.tracking`), or ``"none"``.
        resume: Continue from the newest checkpoint in ``output_dir`` if there is one.
        loss_chunk: Target positions per chunk when applying the output head and cross-entropy.
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): the B matrices learn at this multiple of the learning rate
            (the paper suggests about 16); 1.0 is plain LoRA.
        dpo_beta: DPO's beta, for preference data (pairs from :func:`lora.data.load_preferences`): how far the
            policy may move from the reference, which is the same model with its adapters off.
        validation_split: Training examples held out (seeded) to judge the run during training: a fraction
            below 1 (0.05), raised to 48 examples where that is at most a fifth of the set (none for a set too
            small to spare 48: it trains its whole budget), or a count (40) taken as it is; 0 for none. Never taken
            from the eval data. Short answers are judged by exact match, long ones by loss
            (:mod:`lora.train.early_stopping`).
        validate_every: Judge the validation slice every N steps (and after the last); 0: about 12 times a run.
        early_stopping_patience: Stop once this many validations in a row made no progress, but not during
            warm-up nor before half of the steps, and keep the weights of the best one (0: never stop early;
            with a validation split, the best weights are still the ones kept).
        early_stopping_min_delta: The relative fall of the validation loss that counts as progress (0.02: 2%
            below the best); with exact match, one more answer right always does.
    """

    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    min_steps: int = 0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    precision: str = "auto"
    seq_len: int = 512
    packing: bool = True
    overlong: str = "truncate"
    gradient_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    output_dir: str = "runs/default"
    seed: int = 0
    logger: str = "none"
    resume: bool = False
    loss_chunk: int = 1024
    loraplus_lr_ratio: float = 1.0
    dpo_beta: float = 0.1
    validation_split: float = 0.0
    validate_every: int = 0
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{field} must be {allowed}, got {getattr(self, field)!r}")

        def number(field: str, allowed: str, ok: Callable[[float], bool], optional: bool = False) -> None:
            # Checked for type and finiteness first: a YAML `null` or string would raise TypeError in the
            # comparison, and `inf` epochs an OverflowError in ceil() much later (the fuzzer found both).
            value = getattr(self, field)
            if optional and value is None:
                return
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            check(is_number and math.isfinite(value) and ok(value), field,
                  f"{'None or ' if optional else ''}{allowed} (a finite number)")

        number("learning_rate", "> 0", lambda v: v > 0)
        number("weight_decay", ">= 0", lambda v: v >= 0)
        for name in ("batch_size", "grad_accum", "seq_len", "log_every", "keep_checkpoints", "loss_chunk"):
            value = getattr(self, name)
            check(type(value) is int and value >= 1, name, "an integer >= 1")
        for name in ("eval_every", "save_every", "validate_every", "early_stopping_patience", "min_steps"):
            value = getattr(self, name)
            check(type(value) is int and value >= 0, name, "an integer >= 0")
        number("epochs", "> 0", lambda v: v > 0)
        check(self.max_steps is None or (type(self.max_steps) is int and self.max_steps >= 1), "max_steps",
              "None or an integer >= 1")
        number("warmup_ratio", "in [0, 1)", lambda v: 0 <= v < 1)
        check(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        number("min_lr_ratio", "in [0, 1]", lambda v: 0 <= v <= 1)
        number("max_grad_norm", "> 0", lambda v: v > 0, optional=True)
        number("loraplus_lr_ratio", "> 0", lambda v: v > 0)
        number("dpo_beta", "> 0", lambda v: v > 0)
        number("validation_split", ">= 0, a fraction below 1 or a whole count",
               lambda v: v >= 0 and (v < 1 or float(v).is_integer()))
        number("early_stopping_min_delta", "in [0, 1) (a fraction of the best validation loss)",
               lambda v: 0 <= v < 1)
        if self.early_stopping_patience and not self.validation_split:
            raise ValueError(f"TrainConfig.early_stopping_patience={self.early_stopping_patience} needs a validation "
                             f"slice: set validation_split (e.g. 0.05), or early_stopping_patience=0 to train "
                             f"without one")
        check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        check(self.overlong in ("truncate", "drop"), "overlong", "'truncate' or 'drop'")
        check(self.logger in LOGGERS, "logger", f"one of {LOGGERS}")
        check_installed(self.logger)  # now, not after the model is loaded and evaluated
        for name in ("packing", "gradient_checkpointing", "resume"):
            check(isinstance(getattr(self, name), bool), name, "true or false")
        check(isinstance(self.output_dir, (str, os.PathLike)) and str(self.output_dir) != "", "output_dir",
              "a folder path")
        check(type(self.seed) is int, "seed", "an integer")

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    eval_loss: float | None
    perplexity: float | None
    tokens_per_second: float
    peak_memory_bytes: int
    train_seconds: float
    exact_match: float | None = None
    interrupted: bool = False
    checkpoint: str | None = None
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # all of the final evaluate()
    best_step: int | None = None  # with a validation split: the step whose weights were kept
    validation_loss: float | None = None  # ... and its validation loss
    validation_exact_match: float | None = None  # ... and, judged by exact match, the share of the slice it got
    stopped_early: bool = False


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear warm-up, then the schedule's decay."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


# What a resumed run must share with the checkpoint's (the batch shape and length, and so min_steps' effect, are
# checked by Checkpoints.load): the steps' data order, optimizer, schedule and loss.
RUN_SETTINGS = ("seed", "learning_rate", "weight_decay", "loraplus_lr_ratio", "schedule", "warmup_ratio",
                "min_lr_ratio", "max_grad_norm", "seq_len", "packing", "overlong", "dpo_beta")
# ... and, where the run has a validation slice, what early stopping decides by: another rule would stop elsewhere
VALIDATION_SETTINGS = ("validation_split", "validate_every", "early_stopping_patience", "early_stopping_min_delta")
