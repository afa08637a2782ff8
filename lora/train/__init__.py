"""The training wing: :class:`Trainer` and :class:`TrainConfig`, and what the loop is made of.

- ``config.py``: TrainConfig, TrainResult, the learning-rate schedule;
- ``trainer.py``: the loop, top to bottom;
- ``setup.py``: what is decided before it (precision, DeepSpeed, the optimizer, checks on data and folders);
- ``batches.py``: rows -> micro-batches, and which rows each process runs at each step;
- ``objective.py``: what is differentiated (causal LM, classification, DPO) and the chunked loss at target positions;
- ``dpo.py``: the DPO loss;
- ``grpo.py``: GRPO's settings, advantages, loss and completion log-probabilities; ``rollouts.py``: each step's
  sampled and scored groups; ``rewards.py``: reward functions; ``grpo_trainer.py``: the Trainer on a reward;
- ``attention.py``: per-example attention for packed rows;
- ``recompute.py``: gradient checkpointing for any module (repeated blocks found by structure, or HF's own);
- ``probes.py``: what the model allows (the loss shortcut, packing), decided once by what it does;
- ``processes.py``: decisions all processes take together, and Ctrl-C;
- ``checkpoint.py``: checkpoint files; ``run_state.py``: a run's state saved and resumed through them;
- ``early_stopping.py``, ``evaluate.py``, ``loss_curve.py``: validation, held-out metrics, the plot;
- ``budget.py``: a run's steps, validation slice and cadence, fitted to its data, and the plan it prints;
- ``tracking.py``: TensorBoard, W&B and MLflow through accelerate's trackers, and what a run tells the model card.

A new training method is an objective in ``objective.py`` (or a module of its own beside it, as ``dpo.py``) that
the loop calls like the others, and a recipe in ``lora/recipes/``.
"""

from .config import TrainConfig, TrainResult, lr_factor
from .dpo import dpo_loss
from .grpo import GRPOConfig, grpo_loss
from .grpo_trainer import GRPOTrainer
from .rewards import Rewards
from .trainer import Trainer

__all__ = ["TrainConfig", "TrainResult", "Trainer", "lr_factor", "dpo_loss", "GRPOTrainer", "GRPOConfig", "grpo_loss",
           "Rewards"]
