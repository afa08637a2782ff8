"""JSONL datasets -> token ids: format detection, chat template, prompt masking, over-long policy, packing.

Every example becomes ``input_ids`` plus ``targets``, the already-shifted next-token labels (``-100`` where no loss
is taken: prompt tokens, padding, and each example's last position, so packed examples never predict each other).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
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
    "preference": "'prompt', 'chosen' and 'rejected' (DPO pairs)",
}
OVERLONG = ("truncate", "drop")
_ROLES = ("system", "user", "assistant")


def detect_format(record: dict) -> str | None:
    """The format whose keys ``record`` has, or None."""
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
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
    elif fmt == "preference":
        if not (is_str("prompt") and is_str("chosen") and is_str("rejected")):
            return "'prompt', 'chosen' and 'rejected' must be strings"
    elif fmt == "text":
        if not is_str("text") or not record["text"]:
            return "'text' must be a non-empty string"
    elif fmt == "classification":
        if not is_str("text") or not record["text"] or not isinstance(record.get("label"), (str, int)) \
                or isinstance(record["label"], bool):
            return "'text' must be a non-empty string and 'label' a string or an integer"
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


MAX_LINE_BYTES = 32 * 1024**2  # one example; a longer "line" is a file that is not JSONL (or lost its newlines)
_EXAMPLE_LINE = '{"instruction": "...", "output": "..."}'


def _open_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line, read as UTF-8 in binary so a bad byte or line names its line."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise ValueError(f"cannot read the data file {path} ({e.strerror}); check that it is a readable file") \
            from None
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except OSError as e:
                raise ValueError(f"cannot read the data file {path} ({e.strerror}); check that it is a readable "
                                 f"file") from None
            if not raw:
                return
            lineno += 1
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{where}: the line is longer than {MAX_LINE_BYTES // 1024**2} MiB; a JSONL file "
                                 f"holds one example per line (is this file JSONL, with its newlines intact?)")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at byte {e.start + 1} of the "
                                 f"line); save the file as UTF-8") from None


def _unencodable(value) -> str | None:
    """The first string inside a JSON value that is not valid text (a lone UTF-16 surrogate escape), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _label_kind(label) -> str:
    return "integer" if isinstance(label, int) else "string"


def _read(path: str | Path, format: str | None) -> tuple[str, list[dict], list[int]]:
    """:func:`read_jsonl` plus the line number of every record."""
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {sorted(FORMATS)}")
    if path.is_dir():
        raise ValueError(f"the data file {path} is a folder; pass the path of a JSONL file inside it")
    if not path.exists():
        raise ValueError(f"data file {path} does not exist; pass the path of a JSONL file (one JSON object per "
                         f"line, e.g. {_EXAMPLE_LINE})")
    if not path.is_file():
        raise ValueError(f"the data file {path} is not a regular file (a pipe or a device?); pass a JSONL file")
    detected = format is None
    records, linenos = [], []
    first_label = None  # (line, label) of the first classification label: all labels must be of one kind
    for lineno, line in _open_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): {line.strip()[:80]!r}; each "
                             f"line must be one JSON object, e.g. {_EXAMPLE_LINE}") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer of thousands of digits, or deep nesting
            raise ValueError(f"{where}: the JSON cannot be read ({e or type(e).__name__}); each line must be one "
                             f"JSON object, e.g. {_EXAMPLE_LINE}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}; each line must be "
                             f"one JSON object, e.g. {_EXAMPLE_LINE}")
        record_format = detect_format(record)
        if format is None:
            format = record_format
            if format is None:
                raise ValueError(f"{where}: cannot tell the format from the keys {sorted(record)}; expected "
                                 + "; or ".join(f"{k}: {v}" for k, v in FORMATS.items()))
            format_line = lineno
        problem = _check_record(record, format)
        if record_format not in (None, format) and (detected or problem):
            since = f"line {format_line} is" if detected else "the file is read as"
            raise ValueError(f"{where}: this record is in the {record_format!r} format ({FORMATS[record_format]}), "
                             f"but {since} {format!r}; one file holds one format: split the file, or convert these "
                             f"records to {FORMATS[format]}")
        if problem:
            raise ValueError(f"{where}: {problem} for the {format!r} format; found keys {sorted(record)}")
        bad = _unencodable(record)
        if bad is not None:
            raise ValueError(f"{where}: the string {bad[:40]!r} holds an unpaired surrogate escape (such as "
                             f"\\ud800), which is not text; write the character itself or a valid pair")
        if format == "classification":
            label = record["label"]
            if first_label is None:
                first_label = (lineno, label)
            elif _label_kind(label) != _label_kind(first_label[1]):
                raise ValueError(f"{where}: label {label!r} is {_label_kind(label)}, but line {first_label[0]} has "
                                 f"the {_label_kind(first_label[1])} label {first_label[1]!r}; use one kind for "
                                 f"every label (all strings, or all integers)")
        records.append(record)
        linenos.append(lineno)
    if not records:
        raise ValueError(f"{path} holds no examples; a JSONL file has one JSON object per line, e.g. {_EXAMPLE_LINE}")
    return format, records, linenos


