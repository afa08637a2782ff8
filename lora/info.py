"""``lora info PATH``: what an adapter folder, a GGUF file or a merged (Hugging Face) model folder holds, and for an
adapter which readers can take it.

Everything is read from the files' headers and JSON (safetensors and GGUF headers name every tensor's shape and
dtype), so even a large model is described without loading its weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .adapter_io import CONFIG_NAME, WEIGHTS_NAME
from .config import LoraConfig
from .errors import one_line
from .model_card import CARD_NAME, fingerprint_digest, readers
from .models import EMBEDDED_MODELS, converted_folder, require_gguf

READER_NAMES = {"peft": "PEFT", "vllm": "vLLM", "llama.cpp": "llama.cpp adapter GGUF"}


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor name -> {"dtype", "shape"} from a safetensors file's JSON header (its first 8 bytes give its size)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > 100 * 1024 * 1024 or size <= 0:
            raise ValueError(f"{path} is not a safetensors file (its header claims {size} bytes)")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _parameters(header: dict[str, Any]) -> int:
    total = 0
    for entry in header.values():
        n = 1
        for dim in entry.get("shape", []):
            n *= dim
        total += n
    return total


def _base_folder(base: str | None) -> Path | None:
    """The base model's folder on this machine, if the adapter's recorded base is an embedded name or a folder."""
    if not base:
        return None
    if base in EMBEDDED_MODELS:
        return converted_folder(base)
    path = Path(base).expanduser()
    return path if (path / "config.json").is_file() else None


def _llama_cpp_for_base(base: str | None) -> str | None:
    """Why llama.cpp cannot take an adapter of this base's family (None: it can), from the export wing's checks."""
    from .export.gguf_arch import GGUF_ARCHS, gguf_config

    folder = _base_folder(base)
    if folder is None:
        return (f"the base {base!r} is not on this machine, so its family cannot be checked (adapter GGUF export "
                f"writes {', '.join(sorted(set(GGUF_ARCHS)))} models)")
    try:
        gguf_config(folder, what="adapter GGUF export")
    except ValueError as e:
        return one_line(e)
    return None


def describe_adapter(path: Path) -> dict[str, Any]:
    """An adapter folder: its settings, base, targets, size, model card, and which readers can take it."""
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON ({one_line(e)}); the file is corrupt") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path / CONFIG_NAME} must hold a JSON object, found {type(raw).__name__}")
    cfg = LoraConfig.from_peft(raw)  # refuses what is not a LoRA adapter this library reads, with the reason
    weights = path / WEIGHTS_NAME
    header = _safetensors_header(weights) if weights.is_file() else {}
    targets = raw.get("target_modules") or []
    targets = targets if isinstance(targets, list) else [targets]
    layers = sorted({int(p) for t in targets for p in str(t).split(".") if p.isdigit()})
    scale = cfg.alpha / (cfg.r ** 0.5 if cfg.rslora else cfg.r)
    can = readers(raw)
    if can["llama.cpp"] is None:
        can["llama.cpp"] = _llama_cpp_for_base(raw.get("base_model_name_or_path"))
    if not weights.is_file():
        can = {name: f"the folder has no {WEIGHTS_NAME}" for name in can}
    return {
        "kind": "adapter",
        "path": str(path),
        "peft_type": raw.get("peft_type", "LORA"),
        "task_type": raw.get("task_type"),
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "base_fingerprint": fingerprint_digest(raw),
        "r": cfg.r, "lora_alpha": cfg.alpha, "scale": scale, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "use_dora": cfg.dora, "bias": cfg.bias, "init": cfg.init, "modules_to_save": list(cfg.modules_to_save),
        "target_modules": len(targets),
        "target_names": sorted({str(t).rsplit(".", 1)[-1] for t in targets}),
        "layers": f"{layers[0]}-{layers[-1]} ({len(layers)})" if layers else None,
        "tensors": len(header), "parameters": _parameters(header),
        "size_bytes": weights.stat().st_size if weights.is_file() else 0,
        "model_card": (path / CARD_NAME).is_file(),
        "readers": can,
    }


def describe_gguf(path: Path) -> dict[str, Any]:
    """A GGUF file: a whole model or an adapter, its architecture, shape, tensor types, tokenizer."""
    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({one_line(e)})") from None

    def key(name: str):
        field = reader.get_field(name)
        return None if field is None else field.contents()

    arch = key(gguf.Keys.General.ARCHITECTURE)
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    kind = key(gguf.Keys.General.TYPE) or "model"
    info = {"kind": f"gguf {kind}", "path": str(path), "architecture": arch, "name": key(gguf.Keys.General.NAME),
            "tensors": len(reader.tensors), "parameters": sum(int(t.n_elements) for t in reader.tensors),
            "tensor_types": types, "size_bytes": path.stat().st_size}
    if kind == "adapter":
        info.update(adapter_type=key(gguf.Keys.Adapter.TYPE), lora_alpha=key(gguf.Keys.Adapter.LORA_ALPHA))
    else:
        info.update(layers=key(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)),
                    hidden_size=key(gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)),
                    context_length=key(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)),
                    tokenizer=key(gguf.Keys.Tokenizer.MODEL), tokenizer_pre=key(gguf.Keys.Tokenizer.PRE),
                    chat_template=key(gguf.Keys.Tokenizer.CHAT_TEMPLATE) is not None)
    return info


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file():
        return True
    tokenizer_config = path / "tokenizer_config.json"
    return tokenizer_config.is_file() and "chat_template" in json.loads(tokenizer_config.read_text())


def describe_model_folder(path: Path) -> dict[str, Any]:
    """A Hugging Face model folder (a merged export, or any base): its config, weights, tokenizer."""
    config = json.loads((path / "config.json").read_text())
    shards = sorted(path.glob("*.safetensors"))
    headers = [_safetensors_header(s) for s in shards]
    dtypes: dict[str, int] = {}
    for header in headers:
        for entry in header.values():
            dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + 1
    from .export.gguf_arch import GGUF_ARCHS

    return {"kind": "model folder", "path": str(path), "model_type": config.get("model_type"),
            "architectures": config.get("architectures"), "layers": config.get("num_hidden_layers"),
            "hidden_size": config.get("hidden_size"), "vocab_size": config.get("vocab_size"),
            "weights": [s.name for s in shards], "tensors": sum(len(h) for h in headers),
            "parameters": sum(_parameters(h) for h in headers), "tensor_dtypes": dtypes,
            "size_bytes": sum(s.stat().st_size for s in shards),
            "tokenizer": (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file(),
            "chat_template": _has_chat_template(path),
            "gguf_export": config.get("model_type") in GGUF_ARCHS,
            "adapter_inside": (path / CONFIG_NAME).is_file()}


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What ``path`` is and holds: an adapter folder, a ``.gguf`` file or a Hugging Face model folder.

    Raises:
        ValueError: it is none of these (the message says what each needs).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return describe_gguf(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return describe_adapter(path)
    if path.is_dir() and (path / "config.json").is_file():
        return describe_model_folder(path)
    what = "does not exist" if not path.exists() else "is none of them"
    raise ValueError(f"{path} {what}: lora info reads an adapter folder ({CONFIG_NAME}), a .gguf file, or a Hugging "
                     f"Face model folder (config.json)")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(info: dict[str, Any]) -> str:
    """:func:`describe`'s answer as lines for a person."""
    lines = []
    for key, value in info.items():
        if key == "readers":
            lines.append("readers:")
            for name, reason in value.items():
                lines.append(f"  {READER_NAMES.get(name, name)}: {'yes' if reason is None else 'no, ' + reason}")
            continue
        if key == "size_bytes":
            key, value = "size", _size(value)
        elif key == "parameters":
            value = f"{value:,}"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value) if isinstance(value, dict) else (", ".join(map(str, value)) or "-")
        elif value is None:
            value = "-"
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


__all__ = ["describe", "describe_adapter", "describe_gguf", "describe_model_folder", "render"]
