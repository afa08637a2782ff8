"""A run's budget, fitted to its data: how many optimizer steps, how large a validation slice, how often it is
judged, and the line that tells the user so before the run.

The rules (issue 20; measured on the task suite in ``bench/suite.py``, results in ``bench/RESULTS.md``):

- **Steps.** ``epochs`` passes over the rows, but never fewer than ``min_steps`` optimizer steps: a small set
  whose epoch is two steps gets the steps it needs to learn (60 examples, 2 steps: 8% -> 50% exact match on an
  extraction task; Adam moves the weights about once per step, whatever the batch). First the steps get smaller,
  which costs nothing: fewer micro-batches are accumulated per step (``grad_accum``, down to 1), so the same
  epoch holds more steps. Only a set that still has too few steps makes more passes, counted in steps rather
  than rounded up to whole epochs. ``max_steps`` overrides all of it; under DeepSpeed (its engine fixes the
  accumulation) only the extra passes apply. A small set's extra passes stay cheap: ``min_steps`` steps of
  ``batch_size`` rows.
- **Validation slice.** A fraction ``validation_split`` of the examples, but at least :data:`MIN_VALIDATION`:
  whether 24 answers are right is too coarse a judge of 200 held-out ones. A set too small to spare that many
  (more than :data:`MAX_VALIDATION_SHARE` of it) keeps all its examples for training and runs its whole budget
  without early stopping, and the run says so. A larger fraction, or a count (``validation_split=40``), is
  taken as it is.
- **Cadence.** ``validate_every=0`` with a validation slice judges it about :data:`VALIDATIONS_PER_RUN` times per
  run, so the slice's forward passes stay a bounded share of the run (one validation of 48 short examples costs
  about half a training step of 8 packed rows).
- **No stop too soon**: not during warm-up, and not before :data:`MIN_SHARE` of the steps. Under the cosine schedule
  much of what a run learns comes as the learning rate falls: on the suite's booking_fields a stop allowed from a
  quarter of the run ended it at step 8 of 19 with the weights of step 4 (91% held-out exact match) after the slice
  had stayed flat from step 4 to 8, where the whole epoch reached 99%. From half of the run on, a run still ends
  early once it has long stopped improving.
"""

from __future__ import annotations

import math

MIN_VALIDATION = 48  # examples: one example is ~2 points of exact match, coarse but enough to see a plateau
MAX_VALIDATION_SHARE = 0.2  # the floor above is applied only where it is at most this share of the set
VALIDATIONS_PER_RUN = 12  # validate_every=0: about this many validations per run
MIN_SHARE = 0.5  # no early stop before this share of the run's steps


def validation_count(examples: int, split: float) -> int:
    """How many of ``examples`` to hold out for validation: ``split`` is a count (as it is) or a fraction (as it
    is when that comes to :data:`MIN_VALIDATION` or more; else raised to that floor where the floor is at most
    :data:`MAX_VALIDATION_SHARE` of the set, and 0 where the set cannot spare it); 0 for none.

    Raises:
        ValueError: a split that leaves no training example.
    """
    if not split:
        return 0
    count = int(split) if split >= 1 else round(split * examples)
    if count >= examples:
        raise ValueError(f"validation_split={split} of {examples} training examples leaves "
                         f"{max(examples - count, 0)} for training; hold out fewer (a count below {examples}, or a "
                         f"fraction such as 0.05)")
    if split >= 1 or count >= MIN_VALIDATION:
        return count
    # the floor applies only where the set can spare it; the fraction asked for is never cut
    return MIN_VALIDATION if MIN_VALIDATION <= MAX_VALIDATION_SHARE * examples else 0


def steps_per_epoch(rows: int, rows_per_step: int) -> int:
    """Optimizer steps in one pass over ``rows``: the epoch's last step takes the rows left over."""
    return max(1, math.ceil(rows / rows_per_step))


def total_steps(steps_per_epoch: int, epochs: float, max_steps: int | None, min_steps: int) -> int:
    """Optimizer steps of a run: ``max_steps`` if set, else ``epochs`` passes, but at least ``min_steps``."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * steps_per_epoch), min_steps)


def fitted_grad_accum(rows: int, batch_size: int, grad_accum: int, world: int, epochs: float,
                      max_steps: int | None, min_steps: int) -> int:
    """The micro-batches to accumulate per step: ``grad_accum``, or fewer where ``epochs`` passes over ``rows``
    would otherwise give fewer than ``min_steps`` steps (the largest count that gives enough, else 1)."""
    if max_steps or not min_steps:
        return grad_accum
    for accum in range(grad_accum, 0, -1):
        if total_steps(steps_per_epoch(rows, batch_size * accum * world), epochs, None, 0) >= min_steps:
            return accum
    return 1


def validation_interval(steps: int, validate_every: int) -> int:
    """Steps between validations: ``validate_every``, or with 0 about :data:`VALIDATIONS_PER_RUN` per run."""
    return validate_every or max(1, round(steps / VALIDATIONS_PER_RUN))


def first_stop_step(steps: int, warmup_ratio: float) -> int:
    """The first step at which early stopping may end a run: after warm-up and :data:`MIN_SHARE` of the steps."""
    return max(int(warmup_ratio * steps), math.ceil(MIN_SHARE * steps))


def plan(examples: int, held_out: int, split: float, steps: int, steps_per_epoch: int, per_step: int,
         stopping: bool, stop_from: int, judge: str | None, accum: tuple[int, int] | None = None,
         unit: str = "rows") -> str:
    """The line a run prints before its first step: what it trains on, for how long, and when it may stop
    (``per_step`` ``unit``: rows, or GRPO's prompts; ``accum``: ``(asked, used)`` when :func:`fitted_grad_accum`
    made the steps smaller)."""
    epochs = steps / steps_per_epoch
    text = (f"plan: {examples - held_out:,} training examples, {steps} optimizer steps of up to {per_step} "
            f"{unit} ({epochs:.3g} epoch{'s' if epochs != 1 else ''} of {steps_per_epoch} steps)")
    if accum and accum[0] != accum[1]:
        text += f"; grad_accum {accum[0]} -> {accum[1]}, so that a small set gets enough steps (min_steps)"
    if held_out:
        text += f"; {held_out} examples held out for validation, judged by {judge}"
        text += f", no early stop before step {stop_from}" if stopping else " (the best step's weights kept)"
    elif split:
        text += (f"; no validation slice: {examples} examples cannot spare {MIN_VALIDATION} (at most "
                 f"{MAX_VALIDATION_SHARE:.0%} of them), so the run takes its whole budget (validation_split=COUNT "
                 f"holds out exactly COUNT)")
    return text


def pace(steps: int, seconds: float) -> str:
    """The estimate printed after a run's first step, which took ``seconds``: ``~T minutes`` for the ``steps``
    still to run (all of them, or what a resumed run has left) at that pace."""
    left = seconds * steps
    return f"~{left / 60:.0f} minutes for {steps} steps at the pace of the first" if left >= 90 else \
        f"~{left:.0f} s for {steps} steps at the pace of the first"


__all__ = ["MIN_VALIDATION", "MAX_VALIDATION_SHARE", "VALIDATIONS_PER_RUN", "MIN_SHARE", "validation_count",
           "steps_per_epoch", "total_steps", "fitted_grad_accum", "validation_interval", "first_stop_step", "plan",
           "pace"]
