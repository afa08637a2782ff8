"""JSONL datasets -> token ids: format detection, chat template, prompt masking, over-long policy, packing.

Every example becomes ``input_ids`` plus ``targets``, the already-shifted next-token labels (``-100`` where no loss
is taken: prompt tokens, padding, and each example's last position, so packed examples never predict each other).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100
FORMATS = {
    "alpaca": "'instruction' and 'output' (optional 'input')",
    "chat": "'messages': a list of {'role', 'content'}",
    "prompt_completion": "'prompt' and 'completion'",
    "text": "'text' (plain text for continued pre-training)",
    "classification": "'text' and 'label'",
}
OVERLONG = ("truncate", "drop")
_ROLES = ("system", "user", "assistant")


def detect_format(record: dict) -> str | None:
    """The format whose keys ``record`` has, or None."""
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def _check_record(record: dict, fmt: str) -> str | None:
    """What is wrong with ``record`` for ``fmt`` (None if it is fine)."""
    def is_str(key):
        return isinstance(record.get(key), str)

    if fmt == "alpaca":
        if not (is_str("instruction") and is_str("output")) or not isinstance(record.get("input", ""), str):
            return "'instruction' and 'output' (and 'input' if present) must be strings"
    elif fmt == "prompt_completion":
        if not (is_str("prompt") and is_str("completion")):
            return "'prompt' and 'completion' must be strings"
    elif fmt == "text":
        if not is_str("text") or not record["text"]:
            return "'text' must be a non-empty string"
    elif fmt == "classification":
        if not is_str("text") or not isinstance(record.get("label"), (str, int)) or isinstance(record["label"], bool):
            return "'text' must be a string and 'label' a string or an integer"
    elif fmt == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be {{'role': one of {list(_ROLES)}, 'content': a string}}, got {m!r}"
        if not any(m["role"] == "assistant" for m in messages):
            return "'messages' has no assistant turn, so there is nothing to learn"
    return None


def read_jsonl(path: str | Path, format: str | None = None) -> tuple[str, list[dict]]:
    """Read and validate a JSONL file; the format is detected from the first record's keys unless given.

    Returns:
        ``(format, records)``.

    Raises:
        ValueError: ``file:line``, what was found there and what was expected.
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {sorted(FORMATS)}")
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
            if format is None:
                format = detect_format(record)
                if format is None:
                    raise ValueError(f"{where}: cannot tell the format from the keys {sorted(record)}; expected "
                                     + "; or ".join(f"{k}: {v}" for k, v in FORMATS.items()))
            problem = _check_record(record, format)
            if problem:
                raise ValueError(f"{where}: {problem} for the {format!r} format; found keys {sorted(record)}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no examples")
    return format, records


def to_messages(record: dict, fmt: str) -> list[dict]:
    """The conversation an instruction record stands for (the answer as the last assistant turn)."""
    if fmt == "chat":
        return record["messages"]
    if fmt == "alpaca":
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise ValueError(f"the {fmt!r} format has no prompt/answer structure")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (a plain fallback if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, return_dict=True)["input_ids"])
    # No template (base models, test tokenizers): "role: content" lines, EOS closing each assistant turn.
    ids: list[int] = []
    for m in messages:
        ids += tokenizer(f"{m['role']}: {m['content']}\n", add_special_tokens=False)["input_ids"]
        if m["role"] == "assistant":
            ids.append(tokenizer.eos_token_id)
    if add_generation_prompt:
        ids += tokenizer("assistant: ", add_special_tokens=False)["input_ids"]
    return ids