def read_jsonl(path: str | Path, format: str | None = None) -> tuple[str, list[dict]]:
    """Read and validate a JSONL file (UTF-8); the format is detected from the first record's keys unless given.

    Every record must be in that one format; classification labels must be all strings or all integers.

    Returns:
        ``(format, records)``.

    Raises:
        ValueError: ``file:line``, what was found there and what was expected.
    """
    format, records, _ = _read(path, format)
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


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (a BOS, for Llama-style tokenizers; none for GPT-2),
    found by what it does rather than by ``add_bos_token``, which tokenizers that add BOS in their post-processor
    do not set."""
    marked = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start:start + len(plain)] == plain:
            return marked[:start]
    return []


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation: the one place prompts are formatted, for training, evaluation and generation.

    A tokenizer with a chat template uses it. Without one (base models, GPT-2), a plain template: each turn is
    ``"role:"`` then ``" content"``, tokenized as separate pieces and joined as ids, with EOS closing each assistant
    turn. Tokenizing the pieces apart is what keeps a prompt's ids a prefix of the same prompt with its answer: one
    string ``"assistant: c"`` would let a byte-level BPE merge the space into the answer (``":", "Ġc"``) while the
    prompt alone ends in ``":", "Ġ"``.
    """
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, return_dict=True)["input_ids"])

    def piece(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = special_prefix(tokenizer)
    for m in messages:
        ids += piece(f"{m['role']}:")
        if m["role"] == "assistant":
            ids += piece(f" {m['content']}") + [tokenizer.eos_token_id]
        else:
            ids += piece(f" {m['content']}\n")
    if add_generation_prompt:
        ids += piece("assistant:")
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
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or an integer >= 1, got {max_length!r}")
    if label_names is not None and (isinstance(label_names, str) or not all(
            isinstance(n, (str, int)) and not isinstance(n, bool) for n in label_names)):
        raise ValueError(f"label_names must be a list of class labels (strings or integers), got {label_names!r}")
    fmt, records, linenos = _read(path, format)
    if fmt == "preference":
        raise ValueError(f"{path} holds preference pairs ({FORMATS[fmt]}); train on them with recipes/dpo.py (or "
                         f"lora.dpo.load_preferences), not as instruction examples")
    stats = DataStats(examples=len(records))
    if fmt == "classification":
        found = {r["label"] for r in records}  # one kind (checked by _read), so they sort: 2 before 10
        stats.labels = list(label_names) if label_names is not None else sorted(found)
        unknown = sorted(found - set(stats.labels), key=lambda v: (isinstance(v, str), v))
        if unknown:
            raise ValueError(f"{path}: labels {unknown} are not among the classes {stats.labels}; pass "
                             f"label_names that include them (or leave label_names out)")
    examples = []
    for record, lineno in zip(records, linenos):
        try:
            if fmt == "classification":
                ids, labels = tokenizer(record["text"])["input_ids"], None
            elif fmt == "text":
                ids = tokenizer(record["text"])["input_ids"] + [tokenizer.eos_token_id]
                labels = list(ids)
            else:
                ids, labels = tokenize_chat(tokenizer, to_messages(record, fmt), mask_prompt)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        except Exception as e:
            if type(e).__module__.startswith("jinja2"):  # a chat template's raise_exception(...)
                raise ValueError(f"{path}:{lineno}: the tokenizer's chat template refuses this conversation ({e}); "
                                 f"change the record to what the template accepts") from None
            raise
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
                         f"max_length, or use overlong='truncate'")
    return examples, stats


