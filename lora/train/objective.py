"""What the trainer differentiates: :class:`BatchLoss`, the summed loss of a batch (token cross-entropy through the
label-only head where it is exact, one label per example, or DPO over pairs), and the probe that decides whether
packing keeps a model's examples apart."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE, collate, example_lengths, model_inputs, pack
from ..inject import disabled
from .attention import packed_rows
from . import grpo
from .dpo import dpo_loss


def _forward_takes(model: nn.Module) -> set[str]:
    """Which batch inputs ``model.forward`` takes by name: a Hugging Face forward takes them all, a hand-written
    ``forward(idx)`` none (a ``**kwargs`` forward is taken at its word)."""
    inputs = {"input_ids", "attention_mask", "position_ids", "use_cache"}
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return inputs
    return {p.name for p in params} & inputs


def _head_and_decoder(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The decoder (returns hidden states) and output head of a Hugging Face causal LM, or None for a model that
    has no such split. Whether ``head(decoder(x))`` really gives the model's logits is checked by
    :meth:`BatchLoss.check_shortcut` before training uses it."""
    prefix = getattr(model, "base_model_prefix", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, prefix, None) if prefix else None
    if getattr(model, "config", None) is None or head is None or decoder is None or decoder is model:
        return None
    return decoder, head


class _HeadLoss(torch.autograd.Function):
    """The summed cross-entropy of ``head(hidden)`` at ``wanted``, its backward pass done within the forward, a chunk
    at a time (issue 25).

    Chunking alone bounds the logits that exist at once in evaluation, but not in training: autograd keeps every
    chunk's ``(chunk, vocab)`` float32 log-softmax for the backward pass, so the loss held ``N x vocab x 4`` bytes,
    1.6 GB for 8,192 target tokens of SmolLM2's 49,152-token vocabulary, more than the whole checkpointed model.
    Here each chunk's gradient with respect to its hidden states (``softmax - one_hot``, through the head) is
    computed at once and kept, ``N x hidden``; the logits of a chunk are freed before the next. No work is added:
    the same products run, in the forward instead of the backward pass. Only for a frozen head (the head's own
    weight gradient would be a ``vocab x hidden`` tensor per chunk).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, wanted: torch.Tensor, head: nn.Module, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)  # (N, H)
        for start in range(0, len(wanted), chunk):
            targets = wanted[start:start + chunk]
            with torch.enable_grad():
                piece = hidden[start:start + chunk].detach().requires_grad_()
                logits = head(piece)  # (chunk, vocab), in the autocast dtype
            z = logits.detach().float()  # the same storage in fp32: the head's backward never reads its output
            lse = torch.logsumexp(z, dim=-1)  # (chunk,)
            total += (lse - z.gather(1, targets[:, None])[:, 0]).sum()
            probs = z.sub_(lse[:, None]).exp_()  # softmax, in place; minus one at the target: d loss / d logits
            probs[torch.arange(len(targets), device=targets.device), targets] -= 1
            grad[start:start + chunk] = torch.autograd.grad(logits, piece, probs.to(logits.dtype))[0]
            del logits, z, probs
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def _max_relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to b's largest magnitude (0 for equal tensors)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


class BatchLoss(nn.Module):
    """The summed loss of a batch: what the trainer differentiates.

    It is this module, not the bare model, that accelerate wraps for DDP/FSDP, so the whole differentiated forward
    (including the hidden-states-then-head shortcut) runs inside the wrapper and gradients are synchronised.

    ``task`` is ``"lm"`` (token cross-entropy), ``"classification"`` (one label per example), ``"preference"``
    (DPO over pairs: a batch holds the chosen completions, then the rejected ones, row for row) or ``"grpo"``
    (sampled completions and their advantages, :mod:`lora.train.grpo`).

    Anything else that runs the model while it is wrapped (probes, evaluation, generation) goes through this
    module's forward too, as ``forward(inside=fn)``: FSDP2 gathers the root's own parameters (embeddings, final norm,
    head) only in the root's forward, and a decoder layer first called outside it would set itself up as a root.
    """

    def __init__(self, model: nn.Module, task: str, loss_chunk: int, dpo_beta: float = 0.1):
        super().__init__()
        self.model = model
        self.task = task
        self.loss_chunk = loss_chunk
        self.dpo_beta = dpo_beta
        self.candidate = None if task == "classification" else _head_and_decoder(model)
        self.parts: tuple[nn.Module, nn.Module] | None = None  # the shortcut, once check_shortcut has proved it
        self.takes = _forward_takes(model)
        self.grpo = None  # GRPO's settings, for task "grpo" (set by lora.train.grpo_trainer.GRPOTrainer)
        self.grpo_stats: dict[str, float] = {}  # GRPO's KL and clipping counts since the plan last read them

    @torch.no_grad()
    def check_shortcut(self, batch: dict[str, torch.Tensor]) -> tuple[bool, float]:
        """Whether ``head(decoder(x))`` gives the model's own logits on ``batch``; ``(exact, max relative gap)``.

        The shortcut computes logits only where a label is, a chunk at a time (far less memory than the full
        ``(B, T, vocab)`` logits), but it skips whatever a model's forward does after its head: soft-capping
        (Gemma 2), dividing by ``logits_scaling`` (Granite), multiplying by ``lm_head_multiplier`` (Falcon-H1), and
        whatever future models add. Comparing the two on one batch, instead of keeping a list of attribute names,
        catches all of them. Both sides run the head on the same ``(B, T, H)`` tensor, so for a model that adds
        nothing they agree to rounding; any gap above that turns the shortcut off (the safe side).
        """
        if self.candidate is None or "input_ids" not in self.takes:
            return False, float("nan")
        decoder, head = self.candidate
        # a few positions suffice, and keep the full (B, T, vocab) logits the shortcut exists to avoid small
        batch = {k: v[:, :32] if v.dim() == 2 else v for k, v in batch.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            out = self._run_model(batch)
            full = out if isinstance(out, torch.Tensor) else out.logits
            inputs = {k: v for k, v in model_inputs(batch).items() if k in self.takes}
            short = head(decoder(**inputs).last_hidden_state)
        finally:
            self.model.train(was_training)
        gap = _max_relative_gap(short, full) if short.shape == full.shape else float("inf")
        return gap <= 1e-5, gap

    def forward(self, batch: dict[str, torch.Tensor] | None = None, inside: Callable[[], Any] | None = None) -> Any:
        """The summed loss of ``batch``; or, given ``inside``, what ``inside()`` returns, run within this forward."""
        return inside() if inside is not None else self.summed_loss(batch)

    def summed_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.task == "classification":
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        if self.task == "grpo":  # sampled completions, their advantages and reference (lora/train/grpo.py)
            return grpo.summed_loss(self, batch)
        if self.task == "preference":
            policy, reference = self.pair_logps(batch)
            n = len(policy) // 2
            return dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.dpo_beta) * n  # summed
        targets = batch["targets"]
        if self.parts is None:
            out = self._run_model(batch)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
        hidden, head, wanted = self.labelled(batch)
        if hidden.requires_grad and torch.is_grad_enabled() and not any(p.requires_grad for p in head.parameters()):
            return _HeadLoss.apply(hidden, wanted, head, self.loss_chunk)  # training: no (N, vocab) kept
        total = hidden.new_zeros((), dtype=torch.float32)
        for rows, logits in self.chunked_logits(hidden, head):
            total = total + F.cross_entropy(logits, wanted[rows], reduction="sum")
        return total

    def labelled(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, nn.Module | None, torch.Tensor]:
        """What the model computes at the positions that carry a label, in order: ``(N, H)`` hidden states and the
        head that turns them into logits (with the shortcut), or the model's own ``(N, vocab)`` logits and no head;
        and the ``(N,)`` labels."""
        targets = batch["targets"]
        keep = targets != IGNORE
        if self.parts is None:
            out = self._run_model(batch)
            return (out if isinstance(out, torch.Tensor) else out.logits)[keep], None, targets[keep]
        decoder, head = self.parts
        return decoder(**model_inputs(batch)).last_hidden_state[keep], head, targets[keep]

    def chunked_logits(self, labelled: torch.Tensor, head: nn.Module | None) \
            -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, float32 logits)`` of :meth:`labelled`'s output, ``loss_chunk`` positions at a time: the
        ``(chunk, vocab)`` logits exist one chunk at a time, never ``(B, T, vocab)`` in float32."""
        for start in range(0, len(labelled), self.loss_chunk):
            chunk = labelled[start:start + self.loss_chunk]
            yield slice(start, start + len(chunk)), (chunk if head is None else head(chunk)).float()

    def pair_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed target log-probability under the policy and, without gradients, under the reference:
        the same model with its adapters switched off (never a second copy of the weights)."""
        policy = self.target_logps(batch)
        with torch.no_grad(), disabled(self.model):
            reference = self.target_logps(batch)
        return policy, reference

    def target_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(rows,)``: the summed log-probability of each row's target tokens."""
        targets = batch["targets"]
        row_of = (targets != IGNORE).nonzero()[:, 0]  # (N,) the row of every position that carries a label
        hidden, head, wanted = self.labelled(batch)
        pieces = [-F.cross_entropy(logits, wanted[rows], reduction="none")
                  for rows, logits in self.chunked_logits(hidden, head)]
        token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
        return token_logps.new_zeros(len(targets)).index_add(0, row_of, token_logps)

    def _run_model(self, batch: dict[str, torch.Tensor]) -> Any:
        """The model's output on a batch, called the way its forward asks (issue 9: hand-written GPTs)."""
        inputs = model_inputs(batch)
        if "input_ids" in self.takes:  # a Hugging Face forward: everything by name
            return self.model(**{k: v for k, v in inputs.items() if k in self.takes})
        # A hand-written forward(idx): the ids positionally, and no mask. Rows are right-padded, so in a causal
        # model every real token comes before the pads, and pads carry no loss.
        return self.model(inputs["input_ids"], **({"position_ids": inputs["position_ids"]}
                                                  if "position_ids" in self.takes else {}))


