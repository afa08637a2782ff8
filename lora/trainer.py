"""TrainConfig and Trainer: one readable loop on accelerate (devices, precision, processes).

The loop, top to bottom: build rows (packed or single examples) -> for each optimizer step, set the learning rate,
take ``batch_size x grad_accum`` rows per process -> sum token losses over the whole window and divide by the number
of target tokens in the window (all processes together decide whether it is finite) -> clip -> step -> log /
evaluate / validate (early stopping) / checkpoint. What is differentiated lives in :mod:`lora.objective`,
checkpoints in :mod:`lora.checkpoint`, evaluation in :mod:`lora.evaluate`, early stopping in
:mod:`lora.early_stopping`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_io import check_adapter_folder, save_adapter
from .attention import packed_rows, use_packed_attention
from .checkpoint import (Checkpoints, RunShape, gather_rng, is_sharded, optimizer_state, rng_state,
                         whole_parameters)
from .data import IGNORE, collate, join_rows, pack
from .early_stopping import EarlyStopping, split_validation
from .evaluate import evaluate
from .generate import exact_match
from .inject import adapters_of
from .layers import is_linear_like
from .objective import BatchLoss, packing_gap

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HALF = (torch.float16, torch.bfloat16)
SCHEDULES = ("cosine", "linear", "constant")
LOGGERS = ("none", "tensorboard")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. A recipe's YAML keys are exactly these fields (plus the recipe's own and LoraConfig's).

    Args:
        learning_rate: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay on the trainable parameters.
        batch_size: Rows per micro-batch and process (a row is one packed sequence, or one example).
        grad_accum: Micro-batches per optimizer step.
        epochs: Passes over the training rows (may be fractional); ignored when ``max_steps`` is set.
        max_steps: Optimizer steps to run, overriding ``epochs``.
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
        logger: ``"tensorboard"`` to write TensorBoard scalars (through accelerate's trackers), or ``"none"``.
        resume: Continue from the newest checkpoint in ``output_dir`` if there is one.
        loss_chunk: Target positions per chunk when applying the output head and cross-entropy.
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): the B matrices learn at this multiple of the learning rate
            (the paper suggests about 16); 1.0 is plain LoRA.
        dpo_beta: DPO's beta, for preference data (pairs from :func:`lora.dpo.load_preferences`): how far the
            policy may move from the reference, which is the same model with its adapters off.
        validation_split: Training examples held out (seeded) to measure a validation loss during training: a
            fraction below 1 (0.05), or a count (40); 0 for none. Never taken from the eval data.
        validate_every: Compute the validation loss every N steps (and after the last).
        early_stopping_patience: Stop once this many validation losses in a row failed to beat the best by more
            than ``early_stopping_min_delta``, and keep the weights of the best one (0: never stop early; with a
            validation split, the best weights are still the ones kept).
        early_stopping_min_delta: The improvement of the validation loss that counts as one.
    """

    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
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
        for name in ("eval_every", "save_every", "validate_every", "early_stopping_patience"):
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
        number("early_stopping_min_delta", ">= 0", lambda v: v >= 0)
        if self.validation_split and not self.validate_every:
            raise ValueError(f"TrainConfig.validation_split={self.validation_split} needs validate_every >= 1 (how "
                             f"often to compute the validation loss), got 0")
        if self.early_stopping_patience and not (self.validation_split and self.validate_every):
            raise ValueError(f"TrainConfig.early_stopping_patience={self.early_stopping_patience} needs a validation "
                             f"loss: set validation_split (e.g. 0.05) and validate_every (e.g. 2)")
        check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        check(self.overlong in ("truncate", "drop"), "overlong", "'truncate' or 'drop'")
        check(self.logger in LOGGERS, "logger", f"one of {LOGGERS}")
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