def pack(examples: list[dict], seq_len: int, pad_id: int) -> list[dict]:
    """Pack examples into rows of exactly ``seq_len`` tokens, without splitting any example.

    Longest first, each example goes into the row with the least room that still fits it (best-fit decreasing):
    rows come out nearly full, where filling them in file order leaves ~10% padding on short-example data. Inside a
    row, examples keep their file order; the trainer shuffles rows every epoch.

    Positions restart at 0 for every example, which Hugging Face models turn into block-diagonal attention when no
    ``attention_mask`` is given, so packed examples never see each other. Row tails are padding with no loss, and
    their positions restart too (a segment of its own).
    """
    for ex in examples:
        if len(ex["input_ids"]) > seq_len:
            raise ValueError(f"an example of {len(ex['input_ids'])} tokens does not fit a packed row of {seq_len}; "
                             f"load the data with max_length <= {seq_len}")
    members: list[list[int]] = []  # example indices per row
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first with enough room
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"])):
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            members.append([i])
            free, row = seq_len - n, len(members) - 1
        else:
            free, row = room.pop(at)
            members[row].append(i)
            free -= n
        bisect.insort(room, (free, row))
    rows = []
    for chosen in members:
        parts = [examples[i] for i in sorted(chosen)]
        real = sum(len(ex["input_ids"]) for ex in parts)
        fill = seq_len - real
        rows.append({"input_ids": torch.tensor([t for ex in parts for t in ex["input_ids"]] + [pad_id] * fill),
                     "targets": torch.tensor([t for ex in parts for t in ex["targets"]] + [IGNORE] * fill),
                     "position_ids": torch.tensor([p for ex in parts for p in range(len(ex["input_ids"]))]
                                                  + list(range(fill))),
                     "real_tokens": real})
    return rows


def join_rows(rows: list[dict]) -> dict:
    """The examples of several packed rows (:func:`pack`) as one row, without the rows' padding tails.

    Where attention runs per example (:mod:`lora.attention`), the row an example sits in changes none of its
    results: only the tails' work, ~6% of a micro-batch on the bundled task, goes.
    """
    row = {k: torch.cat([torch.as_tensor(r[k])[:r["real_tokens"]] for r in rows])
           for k in ("input_ids", "targets", "position_ids")}
    row["real_tokens"] = sum(r["real_tokens"] for r in rows)
    return row


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


def prompts_and_answers(path: str | Path) -> tuple[list[list[dict]], list[str]]:
    """The prompt and expected answer of every example in an instruction file (for exact match).

    A prompt is the conversation before the answer (system prompt and earlier turns included), for
    :func:`lora.generate.exact_match` to format exactly as training did (:func:`render_chat`).
    """
    fmt, records, linenos = _read(path, None)
    if fmt not in ("alpaca", "prompt_completion", "chat"):
        raise ValueError(f"{path} is in the {fmt!r} format; exact-match evaluation needs prompts with answers")
    prompts, answers = [], []
    for record, lineno in zip(records, linenos):
        messages = to_messages(record, fmt)
        if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] == "assistant":
            raise ValueError(f"{path}:{lineno}: exact-match evaluation needs a conversation that ends with a prompt "
                             f"turn and then the assistant's answer; found the roles {[m['role'] for m in messages]}")
        prompts.append(messages[:-1])
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


__all__ = ["read_jsonl", "load_dataset", "prompts_and_answers", "pack", "join_rows", "collate", "model_inputs",
           "detect_format", "tokenize_chat", "render_chat", "DataStats", "FORMATS", "IGNORE", "MAX_LINE_BYTES"]