def tokenize_chat(tokenizer, messages: list[dict], mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: labels copy the ids on assistant turns and are ``-100`` elsewhere if ``mask_prompt``.

    Each assistant turn's tokens are found as the difference between the conversation rendered up to that turn and
    the prompt that precedes it, which needs a prefix-stable template (true of ChatML, Llama, Mistral, ...).
    """
    labels: list[int] = []
    done: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1])
        if prompt[: len(done)] != done or upto[: len(prompt)] != prompt:
            raise ValueError("this tokenizer's chat template renders a conversation differently from its prefix, so "
                             "prompt tokens cannot be masked; pass mask_prompt=False")
        labels += [IGNORE] * (len(prompt) - len(done)) + upto[len(prompt):]
        done = upto
    ids = render_chat(tokenizer, messages)
    labels += [IGNORE] * (len(ids) - len(done))
    return ids, (labels if mask_prompt else list(ids))


@dataclass
class DataStats:
    """What happened to a file's examples; shown to the user."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    target_tokens: int = 0
    labels: list = field(default_factory=list)  # classification: label names, index = class id

    def describe(self) -> str:
        kept = self.examples - self.dropped
        return (f"{kept}/{self.examples} examples kept ({self.truncated} truncated, {self.dropped} dropped as "
                f"too long), {self.tokens} tokens, {self.target_tokens} with a loss")


def load_dataset(path: str | Path, tokenizer, format: str | None = None, max_length: int | None = None,
                 overlong: str = "truncate", mask_prompt: bool = True,
                 label_names: list | None = None) -> tuple[list[dict], DataStats]:
    """Read a JSONL file and tokenize it.

    Args:
        path: The JSONL file.
        tokenizer: The model's tokenizer (its chat template frames instruction data).
        format: One of ``FORMATS`` (default: detected).
        max_length: Longest example in tokens. Longer ones are cut to it (``overlong="truncate"``) or left out
            (``"drop"``); a truncated example with no answer token left is dropped too. Counted in the stats.
        mask_prompt: Take the loss on answers only (instruction formats).
        label_names: Classification: the class order to use (default: sorted labels of this file).

    Returns:
        ``(examples, stats)``; an example has ``input_ids`` and ``targets`` (shifted labels), or for
        classification ``input_ids`` and ``label`` (class index).
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    fmt, records = read_jsonl(path, format)
    stats = DataStats(examples=len(records))
    if fmt == "classification":
        stats.labels = list(label_names) if label_names is not None else sorted({r["label"] for r in records}, key=str)
        unknown = sorted({r["label"] for r in records} - set(stats.labels), key=str)
        if unknown:
            raise ValueError(f"{path}: labels {unknown} are not among the classes {stats.labels}")
    examples = []
    for record in records:
        if fmt == "classification":
            ids, labels = tokenizer(record["text"])["input_ids"], None
        elif fmt == "text":
            ids = tokenizer(record["text"])["input_ids"] + [tokenizer.eos_token_id]
            labels = list(ids)
        else:
            ids, labels = tokenize_chat(tokenizer, to_messages(record, fmt), mask_prompt)
        if max_length is not None and len(ids) > max_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids = ids[:max_length]
            labels = labels[:max_length] if labels is not None else None
            stats.truncated += 1
        if labels is None:
            examples.append({"input_ids": ids, "label": stats.labels.index(record["label"])})
            stats.tokens += len(ids)
            continue
        targets = labels[1:] + [IGNORE]  # position t predicts token t+1
        n_targets = sum(t != IGNORE for t in targets)
        if n_targets == 0:
            stats.dropped += 1
            continue
        examples.append({"input_ids": ids, "targets": targets})
        stats.tokens += len(ids)
        stats.target_tokens += n_targets
    if not examples:
        raise ValueError(f"{path}: no example left after the over-long policy ({stats.describe()}); raise "
                         f"max_length")
    return examples, stats


def pack(examples: list[dict], seq_len: int, pad_id: int) -> list[dict]:
    """Pack examples into rows of exactly ``seq_len`` tokens, in order, without splitting any example.

    Positions restart at 0 for every example, which Hugging Face models turn into block-diagonal attention when no
    ``attention_mask`` is given, so packed examples never see each other. Row tails are padding with no loss.
    """
    rows, current = [], {"input_ids": [], "targets": [], "position_ids": []}

    def close() -> None:
        real = len(current["input_ids"])
        fill = seq_len - real
        current["input_ids"] += [pad_id] * fill
        current["targets"] += [IGNORE] * fill
        current["position_ids"] += list(range(fill))
        rows.append({**{k: torch.tensor(v) for k, v in current.items()}, "real_tokens": real})

    for ex in examples:
        n = len(ex["input_ids"])
        if n > seq_len:
            raise ValueError(f"an example of {n} tokens does not fit a packed row of {seq_len}; load the data with "
                             f"max_length <= {seq_len}")
        if len(current["input_ids"]) + n > seq_len:
            close()
            current = {"input_ids": [], "targets": [], "position_ids": []}
        current["input_ids"] += ex["input_ids"]
        current["targets"] += ex["targets"]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        close()
    return rows


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack examples (packed rows or single examples, right-padded) into one batch.

    ``real_tokens`` counts the tokens that are not padding, for throughput figures.
    """
    width = max(len(ex["input_ids"]) for ex in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
             "targets": torch.full((len(examples), width), IGNORE, dtype=torch.long),
             "position_ids": torch.zeros((len(examples), width), dtype=torch.long),
             "real_tokens": torch.tensor(sum(ex.get("real_tokens", len(ex["input_ids"])) for ex in examples))}
    padded = any(len(ex["input_ids"]) < width for ex in examples)
    if padded:
        batch["attention_mask"] = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        batch["input_ids"][i, :n] = torch.as_tensor(ex["input_ids"])
        batch["targets"][i, :n] = torch.as_tensor(ex["targets"])
        batch["position_ids"][i, :n] = torch.as_tensor(ex["position_ids"]) if "position_ids" in ex \
            else torch.arange(n)
        if padded:
            batch["attention_mask"][i, :n] = 1
    return batch


def prompts_and_answers(path: str | Path) -> tuple[list[str], list[str]]:
    """The user prompt and expected answer of every example in an instruction file (for exact match)."""
    fmt, records = read_jsonl(path)
    if fmt not in ("alpaca", "prompt_completion", "chat"):
        raise ValueError(f"{path} is in the {fmt!r} format; exact-match evaluation needs prompts with answers")
    prompts, answers = [], []
    for record in records:
        messages = to_messages(record, fmt)
        prompts.append(messages[-2]["content"])
        answers.append(messages[-1]["content"])
    return prompts, answers


_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """Keyword arguments for a Hugging Face causal LM's forward on a batch from :func:`collate` (targets left out).

    ``use_cache=False`` matters for packed rows: transformers builds its block-diagonal mask from restarting
    ``position_ids`` only when there is neither an ``attention_mask`` nor a KV cache.
    """
    inputs: dict[str, torch.Tensor | bool] = {k: batch[k] for k in _MODEL_KEYS if k in batch}
    inputs["use_cache"] = False
    return inputs


__all__ = ["read_jsonl", "load_dataset", "prompts_and_answers", "pack", "collate", "model_inputs", "detect_format", "tokenize_chat", "render_chat",
           "DataStats", "FORMATS", "IGNORE"]
