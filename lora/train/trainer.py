"""The Trainer: one readable loop on accelerate (devices, precision, processes).

The loop, top to bottom: build rows (packed or single examples) -> for each optimizer step, set the learning rate,
take ``batch_size x grad_accum`` rows per process -> sum token losses over the whole window and divide by the number
of target tokens in the window (all processes together decide whether it is finite) -> clip -> step -> log /
evaluate / validate (early stopping) / checkpoint. Its neighbours do the rest: what is differentiated lives in
:mod:`~lora.train.objective`, the micro-batches in :mod:`~lora.train.batches`, the probes of what the model allows in
:mod:`~lora.train.probes`, what is set up before the loop in :mod:`~lora.train.setup`, decisions across processes in
:mod:`~lora.train.processes`, checkpoints in :mod:`~lora.train.run_state`, evaluation in :mod:`~lora.train.evaluate`,
early stopping in :mod:`~lora.train.early_stopping`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_io import check_adapter_folder, save_adapter
from ..data import pack
from ..generate import exact_match
from . import budget, run_state, tracking
from .attention import packed_rows, use_packed_attention
from .batches import Batches, StepPlan
from .checkpoint import Checkpoints, RunShape, is_sharded, rng_state, whole_parameters
from .config import TrainConfig, TrainResult, lr_factor
from .early_stopping import EarlyStopping, judge_of, split_validation, validation_scores
from .evaluate import evaluate
from .loss_curve import plot_loss_curve
from .objective import BatchLoss
from .probes import choose_loss_path, packing_is_exact
from .processes import CtrlC, Processes
from .recompute import enable_gradient_checkpointing
from .setup import (build_optimizer, check_distribution, check_lengths, check_output_dir, configure_deepspeed,
                    mixed_precision, peak_memory_bytes, task_of, upcast_trainable)


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
        check_output_dir(self.output_dir)
        self.task = task_of(model, train_data, adapter)
        self.classification = self.task == "classification"
        check_lengths(train_data, config.seq_len)
        if pad_id is None:
            pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.pad_id = 0 if pad_id is None else int(pad_id)
        if exact_match_data is not None and tokenizer is None:
            raise ValueError("exact_match_data needs the model's tokenizer: Trainer(..., tokenizer=tokenizer)")
        self.exact_match_data = exact_match_data
        self.exact_match_max_new_tokens = exact_match_max_new_tokens
        self.tokenizer = tokenizer
        self.eval_data = eval_data

        precision = mixed_precision(config.precision)
        self.accelerator = Accelerator(
            mixed_precision=precision,
            log_with=tracking.log_with(config.logger),
            project_dir=str(self.output_dir))
        self.deepspeed = self.accelerator.distributed_type == "DEEPSPEED"
        if self.deepspeed:
            configure_deepspeed(self.accelerator, config)
        self.validation_data: list[dict] = []
        self.example_count = len(train_data)  # before the validation slice is taken out
        if config.validation_split:  # sized by lora/train/budget.py: none for a set too small to spare a slice
            train_data, self.validation_data = split_validation(train_data, config.validation_split, config.seed)
        self.early_stopping = EarlyStopping(config.early_stopping_patience or math.inf,
                                            config.early_stopping_min_delta,
                                            judge_of(self.task, self.validation_data),
                                            held_out=len(self.validation_data)) if self.validation_data else None
        upcast_trainable(model, precision, config.precision)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.optimizer = build_optimizer(model, config)
        self.model = model
        # The objective itself, whose parts probes and evaluation call; accelerate's wrapper of it (DDP/FSDP/
        # DeepSpeed) is what training calls, and what evaluation runs inside when the parameters are shards.
        self.objective = BatchLoss(model, self.task, config.loss_chunk, config.dpo_beta)
        self.loss_module, self.optimizer = self.accelerator.prepare(self.objective, self.optimizer)
        self.processes = Processes(self.accelerator)
        self.world = self.processes.world
        self.sharded = is_sharded(model) or self._zero3()  # FSDP2 or ZeRO-3: parameters gathered only in forward
        check_distribution(self.accelerator, self.sharded, early_stopping=self.early_stopping is not None)
        self.batches = Batches(self.task, self.pad_id, self.accelerator.device)
        if self.task != "classification":
            choose_loss_path(self, train_data)
        wants_packing = config.packing and self.task == "lm"
        # the attention route is chosen before the packing probe, which then checks it too
        per_example = wants_packing and use_packed_attention(model)
        self.packing = wants_packing and packing_is_exact(self, model, train_data)
        # with attention per example, a micro-batch's packed rows run as one row without their padding tails
        self.batches.joins_rows = self.packing and per_example
        self.rows = pack(train_data, config.seq_len, self.pad_id) if self.packing else train_data
        self.asked_grad_accum = config.grad_accum
        if not self.deepspeed:  # a small set: smaller steps first, before more passes (lora/train/budget.py)
            self.cfg = config = config.replace(grad_accum=budget.fitted_grad_accum(
                len(self.rows), config.batch_size, config.grad_accum, self.world, config.epochs, config.max_steps,
                config.min_steps))
        self.plan = StepPlan(self.rows, self.batches, config.batch_size, config.grad_accum, self.world,
                             self.accelerator.process_index, config.seed, self.packing)
        self.total_steps = budget.total_steps(self.plan.steps_per_epoch, config.epochs, config.max_steps,
                                              config.min_steps)
        self.validate_every = budget.validation_interval(self.total_steps, config.validate_every)
        if self.early_stopping is not None:
            self.early_stopping.stop_from = budget.first_stop_step(self.total_steps, config.warmup_ratio)
        self.checkpoints = Checkpoints(self.output_dir / "checkpoints", config.keep_checkpoints)
        self.step = 0
        self.history: list[dict] = []
        self.rng_at_step: dict | None = None  # RNG state at the last step boundary, for exact resume

    def _zero3(self) -> bool:
        return self.deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    # -- losses -------------------------------------------------------------------------------------------------------
    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed loss of a micro-batch and the number of terms in it (target tokens, or examples)."""
        return self.loss_module(batch), self.batches.terms(batch)

    def evaluate(self, data: list[dict] | None = None) -> dict[str, float]:
        """Mean loss and perplexity over ``data`` (default: the eval data); accuracy for classification; exact
        match when the trainer has ``exact_match_data``; for preference pairs, ``preference_accuracy`` and
        ``reward_margin`` (see :func:`lora.train.evaluate.evaluate`).

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

    def _over_batches(self, data: list[dict], score: Callable) -> dict[str, float]:
        """``score(objective, batches, autocast)`` over ``data`` in micro-batches, in packed rows when training
        packs (the same per-token means, with less padding and attention work), with the model whole."""
        packed = self.packing and all(len(e["input_ids"]) <= self.cfg.seq_len for e in data)
        rows = pack(data, self.cfg.seq_len, self.pad_id) if packed else data
        size = self.cfg.batch_size
        with packed_rows(packed):
            return self.run_whole(lambda: score(
                self.objective, (self.batches.make(rows[i:i + size], packed) for i in range(0, len(rows), size)),
                self.accelerator.autocast))

    def _losses(self, data: list[dict]) -> dict[str, float]:
        """:func:`lora.train.evaluate.evaluate`'s metrics over ``data``."""
        return self._over_batches(data, evaluate)

    def validation_loss(self) -> float:
        """Mean loss per target token on the validation slice."""
        return self._losses(self.validation_data)["eval_loss"]

    def plan_line(self) -> str:
        """What this run will do, in a line: examples, steps, epochs, the validation slice and its judge."""
        early = self.early_stopping
        stopping = early is not None and math.isfinite(early.patience)
        per_step, unit = self.plan.step_size
        return budget.plan(self.example_count, len(self.validation_data), self.cfg.validation_split, self.total_steps,
                           self.plan.steps_per_epoch, per_step, stopping, early.stop_from if early else 0,
                           early.judge if early else None, (self.asked_grad_accum, self.cfg.grad_accum), unit)

    def validation_scores(self) -> dict[str, float]:
        """The validation slice's loss and, for language-model examples, exact match (one forward pass, see
        :func:`lora.train.early_stopping.answer_scores`), in packed rows when training packs."""
        if self.task != "lm":
            return {"validation_loss": self.validation_loss()}
        return self._over_batches(self.validation_data, validation_scores)

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
            run_state.resume(self, latest)
        else:
            if not cfg.resume:
                run_state.set_earlier_run_aside(self)
            torch.manual_seed(cfg.seed)  # dropout draws
        if cfg.logger != "none":  # the same scalars and settings whichever tracker (lora/train/tracking.py)
            acc.init_trackers(tracking.PROJECT, config=tracking.run_settings(cfg, self.model, self.adapter),
                              init_kwargs=tracking.init_kwargs(cfg.logger, self.output_dir))
        acc.print(self.plan_line())  # what the budget and the validation slice came to (lora/train/budget.py)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not acc.is_main_process, desc="train",
                   dynamic_ncols=True)
        self.loss_module.train()  # the wrapped BatchLoss; .train() reaches the model inside
        start_time, tokens_seen, interrupted, last_loss = time.perf_counter(), 0, False, None
        self.rng_at_step = rng_state()
        first_step = self.step
        with CtrlC() as ctrl_c, bar:
            while self.step < self.total_steps and not self._stopped_early():
                last_loss, tokens = self._optimizer_step()
                tokens_seen += tokens
                self.step += 1
                self.rng_at_step = rng_state()

                elapsed = time.perf_counter() - start_time
                if self.step == first_step + 1 and self.step < self.total_steps:
                    acc.print(budget.pace(self.total_steps - first_step, elapsed))
                metrics = {"loss": last_loss, "lr": self.optimizer.param_groups[0]["lr"],
                           "tokens_per_second": tokens_seen / max(elapsed, 1e-9),
                           **self.plan.metrics(self.step)}  # GRPO's rewards (all processes call it)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    metrics.update(self.evaluate())
                if self.early_stopping is not None and (self.step % self.validate_every == 0
                                                        or self.step == self.total_steps):
                    metrics.update(self._validate())
                self.history.append({"step": self.step, **metrics})
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{metrics['tokens_per_second']:.0f}")
                    if cfg.logger != "none":
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
                if self.processes.any(ctrl_c.requested):
                    interrupted = True
                    break
        train_seconds = time.perf_counter() - start_time
        early = self.early_stopping  # the run ends on the weights of its best validation
        if early is not None and not interrupted and early.best_step != self.step and early.restore_best(self.model):
            acc.print(f"kept the weights of step {early.best_step} ({early.best_text()})")
        checkpoint = self.save_checkpoint()
        final = {} if interrupted else self.evaluate()
        if cfg.logger != "none":
            if final:
                acc.log(final, step=self.step)
            acc.end_training()
        if acc.is_main_process and self.history:
            plot_loss_curve(self.history, self.output_dir / "loss_curve.png")
        return TrainResult(steps=self.step, train_loss=last_loss, eval_loss=final.get("eval_loss"),
                           perplexity=final.get("perplexity"), exact_match=final.get("exact_match"),
                           tokens_per_second=tokens_seen / max(train_seconds, 1e-9),
                           peak_memory_bytes=peak_memory_bytes(acc.device), train_seconds=train_seconds,
                           interrupted=interrupted, checkpoint=str(checkpoint) if checkpoint else None,
                           eval_metrics=final, stopped_early=self._stopped_early(),
                           **({} if self.early_stopping is None else {
                               "best_step": self.early_stopping.best_step,
                               "validation_loss": self.early_stopping.state()["best_loss"],
                               "validation_exact_match": self.early_stopping.best_exact_match()}))

    def _optimizer_step(self) -> tuple[float, int]:
        """Set the learning rate, accumulate the gradients of step ``self.step``'s window, clip, step; returns the
        window's mean loss and its real tokens (all processes)."""
        cfg = self.cfg
        # The learning rate is set before the window: under DeepSpeed the engine steps inside the last
        # micro-batch's backward.
        factor = lr_factor(self.step, self.total_steps, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate * group["lr_ratio"] * factor
        window_loss, window_terms, tokens = self._backward_window(self.plan.window(self.step))
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
        local_terms = sum(self.batches.terms(b) for b in micro_batches)
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
                            run_state.stop_non_finite(self, window_loss)
                    acc.backward(loss_sum * (0.0 if padding else scale))
            finally:
                acc.sync_gradients = True
        return window_loss, window_terms, tokens

    # -- early stopping -----------------------------------------------------------------------------------------------
    def _validate(self) -> dict[str, float]:
        """The validation slice's scores at this step; early stopping decides on them, every process the same way
        (the rule: :mod:`lora.train.early_stopping`)."""
        # the main process's scores decide on every process: the same best step, kept weights and stop
        # everywhere, even where a GPU's kernels give processes slightly different numbers
        scores, early = self.processes.main_value(self.validation_scores()), self.early_stopping
        correct = scores.get("validation_correct") if early.judge == "exact match" else None
        early.update(self.step, scores["validation_loss"], self.model, correct)
        if early.stopped:
            self.accelerator.print(
                f"early stop at step {self.step} of {self.total_steps}: {self.cfg.early_stopping_patience} "
                f"validation(s) in a row without progress ({early.best_text()}, at step {early.best_step})")
        return scores

    def _stopped_early(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.stopped

    # -- checkpoints (lora/train/run_state.py) ------------------------------------------------------------------------
    def checkpoint_dir(self) -> Path:
        return self.checkpoints.folder

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints.latest()

    def shape(self) -> RunShape:
        return run_state.run_shape(self)

    def save_checkpoint(self) -> Path:
        """Write adapter + optimizer + RNG + data position for the current step (see
        :func:`lora.train.run_state.save_checkpoint`); every process calls it, and gets the folder back."""
        return run_state.save_checkpoint(self)

    def save_adapter(self, path: str | os.PathLike, card: dict[str, Any] | None = None) -> Path:
        """Save the adapter as a PEFT folder at ``path``, whole even when FSDP or ZeRO-3 shard it.

        Every process calls it (the shards are gathered from all of them); the main process writes. Returns the
        folder on every process. The folder's model card gets the run's training settings and steps, plus
        ``card`` (``"data"``, ``"metrics"``: see :func:`lora.save_adapter`).
        """
        check_adapter_folder(path)  # on every process, before any of them gathers
        card = {"training": tracking.card_training(self.cfg, self.step, self.total_steps), **(card or {})}
        with whole_parameters(self.loss_module):
            folder = save_adapter(self.model, path, self.adapter, card=card) \
                if self.accelerator.is_main_process else None
        self.accelerator.wait_for_everyone()
        return self.processes.main_value(folder)


__all__ = ["TrainConfig", "Trainer", "TrainResult", "lr_factor"]
