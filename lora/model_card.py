"""The model card: a README.md in every adapter folder that tells a person what the adapter is and how to load it.

It is written from what the folder holds (``adapter_config.json`` and the tensors) and what the run that saved it
knew (data, training settings, metrics). :func:`readers` decides from the config alone which readers can take the
adapter; ``lora info`` uses the same answer, refined by what the export wing knows of the base's family.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
FINGERPRINT_KEY = "base_model_fingerprint"  # as adapter_io writes it (kept here so the core's lowest module owns it)


def fingerprint_digest(config: dict[str, Any]) -> str | None:
    """A short hash of the adapter's base-model fingerprint, for a person to compare two adapters' bases (the check
    itself compares the sampled values, with rounding allowed; two digests differ for a bf16 copy of a base)."""
    saved = config.get(FINGERPRINT_KEY)
    if not isinstance(saved, dict) or not saved:
        return None
    return hashlib.sha256(json.dumps(saved, sort_keys=True).encode()).hexdigest()[:16]


def _uses(config: dict[str, Any]) -> list[str]:
    """The features of an adapter beyond plain A/B pairs on linear layers, in words."""
    found = []
    if config.get("use_dora"):
        found.append("DoRA")
    if config.get("bias", "none") not in (None, "none"):
        found.append("trained biases")
    if config.get("modules_to_save"):
        found.append(f"modules_to_save {list(config['modules_to_save'])}")
    if config.get("target_parameters"):
        found.append("target_parameters")
    if config.get("trainable_token_indices"):
        found.append("trainable tokens")
    return found


def readers(config: dict[str, Any]) -> dict[str, str | None]:
    """Which readers can take an adapter with this ``adapter_config.json``: reader -> None (it can), or the reason
    it cannot and what to do instead.

    Readers: ``"peft"`` (``PeftModel.from_pretrained``), ``"vllm"`` (``--enable-lora``), ``"llama.cpp"`` (an
    adapter GGUF from ``lora export gguf --adapter-only``, also Ollama's ``ADAPTER`` line). The base model's family
    is not known here: ``lora info`` adds that for llama.cpp.
    """
    merge = "merge it into the base instead (lora merge, or lora export gguf --adapter DIR)"
    classifier = config.get("task_type") == "SEQ_CLS"
    extra = _uses(config)
    vllm_bad = [u for u in extra if not u.startswith("trained biases")]
    result: dict[str, str | None] = {"peft": None}
    if classifier:
        result["vllm"] = "a sequence classifier's adapter: vLLM serves LoRA adapters of causal LMs"
        result["llama.cpp"] = "a sequence classifier's adapter: llama.cpp adapters are for causal LMs"
        return result
    result["vllm"] = f"it uses {', '.join(vllm_bad)}, which vLLM's LoRA serving does not load; {merge}" \
        if vllm_bad else None
    result["llama.cpp"] = f"it uses {', '.join(extra)}; llama.cpp adapters hold plain LoRA A/B pairs only; " \
                          f"{merge}" if extra else None
    return result


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) if v else "-"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _table(rows: dict[str, Any]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {_value(v).replace('|', '/')} |" for k, v in rows.items()]
    return lines + [""]


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(folder: str | Path, config: dict[str, Any], parameters: int, size_bytes: int,
           card: dict[str, Any] | None = None) -> str:
    """The README.md text of an adapter folder.

    Args:
        folder: The adapter folder (named in the load examples).
        config: Its ``adapter_config.json``.
        parameters: The number of values in its tensors.
        size_bytes: The size of its weights file.
        card: What the run knew, each a mapping shown as a table: ``"data"`` (files, counts), ``"training"``
            (settings, steps), ``"metrics"``.
    """
    card = card or {}
    base = config.get("base_model_name_or_path") or "(not recorded)"
    folder = str(folder)
    targets = config.get("target_modules") or []
    target_list = targets if isinstance(targets, list) else [targets]
    suffixes = sorted({str(t).rsplit(".", 1)[-1] for t in target_list})
    scale_rule = "alpha / sqrt(r)" if config.get("use_rslora") else "alpha / r"
    r, alpha = config.get("r"), config.get("lora_alpha")
    scale = None
    if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r > 0:
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    digest = fingerprint_digest(config)
    fp = config.get(FINGERPRINT_KEY) or {}
    sampled = len(fp.get("values", {})) if isinstance(fp, dict) and isinstance(fp.get("values"), dict) else 0
    classifier = config.get("task_type") == "SEQ_CLS"

    lines = ["---", f"base_model: {json.dumps(base)}", "library_name: peft",
             f"tags: [lora, {'text-classification' if classifier else 'text-generation'}]", "---", "",
             f"# LoRA adapter for {base}", "",
             "Written by the `lora` library, in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`). "
             "This card is rewritten on every save of the folder.", "",
             "## Base model", ""]
    lines += _table({"base_model_name_or_path": base,
                     "fingerprint": f"sha256 {digest} ({fp.get('dtype', '?')} weights, {sampled} tensors sampled)"
                     if digest else "none recorded (cannot be checked against a base)",
                     "task": config.get("task_type") or "-"})
    lines += ["Loading checks the fingerprint: an adapter trained on another base is refused (`check_base=False`, "
              "`--no-check-base` to override)."]
    if "/" not in base and not Path(base).exists():  # an embedded name such as smollm2-135m (or a bare hub id)
        lines += ["", f"If `{base}` is one of this library's embedded models, transformers, PEFT and vLLM read it as "
                  f"the folder that `python -c \"from lora.models import converted_folder; "
                  f"print(converted_folder('{base}'))\"` prints: use that path for the base below."]
    lines += ["", "## LoRA settings", ""]
    lines += _table({"r": r, "lora_alpha": alpha, "scale": f"{_value(scale)} ({scale_rule})",
                     "lora_dropout": config.get("lora_dropout"), "use_rslora": config.get("use_rslora", False),
                     "use_dora": config.get("use_dora", False), "bias": config.get("bias", "none"),
                     "modules_to_save": config.get("modules_to_save"),
                     "target modules": f"{len(target_list)} ({', '.join(suffixes)})",
                     "parameters": f"{parameters:,}", "weights file": _size(size_bytes)})
    for title, key in (("Data", "data"), ("Training", "training"), ("Metrics", "metrics")):
        section = card.get(key)
        if isinstance(section, dict) and section:
            lines += [f"## {title}", ""]
            lines += _table({k: v for k, v in section.items()
                             if v is None or isinstance(v, (str, int, float, bool, list, tuple))})

    auto = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    lines += ["## How to load it", "", "PEFT:", "", "```python", f"from transformers import {auto}",
              "from peft import PeftModel", "", f"base = {auto}.from_pretrained({base!r})",
              f"model = PeftModel.from_pretrained(base, {folder!r})", "```", "",
              "This library (any base `lora.load_model` reads: an HF folder, a .gguf file, an embedded name):", "",
              "```python", "import lora", "",
              f"model, tokenizer = lora.load_model({base!r}{', num_labels=...' if classifier else ''})",
              f"lora.load_adapter(model, {folder!r})", "```", ""]
    if not classifier:
        lines += ["```bash", f"lora generate --model {base} --adapter {folder} --prompt \"...\"",
                  f"lora eval --model {base} --adapter {folder} --data held_out.jsonl", "```", ""]
    can = readers(config)
    if can["vllm"] is None:
        rank = f" --max-lora-rank {r}" if isinstance(r, int) and r > 16 else ""
        lines += ["vLLM:", "", "```bash", f"vllm serve {base} --enable-lora{rank} --lora-modules adapter={folder}",
                  "```", ""]
    else:
        lines += [f"vLLM: no, {can['vllm']}.", ""]
    if can["llama.cpp"] is None:
        lines += ["llama.cpp / Ollama (for the model families GGUF export writes; `lora info` says for this base):",
                  "", "```bash",
                  f"lora export gguf --model {base} --adapter {folder} --out exports/model.gguf --adapter-only",
                  "llama-cli -m exports/model.gguf --lora exports/model.adapter.gguf   # Ollama: the Modelfile",
                  "```", ""]
    else:
        lines += [f"llama.cpp / Ollama: not as an adapter, {can['llama.cpp']}.", ""]
    return "\n".join(lines)


def write(folder: str | Path, config: dict[str, Any], parameters: int, size_bytes: int,
          card: dict[str, Any] | None = None, display_folder: str | Path | None = None) -> Path:
    """Render the card and write it as ``folder/README.md`` in one write (no half card is left on failure)."""
    text = render(display_folder or folder, config, parameters, size_bytes, card)
    path = Path(folder) / CARD_NAME
    try:
        path.write_text(text + "\n", encoding="utf-8")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


__all__ = ["render", "write", "readers", "fingerprint_digest", "CARD_NAME"]