def _mixed_precision(precision: str) -> str:
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"  # CPU: bf16 matmuls are hundreds of times slower than fp32 there
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _configure_deepspeed(accelerator: Any, cfg: TrainConfig) -> None:
    """Make DeepSpeed's engine accumulate ``grad_accum`` micro-batches per step and clip as the config says.

    accelerate's DeepSpeed backward steps the engine whenever ``sync_gradients`` is True; the trainer sets it only
    on the last micro-batch of a window, and the engine must agree on the window's length (it divides each
    micro-batch's loss by it) and own clipping (our clip_grad_norm_ cannot reach its partitioned gradients).
    The TrainConfig wins over an accelerate config file's values, so that one setting means one thing everywhere.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds.pop("train_batch_size", None)  # DeepSpeed derives it: micro-batch x accumulation x processes
    ds["gradient_clipping"] = cfg.max_grad_norm or 0.0  # 0: no clipping
    ds["zero_allow_untested_optimizer"] = True  # our AdamW, built from the LoRA parameters (and LoRA+ groups)
    accelerator.gradient_accumulation_steps = cfg.grad_accum  # else accelerate warns and takes DeepSpeed's


def _check_lengths(examples: list[dict], seq_len: int) -> None:
    """Refuse examples longer than ``seq_len`` (packed or padded): cutting or dropping them is the loader's job."""
    lengths = [max(len(ex[k]["input_ids"]) for k in ("chosen", "rejected")) if "chosen" in ex else len(ex["input_ids"])
               for ex in examples]
    over = [n for n in lengths if n > seq_len]
    if over:
        loader = ("load the pairs with lora.dpo.load_preferences(..., max_length=seq_len)" if "chosen" in examples[0]
                  else "load the data with max_length=seq_len (lora.load_dataset then truncates or drops them, as "
                       "overlong says)")
        raise ValueError(f"{len(over)} training example(s) are longer than seq_len={seq_len} tokens (the longest: "
                         f"{max(over)}); {loader}, or raise seq_len")


# What a resumed run must share with the checkpoint's (the batch shape and length are checked by Checkpoints.load,
# validation by EarlyStopping): the steps' data order, optimizer, schedule and loss.
_RUN_SETTINGS = ("seed", "learning_rate", "weight_decay", "loraplus_lr_ratio", "schedule", "warmup_ratio",
                 "min_lr_ratio", "max_grad_norm", "seq_len", "packing", "overlong", "dpo_beta")


def _check_output_dir(path: Path) -> None:
    """Refuse an ``output_dir`` that is a file or lies under one, before any training (not at the first checkpoint,
    minutes or hours in: the fuzzer's ``output_dir=notes.txt/run``)."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"output_dir {str(path)!r}: {folder} is a file; pass an output_dir that is a folder "
                                 f"(or a new path)")
            return


def _upcast_trainable(model: nn.Module, mixed_precision: str, precision: str) -> None:
    """Keep every trainable parameter in fp32, whatever the model's dtype; autocast still runs the matmuls in half.

    A trainable bias or ``modules_to_save`` head follows the model's dtype otherwise (issue 9): under fp16 the grad
    scaler refuses to unscale fp16 gradients, and in bf16 an update below 1/256 of the weight rounds away.
    """
    half = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dtype in HALF]
    if not half:
        return
    if mixed_precision == "no":  # no autocast: fp32 weights would meet half-precision activations
        name, dtype = half[0][0], half[0][1].dtype
        raise ValueError(f"trainable parameters such as {name!r} are {dtype}, and precision={precision!r} trains "
                         f"without autocast, where their fp32 copies cannot meet the model's {dtype} activations; "
                         f"set precision='bf16' (or 'fp16'), or load the model in float32")
    upcast = {id(p) for _, p in half}
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.dtype in HALF]
        if not is_linear_like(module) and any(id(p) in upcast for p in own):
            # Autocast casts a linear layer's weight and bias itself, but not a LayerNorm's: one whose bias trains
            # needs its (small, frozen) weight in fp32 too.
            upcast.update(id(p) for p in own)
    for p in model.parameters():
        if id(p) in upcast:
            p.data = p.data.float()  # in place: the module, tied weights and the optimizer keep the same Parameter



class _CtrlC:
    """While active, Ctrl-C (SIGINT) only sets ``requested``; the training loop stops at the next step boundary.

    A KeyboardInterrupt raised mid-step can land between ``optimizer.step()`` and ``self.step += 1``, which saved
    updated weights under the old step number and made resume apply that step twice (issue 9). A second Ctrl-C
    stops at once, without a checkpoint (the last one written stays).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers only there
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step (press it again to stop at once, without a checkpoint)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._installed:  # a handler set outside Python reads as None and cannot be put back: use the default
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)


