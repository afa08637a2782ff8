"""What ``lora data inspect`` shows: how a source is read (its files, the format found), what tokenizing it gives
(examples, tokens, lengths, the share that carries a loss) and the first examples with the trained tokens marked,
so that a user sees what the model will learn before training on it."""

from __future__ import annotations

import numpy as np

from .chat import IGNORE
from .dataset import load_dataset
from .formats import FORMATS, parse_columns
from .preferences import load_preferences
from .sources import Records, open_source

MARKS = ("[[", "]]")  # around the tokens that carry a loss


def _marked(tokenizer, ids: list[int], targets: list[int]) -> str:
    """The example's text, with the tokens that are predicted (carry a loss) between MARKS."""
    trained = [False] + [t != IGNORE for t in targets[:-1]]  # token i is the target of position i - 1
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = tokenizer.decode(ids[start:i])
            out.append(f"{MARKS[0]}{text}{MARKS[1]}" if trained[start] else text)
            start = i
    return "".join(out)


def _lengths(lengths: np.ndarray) -> str:
    return (f"tokens per example: min {int(lengths.min())}, median {int(np.median(lengths))}, mean "
            f"{lengths.mean():.1f}, max {int(lengths.max())}")


def inspect_data(source, tokenizer, format: str | None = None, columns: str | dict | None = None,
                 max_length: int | None = None, show: int = 3, mask_prompt: bool = True) -> str:
    """A report on ``source`` as :func:`lora.data.load_dataset` (or, for preference pairs,
    :func:`lora.data.load_preferences`) reads it for ``tokenizer``: the files, the detected format, stats, and the
    first ``show`` examples with the tokens that carry a loss between ``[[`` and ``]]``.

    Raises:
        ValueError: what loading the source would raise.
    """
    src = open_source(source)
    records = Records(src, format, parse_columns(columns))
    fmt = records.format
    lines = [f"source: {src.name}" + (f" ({len(src.files)} files)" if len(src.files) > 1 else ""),
             f"format: {fmt} ({'given' if format else 'detected'}): {FORMATS[fmt]}"]
    if columns:
        lines.append(f"columns: {parse_columns(columns)} (our field: your column)")
    if fmt == "preference":
        pairs, stats = load_preferences(src, tokenizer, max_length=max_length, columns=columns)
        lengths = np.asarray([len(p[k]["input_ids"]) for p in pairs for k in ("chosen", "rejected")])
        lines += [f"pairs: {stats.describe()}", _lengths(lengths)]
        for i, pair in enumerate(pairs[:show]):
            for k in ("chosen", "rejected"):
                ex = pair[k]
                lines += ["", f"--- pair {i + 1}, {k} ({len(ex['input_ids'])} tokens) ---",
                          _marked(tokenizer, ex["input_ids"], ex["targets"])]
    else:
        examples, stats = load_dataset(src, tokenizer, format=format, max_length=max_length,
                                       mask_prompt=mask_prompt, columns=columns, cache=False)
        lengths = examples.lengths
        share = stats.target_tokens / stats.tokens if stats.tokens else 0.0
        lines += [f"examples: {stats.describe()}", _lengths(lengths)]
        if fmt != "classification":
            lines.append(f"tokens with a loss: {share:.1%} (between {MARKS[0]} and {MARKS[1]} below)")
        else:
            lines.append(f"classes: {stats.labels}")
        for i, ex in enumerate(examples[:show]):
            lines += ["", f"--- example {i + 1} ({len(ex['input_ids'])} tokens) ---"]
            if fmt == "classification":
                lines.append(f"{tokenizer.decode(ex['input_ids'])}  -> label {stats.labels[ex['label']]!r}")
            else:
                lines.append(_marked(tokenizer, ex["input_ids"], ex["targets"]))
    return "\n".join(lines)
