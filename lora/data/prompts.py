"""Prompts for reinforcement learning on a reward (GRPO): ``{"prompt", ...}`` records -> the prompt's token ids and
the record's other columns, which the reward functions receive (the reference answer, say).

A prompt is a string (a user turn) or a conversation that ends before the answer (``[{"role", "content"}, ...]``);
it is rendered through :func:`lora.data.render_chat` with the generation prompt, as generation renders it.
"""

from __future__ import annotations

from .chat import render_chat
from .dataset import DataStats
from .sources import open_source

_EXAMPLE = '{"prompt": "What is 7 + 5? Reply with the number only.", "answer": "12"}'


def _messages(where: str, prompt) -> list[dict]:
    """The conversation a prompt stands for, or a ValueError that says what is wrong at ``where``."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        if prompt[-1]["role"] == "assistant":
            raise ValueError(f"{where}: the prompt conversation ends with an assistant turn; end it before the "
                             f"answer the model is to write (a user turn, usually)")
        return prompt
    raise ValueError(f"{where}: 'prompt' must be a string or a list of {{'role', 'content'}} messages, got "
                     f"{type(prompt).__name__}; e.g. {_EXAMPLE}")


def load_prompts(source, tokenizer, max_length: int | None = None) -> tuple[list[dict], DataStats]:
    """Read prompts (one record per prompt: ``"prompt"`` plus any columns) and tokenize them for generation.

    Args:
        source: A JSONL file or any source :func:`lora.data.open_source` takes (JSON, CSV, Parquet, a list of
            dicts, a ``datasets.Dataset``).
        tokenizer: The model's tokenizer (its chat template formats the prompts).
        max_length: Longest prompt in tokens; longer ones are dropped and counted (a prompt cut short would ask
            another question).

    Returns:
        ``(prompts, stats)``: each prompt is ``{"input_ids", "prompt", "columns"}``, ``prompt`` as given and
        ``columns`` the record's other fields (what reward functions get as keyword arguments).

    Raises:
        ValueError: ``file:line`` and what is wrong there (no ``prompt``, a prompt of the wrong type, columns that
            differ from the first record's), or no prompt left.
    """
    src = open_source(source)
    prompts, stats, first_columns = [], DataStats(format="prompts"), None
    for where, record, _ in src.rows():
        if not isinstance(record, dict) or "prompt" not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: a prompt record needs a 'prompt' key (other keys are columns the reward "
                             f"functions receive), found {found}; e.g. {_EXAMPLE}")
        columns = {k: v for k, v in record.items() if k != "prompt"}
        if first_columns is None:
            first_columns = sorted(columns)
        elif sorted(columns) != first_columns:
            # reward functions take the columns as keyword arguments, one list per column: every record needs them
            raise ValueError(f"{where}: this record has the columns {sorted(columns)}, the first one "
                             f"{first_columns}; give every prompt the same columns")
        stats.examples += 1
        ids = render_chat(tokenizer, _messages(where, record["prompt"]), add_generation_prompt=True)
        if max_length is not None and len(ids) > max_length:
            stats.dropped += 1
            continue
        stats.tokens += len(ids)
        prompts.append({"input_ids": ids, "prompt": record["prompt"], "columns": columns})
    if not prompts:
        raise ValueError(f"{src.name} holds no usable prompt ({stats.describe()}); check the file, or raise "
                         f"max_length (seq_len minus max_new_tokens)")
    return prompts, stats


__all__ = ["load_prompts"]