class Trainer:
    """Fine-tunes the trainable parameters of ``model`` (typically after :func:`lora.inject`).

    Args:
        model: The model; only parameters with ``requires_grad`` are optimized.
        config: A :class:`TrainConfig`.
        train_data: Tokenized examples from :func:`lora.data.load_dataset` (``input_ids`` + ``targets``, or
            ``input_ids`` + ``label`` for classification with a sequence-classification model).
        eval_data: Examples of the same kind for evaluation loss/perplexity (or accuracy for classification).
        exact_match_data: ``(prompts, answers)``: evaluation also answers the prompts (strings, or conversations
            before the answer) greedily and reports the fraction equal to the answers (needs ``tokenizer``); see
            :func:`lora.data.prompts_and_answers`.
        tokenizer: The model's tokenizer, for ``exact_match_data``.
        exact_match_max_new_tokens: Tokens generated per prompt for exact match (default: the longest answer plus
            4, see :func:`lora.generate.exact_match`).
        pad_id: Padding token id (default: the model config's ``pad_token_id``, else 0).
        adapter: The adapter saved in checkpoints.
        callbacks: Called as ``fn(trainer, step, metrics)`` after every optimizer step; one that raises
            KeyboardInterrupt stops training as Ctrl-C does.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: list[dict],
                 eval_data: list[dict] | None = None,
                 exact_match_data: tuple[list, list[str]] | None = None, tokenizer=None,
                 pad_id: int | None = None, adapter: str = "default",
                 callbacks: list[Callable[["Trainer", int, dict], None]] | None = None,
                 exact_match_max_new_tokens: int | None = None):
        from accelerate import Accelerator

        self.cfg = config
        self.adapter = adapter
        self.callbacks = list(callbacks or [])
        self.output_dir = Path(config.output_dir)
        _check_output_dir(self.output_dir)
        if not train_data:
            raise ValueError("train_data is empty")
        first = train_data[0]
        self.task = "classification" if "label" in first else "preference" if "chosen" in first else "lm"
        adapter_cfg = adapters_of(model)[adapter].config if adapter in adapters_of(model) else None
        if self.task == "preference" and adapter_cfg is not None and adapter_cfg.bias != "none":
            # DPO's reference is the model with its adapters off; a bias trained in place would move it too
            raise ValueError(f"DPO compares against the base model (adapters switched off), and bias="
                             f"{adapter_cfg.bias!r} trains the base's own biases, so the reference would drift "
                             f"as training goes; inject the adapter with bias='none' for preference data")
        self.classification = self.task == "classification"
        _check_lengths(train_data, config.seq_len)
        if pad_id is None:
            pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.pad_id = 0 if pad_id is None else int(pad_id)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters; call lora.inject(model, cfg) first")
        if exact_match_data is not None and tokenizer is None:
            raise ValueError("exact_match_data needs the model's tokenizer: Trainer(..., tokenizer=tokenizer)")
        self.exact_match_data = exact_match_data
        self.exact_match_max_new_tokens = exact_match_max_new_tokens
        self.tokenizer = tokenizer
        self.eval_data = eval_data

        mixed_precision = _mixed_precision(config.precision)
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision,
            log_with="tensorboard" if config.logger == "tensorboard" else None,
            project_dir=str(self.output_dir))
        self.deepspeed = self.accelerator.distributed_type == "DEEPSPEED"
        if self.deepspeed:
            _configure_deepspeed(self.accelerator, config)
        self.validation_data: list[dict] = []
        if config.validation_split:
            train_data, self.validation_data = split_validation(train_data, config.validation_split, config.seed)
        self.early_stopping = EarlyStopping(config.early_stopping_patience or math.inf,
                                            config.early_stopping_min_delta) if config.validation_split else None
        _upcast_trainable(model, mixed_precision, config.precision)
        if config.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError("gradient_checkpointing=True needs a Hugging Face model "
                                 "(gradient_checkpointing_enable); turn it off for this model")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # LoRA+: B in a group of its own at loraplus_lr_ratio x the learning rate; "lr_ratio" scales the schedule.
        groups = [{"params": [p for n, p in trainable if ".lora_B." not in n], "lr_ratio": 1.0},
                  {"params": [p for n, p in trainable if ".lora_B." in n], "lr_ratio": config.loraplus_lr_ratio}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.model = model
        # The objective itself, whose parts probes and evaluation call; accelerate's wrapper of it (DDP/FSDP/
        # DeepSpeed) is what training calls, and what evaluation runs inside when the parameters are shards.
        self.objective = BatchLoss(model, self.task, config.loss_chunk, config.dpo_beta)
        self.loss_module, self.optimizer = self.accelerator.prepare(self.objective, self.optimizer)
        self.world = self.accelerator.num_processes
        self.sharded = is_sharded(model) or self._zero3()  # FSDP2 or ZeRO-3: parameters gathered only in forward
        if self.early_stopping is not None and self.sharded:
            raise ValueError("validation_split (early stopping) keeps a copy of the best trainable weights, which "
                             "FSDP and DeepSpeed ZeRO-3 hold as shards; use DDP or ZeRO-2, or set validation_split=0")
        if self.world > 1 and self.accelerator.distributed_type == "NO":
            # Seen with DeepSpeed or FSDP requested on a machine accelerate gives no backend for (CPU only): the
            # processes would each train on their share of the rows alone, and nothing would average them.
            raise ValueError(f"{self.world} processes were started, but accelerate set up no distributed training "
                             f"(distributed_type NO), so their gradients would never be averaged; check the "
                             f"accelerate config (distributed_type, the backend) or launch one process")
        if self.task != "classification":
            self._check_shortcut(train_data)
        wants_packing = config.packing and self.task == "lm"
        # the attention route is chosen before the packing probe, which then checks it too
        per_example = wants_packing and use_packed_attention(model)
        self.packing = wants_packing and self._packing_is_exact(model, train_data)
        # with attention per example, a micro-batch's packed rows run as one row without their padding tails
        self.joins_rows = self.packing and per_example
        self.rows = pack(train_data, config.seq_len, self.pad_id) if self.packing else train_data
        self.rows_per_step = config.batch_size * config.grad_accum * self.world
        # the last step of an epoch takes the rows left over, so every row is trained on in every epoch
        self.steps_per_epoch = max(1, math.ceil(len(self.rows) / self.rows_per_step))
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.checkpoints = Checkpoints(self.output_dir / "checkpoints", config.keep_checkpoints)
        self.step = 0
        self.history: list[dict] = []
        self._rng_at_step: dict | None = None  # RNG state at the last step boundary, for exact resume

    def _zero3(self) -> bool:
        return self.deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    # -- what this model allows, decided once ---------------------------------------------------------------------
    def _agreed(self, ok: bool) -> bool:
        """True only if every process found ``ok``: processes must train the same way."""
        return not self._on_any_process(not ok)

    def _check_shortcut(self, train_data: list[dict]) -> None:
        """Compute the loss through ``head(hidden states)`` only where that equals the model's own logits."""
        batch = self._batch(train_data[:2])
        with self.accelerator.autocast():
            exact, gap = self.run_whole(lambda: self.objective.check_shortcut(batch))
        if self._agreed(exact):
            self.objective.parts = self.objective.candidate
        elif self.objective.candidate is not None and not math.isnan(gap):
            self.accelerator.print(f"loss from full logits: {type(self.model).__name__}'s logits are not its head's "
                                   f"output (max relative gap {gap:.1e}; soft-capping or scaling), so the memory-"
                                   f"saving loss path is off")

    def _packing_is_exact(self, model: nn.Module, train_data: list[dict]) -> bool:
        """Pack only if this model keeps packed examples apart: their losses must equal those of padded rows."""
        if "position_ids" not in self.objective.takes:
            # Packed examples are kept apart by positions that restart; a forward without position_ids would let
            # them attend to each other.
            self.accelerator.print(f"packing off: {type(model).__name__}.forward takes no position_ids, so packed "
                                   f"examples would attend to each other; training on padded rows")
            return False
        with self.accelerator.autocast():
            gap = self.run_whole(lambda: packing_gap(self.objective, train_data, self.cfg.seq_len, self.pad_id))
        # Kept apart, fp32 agrees to ~1e-7 (the families in tests/test_families.py); half precision rounds each
        # token's loss by ~1e-2 of it, which averages to less. Examples that see each other are ~1e-1 off.
        tolerance = 1e-3 if self.accelerator.mixed_precision == "no" else 2e-2
        if self._agreed(gap is None or gap <= tolerance):
            return True
        self.accelerator.print(f"packing off: packed examples' token losses differ from padded ones by {gap:.1e} of "
                               f"the mean loss ({type(model).__name__} does not keep packed examples apart); "
                               f"training on padded rows")
        return False

    # -- losses -------------------------------------------------------------------------------------------------------
    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed loss of a micro-batch and the number of terms in it (target tokens, or examples)."""
        return self.loss_module(batch), self._terms(batch)

    def _batch(self, rows: list[dict], packed: bool = False) -> dict[str, torch.Tensor]:
        """One micro-batch on the device; ``packed``: ``rows`` come from :func:`lora.data.pack`."""
        if self.classification:
            batch = collate([{"input_ids": r["input_ids"], "targets": r["input_ids"]} for r in rows], self.pad_id)
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
            batch = {"input_ids": batch["input_ids"], "attention_mask": mask, "real_tokens": batch["real_tokens"],
                     "labels": torch.tensor([r["label"] for r in rows])}
        elif self.task == "preference":  # the chosen completions, then the rejected ones, row for row
            batch = collate([r["chosen"] for r in rows] + [r["rejected"] for r in rows], self.pad_id)
            batch["pairs"] = torch.tensor(len(rows))
        else:
            batch = collate([join_rows(rows)] if packed and self.joins_rows else rows, self.pad_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _terms(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss terms a batch holds: examples for classification, pairs for preferences, else target
        tokens."""
        if "padding" in batch:
            return 0
        if self.task == "preference":
            return int(batch["pairs"])
        return len(batch["labels"]) if self.classification else int((batch["targets"] != IGNORE).sum())

    def evaluate(self, data: list[dict] | None = None) -> dict[str, float]:
        """Mean loss and perplexity over ``data`` (default: the eval data); accuracy for classification; exact
        match when the trainer has ``exact_match_data``; for preference pairs, ``preference_accuracy`` and
        ``reward_margin`` (see :func:`lora.evaluate.evaluate`).

        Every process evaluates all of ``data``: under FSDP or ZeRO-3 the forward gathers weights from all of
        them, so all must run it, and the same number of times.
        """
        result = {}
        if self.exact_match_data is not None:
            prompts, answers = self.exact_match_data
            result["exact_match"] = self.run_whole(lambda: exact_match(
                self.model, self.tokenizer, prompts, answers, self.exact_match_max_new_tokens))[0]
        data = self.eval_data if data is None else data
        if data:
            result.update(self._losses(data))
        return result

    @torch.no_grad()
    def run_whole(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` (evaluation, generation, a probe), with the model whole: under FSDP2 and DeepSpeed ZeRO-3 it
        runs inside the wrapped objective's forward, where they gather the parameters they shard, and is a
        collective (every process calls it and runs the same forwards inside). Otherwise it is just ``fn()``.
        """
        return self.loss_module(inside=fn) if self.sharded else fn()

    def _losses(self, data: list[dict]) -> dict[str, float]:
        """:func:`lora.evaluate.evaluate`'s metrics over ``data``, in packed rows when training packs (the same
        per-token mean, with less padding and attention work)."""
        packed = self.packing and all(len(e["input_ids"]) <= self.cfg.seq_len for e in data)
        rows = pack(data, self.cfg.seq_len, self.pad_id) if packed else data
        size = self.cfg.batch_size
        with packed_rows(packed):
            return self.run_whole(lambda: evaluate(
                self.objective, (self._batch(rows[i:i + size], packed) for i in range(0, len(rows), size)),
                self.accelerator.autocast))

    def validation_loss(self) -> float:
        """Mean loss per target token on the validation slice."""
        return self._losses(self.validation_data)["eval_loss"]

    # -- data order ---------------------------------------------------------------------------------------------------
    def _step_rows(self, step: int) -> list[list[dict]]:
        """This process's micro-batches (lists of rows) for optimizer step ``step``; a fresh seeded shuffle every
        epoch."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        start = index * self.rows_per_step
        chosen = [self.rows[i] for i in order[start:start + self.rows_per_step].tolist()]
        mine = chosen[self.accelerator.process_index::self.world]
        return [mine[i:i + self.cfg.batch_size] for i in range(0, len(mine), self.cfg.batch_size)]

    def _window(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches this process runs for optimizer step ``step``: its own, then padding up to the count
        of the process with the most.

        With fewer rows in a step than processes x batch_size x grad_accum (a small data set), some process would
        have fewer micro-batches, or none, and skip a forward/backward that the others wait on in a collective
        (DDP's gradient all-reduce, FSDP's all-gathers): the run hangs. Padding micro-batches run forward and
        backward like the others with weight 0, so they add nothing to gradients, loss or token counts.
        """
        rows = self._step_rows(step)
        index = step % self.steps_per_epoch
        in_step = min(len(self.rows) - index * self.rows_per_step, self.rows_per_step)  # the epoch's last: fewer
        # rank 0 gets the most: ceil(in_step / world) rows
        most = math.ceil(math.ceil(in_step / self.world) / self.cfg.batch_size)
        batches = [self._batch(r, self.packing) for r in rows]
        for _ in range(most - len(batches)):
            batches.append({**self._batch(self.rows[:1], self.packing), "padding": torch.tensor(True)})
        return batches

    # -- the loop -----------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run to ``total_steps`` (resuming first if ``resume``); returns the metrics of the run.

        Ctrl-C (or a KeyboardInterrupt raised by a callback) stops cleanly at the end of the step under way, on
        every process together: that state is checkpointed and the result says ``interrupted=True``;
        ``resume=True`` then continues exactly where it stopped. A second Ctrl-C stops at once, without a
        checkpoint.
        """
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        latest = self.latest_checkpoint() if cfg.resume else None
        if latest is not None:
            self._resume(latest)
        else:
            if not cfg.resume:
                self._set_earlier_run_aside()
            torch.manual_seed(cfg.seed)  # dropout draws
        if cfg.logger == "tensorboard":
            acc.init_trackers("lora", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                              if isinstance(v, (int, float, str, bool))})
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not acc.is_main_process, desc="train",
                   dynamic_ncols=True)
        self.loss_module.train()  # the wrapped BatchLoss; .train() reaches the model inside
        start_time, tokens_seen, interrupted, last_loss = time.perf_counter(), 0, False, None
        self._rng_at_step = rng_state()
        with _CtrlC() as ctrl_c, bar:
            while self.step < self.total_steps and not self._stopped_early():
                last_loss, tokens = self._optimizer_step()
                tokens_seen += tokens
                self.step += 1
                self._rng_at_step = rng_state()

                elapsed = time.perf_counter() - start_time
                metrics = {"loss": last_loss, "lr": self.optimizer.param_groups[0]["lr"],
                           "tokens_per_second": tokens_seen / max(elapsed, 1e-9)}
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    metrics.update(self.evaluate())
                if self.early_stopping is not None and (self.step % cfg.validate_every == 0
                                                        or self.step == self.total_steps):
                    metrics["validation_loss"] = self._validate()
                self.history.append({"step": self.step, **metrics})
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{metrics['tokens_per_second']:.0f}")
                    if cfg.logger == "tensorboard":
                        acc.log(metrics, step=self.step)
                bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    try:
                        callback(self, self.step, metrics)
                    except KeyboardInterrupt:  # a callback's interrupt counts as a Ctrl-C
                        ctrl_c.requested = True
                # Decided by all processes together, or the one that stops leaves the others waiting forever in
                # the next step's collectives.
                if self._on_any_process(ctrl_c.requested):
                    interrupted = True
                    break
        train_seconds = time.perf_counter() - start_time
        if self.early_stopping is not None and not interrupted:
            self._keep_best()
        checkpoint = self.save_checkpoint()
        final = {} if interrupted else self.evaluate()
        if cfg.logger == "tensorboard":
            if final:
                acc.log(final, step=self.step)
            acc.end_training()
        if acc.is_main_process and self.history:
            self.plot_loss_curve(self.output_dir / "loss_curve.png")
        return TrainResult(steps=self.step, train_loss=last_loss, eval_loss=final.get("eval_loss"),
                           perplexity=final.get("perplexity"), exact_match=final.get("exact_match"),
                           tokens_per_second=tokens_seen / max(train_seconds, 1e-9),
                           peak_memory_bytes=_peak_memory_bytes(acc.device), train_seconds=train_seconds,
                           interrupted=interrupted, checkpoint=str(checkpoint) if checkpoint else None,
                           eval_metrics=final, stopped_early=self._stopped_early(),
                           **({} if self.early_stopping is None else {
                               "best_step": self.early_stopping.best_step,
                               "validation_loss": self.early_stopping.state()["best_loss"]}))

    def _optimizer_step(self) -> tuple[float, int]:
        """Set the learning rate, accumulate the gradients of step ``self.step``'s window, clip, step; returns the
        window's mean loss and its real tokens (all processes)."""
        cfg = self.cfg
        # The learning rate is set before the window: under DeepSpeed the engine steps inside the last
        # micro-batch's backward.
        factor = lr_factor(self.step, self.total_steps, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate * group["lr_ratio"] * factor
        window_loss, window_terms, tokens = self._backward_window(self._window(self.step))
        if cfg.max_grad_norm is not None and not self.deepspeed:  # DeepSpeed's engine clips itself
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return window_loss / max(window_terms, 1), tokens

    def _backward_window(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int, int]:
        """Accumulate the gradients of one optimizer step; returns (summed loss, loss terms, real tokens), global.

        The window's loss is (sum of all its token losses) / (its target tokens over all processes): averaging per
        micro-batch, as transformers' Trainer long did, weights a short example's tokens more than a long one's.

        Whether the loss is finite is decided by all processes together, after the last micro-batch's forward and
        before its backward (where gradients are all-reduced and DeepSpeed steps): a process that stopped alone
        would leave the others waiting in that all-reduce forever.

        Raises:
            FloatingPointError: the loss of the window is NaN or infinite on any process.
        """
        acc = self.accelerator
        local_terms = sum(self._terms(b) for b in micro_batches)
        window_terms = int(acc.reduce(torch.tensor(local_terms, device=acc.device), "sum"))
        # DDP averages gradients over processes: multiplying by world makes it the global mean. DeepSpeed also
        # divides every micro-batch's loss by its gradient_accumulation_steps, which we set to grad_accum.
        scale = self.world * (self.cfg.grad_accum if self.deepspeed else 1) / max(window_terms, 1)
        local_loss, tokens = 0.0, 0
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            padding = "padding" in batch
            # sync_gradients: accelerate's DeepSpeed backward steps the engine only when it is True (issue 11)
            acc.sync_gradients = last
            try:
                with (contextlib.nullcontext() if last else acc.no_sync(self.loss_module),
                      packed_rows(self.packing and "attention_mask" not in batch)):
                    with acc.autocast():
                        loss_sum = self.loss_module(batch)
                    if not padding:
                        local_loss += float(loss_sum.detach())  # NaN and inf carry through the sum
                        tokens += int(batch["real_tokens"])
                    if last:  # one collective for the loss, the tokens and the decision to stop
                        totals = acc.reduce(torch.tensor([local_loss, float(tokens)], dtype=torch.float64,
                                                         device=acc.device), "sum")
                        window_loss, tokens = float(totals[0]), int(totals[1])
                        if not math.isfinite(window_loss):
                            self._stop_non_finite(window_loss)
                    acc.backward(loss_sum * (0.0 if padding else scale))
            finally:
                acc.sync_gradients = True
        return window_loss, window_terms, tokens

    # -- early stopping -----------------------------------------------------------------------------------------------
    def _validate(self) -> float:
        """The validation loss at this step; early stopping decides on it, every process the same way."""
        loss, early = self.validation_loss(), self.early_stopping
        early.stopped = self._on_any_process(early.update(self.step, loss, self.model))  # all stop, or none
        if early.stopped:
            self.accelerator.print(
                f"early stop at step {self.step}: the validation loss has not beaten the best by more than "
                f"{self.cfg.early_stopping_min_delta} for {self.cfg.early_stopping_patience} evaluation(s) in a row; "
                f"best {early.best_loss:.4f} at step {early.best_step}")
        return loss

    def _set_earlier_run_aside(self) -> None:
        """A fresh run (``resume=False``) in an ``output_dir`` that holds an earlier run's checkpoints moves them
        aside first: otherwise rotation would keep the earlier run's higher steps over this run's, and a later
        ``resume=True`` would continue the earlier run. Aside, not deleted: a re-run that meant resume=True can
        still get them back."""
        acc = self.accelerator
        if acc.is_main_process:
            moved, aside = self.checkpoints.set_aside()
            if moved:
                names = ", ".join(p.name for p in moved)
                print(f"{self.checkpoint_dir()} held an earlier run's checkpoints ({names}): moved to {aside}, as "
                      f"this run starts afresh (resume=False). To continue that run instead, move them back and pass "
                      f"resume=True; to keep both runs, give each its own output_dir", flush=True)
        acc.wait_for_everyone()

    def _keep_best(self) -> None:
        """End of training: put back the weights of the step with the best validation loss."""
        early = self.early_stopping
        if early.best_step != self.step and early.restore_best(self.model):
            self.accelerator.print(f"kept the weights of step {early.best_step} (validation loss "
                                   f"{early.best_loss:.4f})")

    def _stopped_early(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.stopped

    def _on_any_process(self, flag: bool) -> bool:
        """``flag`` OR-ed over all processes, so that a decision to stop is the same everywhere."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return flag
        return bool(acc.reduce(torch.tensor(int(flag), device=acc.device), "sum") > 0)

    def _stop_non_finite(self, value: float) -> None:
        """A NaN/inf loss (decided by all processes): keep the last good state as a checkpoint and stop.

        The state before this step is saved if the weights are still finite on every process, else the newest
        checkpoint is named; every process raises the same error.
        """
        self.optimizer.zero_grad(set_to_none=True)
        weights_ok = all(bool(torch.isfinite(p).all()) for p in self.model.parameters() if p.requires_grad)
        if not self._on_any_process(not weights_ok):
            kept = self.save_checkpoint()
        else:
            kept = self._main_process_value(self.latest_checkpoint())
        raise FloatingPointError(
            f"the training loss became {value} at step {self.step + 1}; training stopped. The last good state is "
            f"in {kept or 'no checkpoint (none was written before the failure)'}. Lower learning_rate, keep "
            f"max_grad_norm set, or check the data; resume=True continues from that checkpoint")

    def _main_process_value(self, value: Any) -> Any:
        """The main process's ``value`` on every process (a path it alone may see, on another machine's disk)."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    # -- checkpoints (lora/checkpoint.py) ----------------------------------------------------------------------------
    def checkpoint_dir(self) -> Path:
        return self.checkpoints.folder

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints.latest()

    def _shape(self) -> RunShape:
        return RunShape(self.total_steps, self.world, self.cfg.batch_size, self.cfg.grad_accum, self.steps_per_epoch)

    def save_checkpoint(self) -> Path:
        """Write adapter + optimizer + RNG + data position for the current step, atomically; keep the newest N.

        Called by every process together (each one's RNG state is gathered); the main process writes. Returns the
        checkpoint's folder on every process.
        """
        acc = self.accelerator
        rng = self._rng_at_step or rng_state()
        rng_tensors = gather_rng(acc, rng)  # a collective: before any process returns
        final = self.checkpoint_dir() / f"step-{self.step:07d}"
        # DeepSpeed's ZeRO keeps the optimizer state partitioned inside its engine, out of reach. FSDP2's moments
        # are shards: every process gathers them (a collective) before the main process writes.
        optim_state = None
        if not self.deepspeed and (acc.is_main_process or self.sharded):
            optim_state = optimizer_state(self.optimizer, {id(p): n for n, p in self.model.named_parameters()
                                                           if p.requires_grad})
        with whole_parameters(self.loss_module):  # FSDP: every process gathers, the main one writes whole tensors
            if acc.is_main_process:
                early = self.early_stopping
                self.checkpoints.save(self.step, self.model, optim_state, self.adapter, rng, rng_tensors, {
                    "total_steps": self.total_steps, "shape": dataclasses.asdict(self._shape()),
                    "history": self.history, "config": dataclasses.asdict(self.cfg),
                    **({} if early is None else {"early_stopping": early.state()})},
                    best_weights=None if early is None else early.best_weights)
        acc.wait_for_everyone()  # every process returns once the checkpoint is complete
        return final

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Save the adapter as a PEFT folder at ``path``, whole even when FSDP or ZeRO-3 shard it.

        Every process calls it (the shards are gathered from all of them); the main process writes. Returns the
        folder on every process.
        """
        check_adapter_folder(path)  # on every process, before any of them gathers
        with whole_parameters(self.loss_module):
            folder = save_adapter(self.model, path, self.adapter) if self.accelerator.is_main_process else None
        self.accelerator.wait_for_everyone()
        return self._main_process_value(folder)

    def _resume(self, latest: Path) -> None:
        """Load the trainable weights, optimizer, RNG states and position saved in checkpoint ``latest``."""
        self._check_same_settings(latest)
        state = Checkpoints.load(latest, self.model, self.optimizer, self._shape(), self.accelerator.process_index)
        self.step, self.history = state["step"], state["history"]
        if self.early_stopping is not None:
            self.early_stopping.load(state["early_stopping"], state["best_weights"])

    def _check_same_settings(self, latest: Path) -> None:
        """Refuse to resume under settings that change what the steps compute: a resumed run repeats the
        interrupted one exactly, and the saved optimizer groups would otherwise keep some old values silently."""
        state = json.loads((latest / "trainer_state.json").read_text())
        if self.early_stopping is not None and "early_stopping" not in state:
            raise ValueError(f"checkpoint {latest} was written without a validation split, and this run has "
                             f"validation_split={self.cfg.validation_split}; resume with the same settings, or "
                             f"set resume=False")
        saved, now = state.get("config", {}), dataclasses.asdict(self.cfg)
        changed = [key for key in _RUN_SETTINGS if key in saved and saved[key] != now[key]]
        if changed:
            then = ", ".join(f"{k}={saved[k]!r}" for k in changed)
            raise ValueError(f"checkpoint {latest} was written with {then}; this run has "
                             f"{', '.join(f'{k}={now[k]!r}' for k in changed)}. Resume with the "
                             f"checkpoint's settings, or set resume=False to start afresh")

    def plot_loss_curve(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [h["loss"] for h in self.history], label="train loss")
        evals = [h for h in self.history if "eval_loss" in h]
        if evals:
            ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)



__all__ = ["TrainConfig", "Trainer", "TrainResult", "lr_factor"]
