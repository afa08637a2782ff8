"""Preference pairs -> tokenized chosen and rejected completions, for DPO.

A pair is ``{"prompt", "chosen", "rejected"}``, or in Alpaca's layout ``{"instruction", "input", "chosen",
"rejected"}`` (the prompt is the instruction and input, framed as Alpaca records are), from any source
:func:`lora.data.load_dataset` reads.
"""

from __future__ import annotations

from itertools import islice

import numpy as np

from .chat import IGNORE
from .dataset import CHUNK, DataStats
from .encode import Encoder
from .formats import preference_prompt
from .sources import Records


def _completion(ids: np.ndarray, labels: np.ndarray, max_length: int | None) -> dict | None:
    """One answer after its prompt, the loss on the answer only; None if ``max_length`` cuts the answer away."""
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    targets = labels[1:].tolist() + [IGNORE]  # position t predicts token t+1
    return {"input_ids": ids.tolist(), "targets": targets} if any(t != IGNORE for t in targets) else None


def load_preferences(source, tokenizer, max_length: int | None = None,
                     columns: str | dict | None = None) -> tuple[list[dict], DataStats]:
    """Read preference pairs (see the module's docstring) and tokenize them.

    Args:
        source: Any source :func:`lora.data.load_dataset` takes.
        tokenizer: The model's tokenizer; the prompt is a user turn of its chat template, each answer the
            assistant's.
        max_length: Cut each completion (prompt and answer) to this many tokens.
        columns: Our field names for the source's columns, e.g. ``"prompt:question,chosen:good,rejected:bad"``.

    Returns:
        ``(pairs, stats)``: each pair is ``{"chosen": example, "rejected": example}``, an example being
        ``input_ids`` + ``targets`` with the loss on the answer; a pair either of whose answers is cut away by
        ``max_length`` is dropped and counted.

    Raises:
        ValueError: where the problem is and what it is, or no pair left.
    """
    records = Records(source, "preference", columns)
    encoder = Encoder(tokenizer)
    pairs, stats = [], DataStats(format="preference")
    rows = iter(records)
    while chunk := list(islice(rows, CHUNK)):
        conversations = []
        for _, record, _ in chunk:
            prompt = {"role": "user", "content": preference_prompt(record)}
            for answer in (record["chosen"], record["rejected"]):
                conversations.append(([prompt, {"role": "assistant", "content": answer}], None))
        try:
            encoded = encoder.chats(conversations)
        except ValueError as e:
            raise ValueError(f"{chunk[getattr(e, 'index', 0) // 2][0]}: {e}") from None
        for k in range(len(chunk)):
            stats.examples += 1
            chosen = _completion(*encoded[2 * k], max_length)
            rejected = _completion(*encoded[2 * k + 1], max_length)
            if chosen is None or rejected is None:
                stats.dropped += 1
                continue
            pairs.append({"chosen": chosen, "rejected": rejected})
            for example in (chosen, rejected):
                stats.tokens += len(example["input_ids"])
                stats.target_tokens += sum(t != IGNORE for t in example["targets"])
    if not pairs:
        raise ValueError(f"{records.name} holds no usable preference pair ({stats.describe()}); check the file, or "
                         f"raise max_length")
    return pairs, stats


__all__ = ["load_preferences"]