@torch.no_grad()
def packing_gap(objective: "BatchLoss", examples: list[dict], seq_len: int, pad_id: int) -> float | None:
    """How far a packed row's per-token losses stray from the same examples' losses in a padded batch.

    Packing keeps examples apart only through ``position_ids`` that restart at 0, which a model must turn into
    block-diagonal attention; some do not (they ignore the positions for the mask, or use none, like ALiBi). The
    probe packs the shortest examples that fit one row (at most 4) and compares the losses of the target tokens
    after the first example (the first sees nothing else either way); returns their mean absolute gap relative to
    their mean loss, or None when no two examples fit one row (then packing puts one example per row anyway).
    """
    chosen, used = [], 0
    shortest = np.argsort(example_lengths(examples), kind="stable")[:4]
    for ex in (examples[int(i)] for i in shortest):
        if used + len(ex["input_ids"]) > seq_len:
            break
        chosen.append(ex)
        used += len(ex["input_ids"])
    if len(chosen) < 2:
        return None
    model = objective.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        losses = []
        for batch, packed in ((collate(pack(chosen, used, pad_id), pad_id), True), (collate(chosen, pad_id), False)):
            batch = {k: v.to(device) for k, v in batch.items()}
            with packed_rows(packed):  # as training runs them: per-example attention where the model has it
                out = objective._run_model(batch)
            logits = (out if isinstance(out, torch.Tensor) else out.logits).float()
            targets = batch["targets"]
            keep = targets != IGNORE
            losses.append(F.cross_entropy(logits[keep], targets[keep], reduction="none"))
    finally:
        model.train(was_training)
    first = int((torch.as_tensor(chosen[0]["targets"]) != IGNORE).sum())  # row-major order: example 0 comes first
    packed, padded = losses[0][first:], losses[1][first:]
    if not len(padded):
        return None
    return float((packed - padded).abs().mean() / padded.abs().mean().clamp_min(1e-12))


__all__ = ["BatchLoss", "packing_gap"]
