"""A suite of generated tasks, unlike the bundled one, for choosing the sft recipe's defaults (issue 20).

    .venv/bin/python bench/suite.py --generate-only --out /tmp/lora-suite     # write every task's files
    .venv/bin/python bench/suite.py                                           # generate and train the tuning tasks

Every task is generated from a seed, with nothing downloaded: the same seed and sizes give the same files. Each one
writes ``train.jsonl`` and ``eval.jsonl`` in a format the library reads (Alpaca, ``prompt``/``completion`` or chat
``messages``); no eval prompt also appears in train. "tuning" tasks are the ones defaults may be chosen on;
"held-out" tasks are kept out of that choice and only reported, so that a default is judged on tasks it was not
fitted to (STYLE.md, Take 14).

| task | kind | train | eval | format | role |
|---|---|---|---|---|---|
| booking_fields | extraction of four fields at once | 500 | 150 | alpaca + input | tuning |
| headline_topic | classification answered in a word | 600 | 150 | prompt/completion | tuning |
| date_iso | format conversion (dates to ISO 8601) | 800 | 150 | alpaca, no input | tuning |
| word_arith | one- or two-step word problems, integer answer | 2,000 | 150 | prompt/completion | tuning |
| product_blurb | free text (scored by held-out loss) | 300 | 100 | alpaca + input | tuning |
| snake_case | small data: titles to identifiers | 56 | 100 | chat, one turn | tuning |
| trip_chat | multi-turn chat: recall a detail, or its update | 300 | 100 | chat + system, 3-5 user turns | held-out |
| json_fix | format conversion (JSON repair) | 400 | 150 | prompt/completion | held-out |

About 400k training tokens in all (310k of them in the tuning tasks) with SmolLM2's chat template, whose default
system prompt adds ~20 tokens to every example; at ~170 tokens/s on two CPU cores that is ~40 minutes of training
for a whole epoch of every task, before early stopping and the exact-match evaluations.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import blurb, booking, dates, json_fix, snake, topic, trip_chat, word_arith


@dataclass(frozen=True)
class Task:
    """One generated task: what it tests, how big it is by default, and how one example is drawn."""

    name: str
    kind: str
    format: str
    train: int
    eval: int
    role: str  # "tuning" or "held-out"
    scoring: str  # "exact": exact match on the last answer; "loss": held-out loss (answers are free text)
    example: Callable[[random.Random], dict]


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("booking_fields", "extraction, 4 fields", "alpaca", 500, 150, "tuning", "exact", booking.example),
    Task("headline_topic", "classification (word)", "prompt_completion", 600, 150, "tuning", "exact", topic.example),
    Task("date_iso", "conversion (dates)", "alpaca", 800, 150, "tuning", "exact", dates.example),
    Task("word_arith", "arithmetic reasoning", "prompt_completion", 2000, 150, "tuning", "exact", word_arith.example),
    Task("product_blurb", "free text", "alpaca", 300, 100, "tuning", "loss", blurb.example),
    Task("snake_case", "small data (rewrite)", "chat", 56, 100, "tuning", "exact", snake.example),
    Task("trip_chat", "multi-turn chat", "chat", 300, 100, "held-out", "exact", trip_chat.example),
    Task("json_fix", "conversion (JSON repair)", "prompt_completion", 400, 150, "held-out", "exact", json_fix.example),
]}


def prompt_key(record: dict) -> str:
    """Everything but the answer, as one string: two records with the same key ask the same question."""
    if "messages" in record:
        return json.dumps(record["messages"][:-1], sort_keys=True)
    if "instruction" in record:
        return json.dumps([record["instruction"], record.get("input", "")])
    return record["prompt"]


def draw(task: Task, rng: random.Random, count: int, exclude: set[str]) -> list[dict]:
    """``count`` examples whose prompts are distinct and not in ``exclude`` (which grows by theirs).

    Distinct prompts keep a small train set as varied as it can be, and keep eval questions out of train.
    """
    records: list[dict] = []
    attempts = 0
    while len(records) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"task {task.name}: only {len(records)} distinct examples of the {count} asked for "
                             f"after {attempts - 1} draws; ask for fewer")
        record = task.example(rng)
        key = prompt_key(record)
        if key in exclude:
            continue
        exclude.add(key)
        records.append(record)
    return records


def write_task(task: Task, out: Path, seed: int = 0, train: int | None = None, eval: int | None = None) \
        -> tuple[Path, Path]:
    """Write ``out/train.jsonl`` and ``out/eval.jsonl`` for ``task``; sizes default to the task's own.

    Returns:
        The two paths.
    """
    train = task.train if train is None else train
    eval = task.eval if eval is None else eval
    # A string seed is hashed the same way in every process (unlike hash()), so the files repeat exactly.
    rng = random.Random(f"{task.name}:{seed}")
    seen: set[str] = set()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, count in (("train.jsonl", train), ("eval.jsonl", eval)):
        path = out / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in draw(task, rng, count, seen)))
        paths.append(path)
    return paths[0], paths[1]


__all__ = ["TASKS", "Task", "draw", "prompt_key", "write_task"]
