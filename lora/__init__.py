"""LoRA fine-tuning for GPT-style language models: inject, train, save PEFT-compatible adapters, merge, export."""

import logging

# transformers imports torchao (our [qlora] extra) whenever it is installed; on a machine without CUDA, torchao then
# logs that its CUDA kernels cannot load and torch logs a deprecation about torchao's enums, on every model load.
# Neither concerns the user, so those two loggers report errors only.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

from .adapter_io import adapter_state_dict, load_adapter, save_adapter
from .combine import combine_adapters
from .config import LoraConfig
from .dpo import dpo_loss
from .generate import generate
from .inject import disabled, inject, parameter_count, remove_adapter, row_adapters, set_active
from .layers import LoRALinear
from .merge import merge, merge_and_unload, merge_state_dict, unmerge
from .models import load_model
from .trainer import TrainConfig, Trainer, TrainResult

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoRALinear",
    "inject",
    "remove_adapter",
    "disabled",
    "set_active",
    "row_adapters",
    "combine_adapters",
    "dpo_loss",
    "parameter_count",
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "merge",
    "unmerge",
    "merge_and_unload",
    "merge_state_dict",
    "load_model",
    "generate",
    "Trainer",
    "TrainConfig",
    "TrainResult",
]
