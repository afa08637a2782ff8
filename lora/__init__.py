"""LoRA fine-tuning for GPT-style language models: inject, train, save PEFT-compatible adapters, merge, export."""

import logging
import os

import torch

# transformers imports torchao (our [qlora] extra) whenever it is installed; on a machine without CUDA, torchao then
# logs that its CUDA kernels cannot load and torch logs a deprecation about torchao's enums, on every model load.
# Neither concerns the user, so those two loggers report errors only.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
# transformers also imports DeepSpeed (in our test extra) whenever it is installed; DeepSpeed then guesses its
# accelerator and, finding no GPU, prints "Setting accelerator to CPU" on stdout, in the middle of `lora` output.
# Where torch sees no GPU, the CPU is the answer: name it (a DS_ACCELERATOR the user set wins).
if not (torch.cuda.is_available() or torch.backends.mps.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from .adapter_io import adapter_state_dict, load_adapter, save_adapter
from .combine import combine_adapters
from .config import LoraConfig
from .generate import generate
from .inject import disabled, inject, parameter_count, remove_adapter, row_adapters, set_active
from .layers import LoRALinear
from .merge import merge, merge_and_unload, merge_state_dict, unmerge
from .models import load_model
from .tokens import add_tokens
from .train import TrainConfig, Trainer, TrainResult, dpo_loss

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoRALinear",
    "add_tokens",
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
