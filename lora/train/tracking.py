"""Experiment tracking through accelerate's trackers (``TrainConfig.logger``), and what a run says about itself.

``"tensorboard"`` writes event files under ``output_dir/lora``; ``"wandb"`` a W&B run under ``output_dir/wandb``
(``WANDB_MODE=offline`` keeps it local, ``wandb sync`` uploads it later); ``"mlflow"`` an MLflow run in a local
file store ``output_dir/mlruns`` unless ``MLFLOW_TRACKING_URI`` names another store or a server. Every tracker
gets the same scalars (loss, learning rate, tokens per second, the evaluations) and the run's settings.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..inject import adapters_of

# TrainConfig.logger -> the package it needs (tensorboard is a dependency of this package; the others come with the
# `track` extra)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "lora"  # the trackers' project (W&B), experiment (MLflow) or sub-folder (TensorBoard)


def check_installed(logger: str) -> None:
    """Refuse a tracker whose package is missing now, before any work (accelerate would skip it silently).

    Raises:
        ValueError: the package is not installed (the message gives the command that installs it).
    """
    package = TRACKER_PACKAGES.get(logger)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"logger={logger} needs the {package} package, which is not installed: pip install "
                         f"'lora[track]' (or pip install {package}), or choose another logger (none, tensorboard)")


def log_with(logger: str) -> str | None:
    """What ``Accelerator(log_with=...)`` gets for ``TrainConfig.logger``."""
    return None if logger == "none" else logger


def init_kwargs(logger: str, output_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The tracker's own arguments for ``accelerator.init_trackers``: its files go under ``output_dir``, and the
    run is named after that folder."""
    output_dir = Path(output_dir)
    if logger == "wandb":
        return {"wandb": {"dir": str(output_dir), "name": output_dir.resolve().name}}
    if logger == "mlflow":
        if "MLFLOW_TRACKING_URI" not in os.environ:
            import mlflow

            # MLflow 3 refuses a file store unless asked: a local folder of plain files is what a run without a
            # server wants (read with `mlflow ui --backend-store-uri <output_dir>/mlruns`)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        return {"mlflow": {"run_name": output_dir.resolve().name}}
    return {}


def run_settings(cfg: Any, model: nn.Module, adapter: str) -> dict[str, int | float | str | bool]:
    """The run's settings as trackers take them: every TrainConfig field and the adapter's LoraConfig fields, one
    flat namespace as in a recipe's settings; lists become text, unset values (None) are left out."""
    values = dataclasses.asdict(cfg)
    registry = adapters_of(model)
    if adapter in registry:
        values.update(dataclasses.asdict(registry[adapter].config))
    flat: dict[str, int | float | str | bool] = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value)) if value else "-"
        if isinstance(value, (int, float, str, bool)):
            flat[key] = value
    return flat


def card_training(cfg: Any, steps: int, total_steps: int) -> dict[str, Any]:
    """The model card's training section: the steps done and the settings a reader of the card asks about first."""
    return {"steps": f"{steps} of {total_steps}", "learning_rate": cfg.learning_rate, "schedule": cfg.schedule,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seq_len": cfg.seq_len,
            "packing": cfg.packing, "seed": cfg.seed, "precision": cfg.precision}


__all__ = ["check_installed", "log_with", "init_kwargs", "run_settings", "card_training", "TRACKER_PACKAGES"]
