"""What is decided before the loop starts: precision, DeepSpeed's settings, the optimizer, the checks on the data and
the output folder, and trainable weights kept in fp32."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import example_lengths
from ..inject import adapters_of
from ..layers import is_linear_like
from .config import TrainConfig

HALF = (torch.float16, torch.bfloat16)


def mixed_precision(precision: str) -> str:
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"  # CPU: bf16 matmuls are hundreds of times slower than fp32 there
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def configure_deepspeed(accelerator: Any, cfg: TrainConfig) -> None:
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


def task_of(model: nn.Module, train_data: list[dict], adapter: str) -> str:
    """What ``train_data`` trains: ``"lm"`` (targets), ``"classification"`` (labels) or ``"preference"`` (pairs);
    refuses a model with nothing to train, and DPO on an adapter that trains the base's biases."""
    if not train_data:
        raise ValueError("train_data is empty")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters; call lora.inject(model, cfg) first")
    first = train_data[0]
    task = "classification" if "label" in first else "preference" if "chosen" in first else "lm"
    adapter_cfg = adapters_of(model)[adapter].config if adapter in adapters_of(model) else None
    if task == "preference" and adapter_cfg is not None and adapter_cfg.bias != "none":
        # DPO's reference is the model with its adapters off; a bias trained in place would move it too
        raise ValueError(f"DPO compares against the base model (adapters switched off), and bias="
                         f"{adapter_cfg.bias!r} trains the base's own biases, so the reference would drift "
                         f"as training goes; inject the adapter with bias='none' for preference data")
    return task


def check_distribution(accelerator: Any, sharded: bool, early_stopping: bool) -> None:
    """Refuse process set-ups that would train wrong: early stopping on sharded weights, several processes that
    accelerate does not join."""
    if early_stopping and sharded:
        raise ValueError("validation_split (early stopping) keeps a copy of the best trainable weights, which "
                         "FSDP and DeepSpeed ZeRO-3 hold as shards; use DDP or ZeRO-2, or set validation_split=0")
    world = accelerator.num_processes
    if world > 1 and accelerator.distributed_type == "NO":
        # Seen with DeepSpeed or FSDP requested on a machine accelerate gives no backend for (CPU only): the
        # processes would each train on their share of the rows alone, and nothing would average them.
        raise ValueError(f"{world} processes were started, but accelerate set up no distributed training "
                         f"(distributed_type NO), so their gradients would never be averaged; check the "
                         f"accelerate config (distributed_type, the backend) or launch one process")


def check_lengths(examples: list[dict], seq_len: int) -> None:
    """Refuse examples longer than ``seq_len`` (packed or padded): cutting or dropping them is the loader's job."""
    if len(examples) and "chosen" in examples[0]:  # preference pairs: the longer of each pair
        lengths = [max(len(ex[k]["input_ids"]) for k in ("chosen", "rejected")) for ex in examples]
    else:
        lengths = example_lengths(examples).tolist()
    over = [n for n in lengths if n > seq_len]
    if over:
        loader = ("load the pairs with lora.data.load_preferences(..., max_length=seq_len)" if "chosen" in examples[0]
                  else "load the data with max_length=seq_len (lora.load_dataset then truncates or drops them, as "
                       "overlong says)")
        raise ValueError(f"{len(over)} training example(s) are longer than seq_len={seq_len} tokens (the longest: "
                         f"{max(over)}); {loader}, or raise seq_len")


def check_output_dir(path: Path) -> None:
    """Refuse an ``output_dir`` that is a file or lies under one, before any training (not at the first checkpoint,
    minutes or hours in: the fuzzer's ``output_dir=notes.txt/run``)."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"output_dir {str(path)!r}: {folder} is a file; pass an output_dir that is a folder "
                                 f"(or a new path)")
            return


def upcast_trainable(model: nn.Module, mixed_precision: str, precision: str) -> None:
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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; LoRA+ puts every B in a group of its own at ``loraplus_lr_ratio`` x the
    learning rate (each group's ``lr_ratio`` scales the schedule)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if ".lora_B." not in n], "lr_ratio": 1.0},
              {"params": [p for n, p in trainable if ".lora_B." in n], "lr_ratio": cfg.loraplus_lr_ratio}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
