"""Sources -> tokenized examples: ``load_dataset`` (with its over-long policy, stats and cache) and the prompts and
answers of an instruction set for exact match.

Every example becomes ``input_ids`` plus ``targets``, the already-shifted next-token labels (``-100`` where no loss
is taken: prompt tokens, padding, and each example's last position, so packed examples never predict each other).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import islice

import numpy as np

from .cache import cache_folder, entry_key, read_entry, tokenizer_fingerprint, write_entry
from .chat import IGNORE
from .encode import Encoder
from .formats import FORMATS, INSTRUCTION_FORMATS, parse_columns, to_messages, tools_of
from .sources import Records, open_source
from .storage import Builder, Examples

OVERLONG = ("truncate", "drop")  # what load_dataset does with an example longer than max_length
CHUNK = 512  # records tokenized in one batched call


@dataclass
class DataStats:
    """What happened to a source's examples; shown to the user."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    target_tokens: int = 0
    labels: list = field(default_factory=list)  # classification: label names, index = class id
    windows: int = 0  # text files: the windows their documents were cut into (examples counts the documents)
    format: str | None = None
    cached: bool = False  # read from the cache of tokenized sets

    def describe(self) -> str:
        kept = self.examples - self.dropped
        if self.windows:
            head = f"{self.examples} documents cut into {self.windows} windows"
        else:
            head = (f"{kept}/{self.examples} examples kept ({self.truncated} truncated, {self.dropped} dropped as "
                    f"too long)")
        return (f"{head}, {self.tokens} tokens, {self.target_tokens} with a loss"
                + (" (from the cache of tokenized data)" if self.cached else ""))


def _check_arguments(max_length, overlong, label_names) -> None:
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be None or an integer >= 1, got {max_length!r}")
    if label_names is not None and (isinstance(label_names, str) or not all(
            isinstance(n, (str, int)) and not isinstance(n, bool) for n in label_names)):
        raise ValueError(f"label_names must be a list of class labels (strings or integers), got {label_names!r}")


def load_dataset(source, tokenizer, format: str | None = None, max_length: int | None = None,
                 overlong: str = "truncate", mask_prompt: bool = True, label_names: list | None = None,
                 columns: str | dict | None = None, cache=True) -> tuple[Examples, DataStats]:
    """Read a data source and tokenize it.

    Sources: a JSONL file; a ``.json`` file holding a JSON array of records (or JSON Lines); CSV or TSV (the first
    line names the columns); Parquet; a ``.txt``/``.md`` text file; a folder written by
    ``datasets.Dataset.save_to_disk`` (or one ``.arrow`` file); a folder or a glob (``data/*.parquet``) of such
    files; a ``datasets.Dataset`` or ``IterableDataset``; a list of dicts. Formats (``FORMATS``): Alpaca, chat
    messages (OpenAI tool calling included), ShareGPT, prompt/completion, text, classification.

    A text file is cut into documents at two or more blank lines (one blank line separates paragraphs), and each
    document, tokenized whole with EOS after it, is cut into windows of ``max_length`` tokens that all carry a loss
    (the last one shorter). Why: a book is far longer than any window, and cutting it to its first ``max_length``
    tokens, as the over-long policy does for records, would throw most of it away; windows keep every token, and
    since no window spans two documents, unrelated texts never share an attention context. Each window starts a
    new context (no overlap), so the first token of a window is not predicted.

    Tokenization is batched through the fast tokenizer (see :mod:`lora.data.encode`). The tokenized set is cached
    on disk (:mod:`lora.data.cache`) keyed by the source's content, the tokenizer, its template and these
    settings, so the same call again reads it back memory-mapped.

    Args:
        source: Where the records are (above).
        tokenizer: The model's tokenizer (its chat template frames instruction data).
        format: One of ``FORMATS`` (default: detected from the first record's keys).
        max_length: Longest example in tokens. Longer ones are cut to it (``overlong="truncate"``) or left out
            (``"drop"``); a truncated example with no answer token left is dropped too. Counted in the stats. For
            text files, the window length.
        mask_prompt: Take the loss on the assistant's turns only (instruction formats): every assistant turn of a
            multi-turn conversation, and nothing else (system, user and tool turns).
        label_names: Classification: the class order to use (default: sorted labels of this source).
        columns: Our field names for the source's own columns, ``"prompt:question,completion:answer"`` or
            ``{"prompt": "question", ...}``.
        cache: ``True`` (the default cache folder), a folder, or ``False``.

    Returns:
        ``(examples, stats)``: a sequence of examples, each with ``input_ids`` and ``targets`` (shifted labels),
        or for classification ``input_ids`` and ``label`` (class index), as lists of ints; stored compactly
        (:class:`lora.data.storage.Examples`).

    Raises:
        ValueError: where the problem is (``file:line``, ``file row N``, ``records[i]``), what it is, and the fix.
    """
    _check_arguments(max_length, overlong, label_names)
    columns = parse_columns(columns)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {sorted(FORMATS)}")
    src = open_source(source)
    folder, key = cache_folder(cache), None
    if folder is not None:
        fingerprint, tokenizer_fp = src.fingerprint(), tokenizer_fingerprint(tokenizer)
        if fingerprint is not None and tokenizer_fp is not None:
            key = entry_key(fingerprint, tokenizer_fp, {
                "format": format, "max_length": max_length, "overlong": overlong, "mask_prompt": mask_prompt,
                "label_names": label_names, "columns": columns})
            found = read_entry(folder, key)
            if found is not None:
                examples, meta = found
                return examples, DataStats(**{**meta["stats"], "cached": True})
    records = Records(src, format, columns)
    if records.format == "preference":
        raise ValueError(f"{src.name} holds preference pairs ({FORMATS['preference']}); train on them with "
                         f"recipes/dpo.py (or lora.data.load_preferences), not as instruction examples")
    examples, stats = _tokenize(records, tokenizer, max_length, overlong, mask_prompt, label_names)
    if key is not None:
        examples = write_entry(folder, key, examples, {"stats": asdict(stats)})
    return examples, stats


def _chunks(records: Records):
    it = iter(records)
    while chunk := list(islice(it, CHUNK)):
        yield chunk


def _raise_at(chunk: list, e: ValueError):
    where = chunk[getattr(e, "index", 0)][0]
    raise ValueError(f"{where}: {e}") from None


def _tokenize(records: Records, tokenizer, max_length: int | None, overlong: str, mask_prompt: bool,
              label_names: list | None) -> tuple[Examples, DataStats]:
    fmt = records.format
    stats = DataStats(format=fmt)
    encoder = Encoder(tokenizer, mask_prompt)
    builder = Builder(classification=fmt == "classification")

    def encode(chunk):  # text is tokenized at once; conversations start tokenizing while the next chunk renders
        if fmt in ("text", "classification"):
            return encoder.texts([r["text"] for _, r, _ in chunk], eos=fmt == "text")
        return encoder.start([(to_messages(r, fmt), tools_of(r, fmt)) for _, r, _ in chunk])

    def finish(chunk, started):
        try:
            if fmt in ("text", "classification"):
                return [(ids, ids if fmt == "text" else None) for ids in started]
            return encoder.finish(started)
        except ValueError as e:
            _raise_at(chunk, e)

    pending = None
    for chunk in _chunks(records):
        try:
            started = encode(chunk)
        except ValueError as e:
            if pending is not None:  # an error in the chunk before comes first
                finish(*pending)
            _raise_at(chunk, e)
        if pending is not None:
            _add(builder, stats, pending[0], finish(*pending), max_length, overlong)
        pending = (chunk, started)
    if pending is not None:
        _add(builder, stats, pending[0], finish(*pending), max_length, overlong)
    label_index = None
    if fmt == "classification":
        found = set(builder.labels)  # one kind (checked while reading), so they sort: 2 before 10
        stats.labels = list(label_names) if label_names is not None else sorted(found)
        unknown = sorted(found - set(stats.labels), key=lambda v: (isinstance(v, str), v))
        if unknown:
            raise ValueError(f"{records.name}: labels {unknown} are not among the classes {stats.labels}; pass "
                             f"label_names that include them (or leave label_names out)")
        label_index = {v: i for i, v in enumerate(stats.labels)}
    if not len(builder):
        raise ValueError(f"{records.name}: no example left after the over-long policy ({stats.describe()}); raise "
                         f"max_length, or use overlong='truncate'")
    return builder.finish(label_index), stats


def _add(builder: Builder, stats: DataStats, chunk: list, encoded: list, max_length: int | None,
         overlong: str) -> None:
    """The over-long policy, the shifted targets and the stats, for one chunk of encoded records."""
    for (where, record, document), (ids, labels) in zip(chunk, encoded):
        stats.examples += 1
        if document:
            _add_windows(builder, stats, ids, max_length)
            continue
        if max_length is not None and len(ids) > max_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids = ids[:max_length]
            labels = labels[:max_length] if labels is not None else None
            stats.truncated += 1
        if labels is None:
            builder.add(ids, label=record["label"])
            stats.tokens += len(ids)
            continue
        targets = np.empty_like(labels)
        targets[:-1], targets[-1] = labels[1:], IGNORE  # position t predicts token t+1
        n_targets = int(np.count_nonzero(targets != IGNORE))
        if n_targets == 0:
            stats.dropped += 1
            continue
        builder.add(ids, targets)
        stats.tokens += len(ids)
        stats.target_tokens += n_targets


def _add_windows(builder: Builder, stats: DataStats, ids: np.ndarray, max_length: int | None) -> None:
    """A text file's document as windows of ``max_length`` tokens, every token a target (see load_dataset)."""
    size = max_length or len(ids)
    for start in range(0, len(ids), size):
        window = ids[start:start + size]
        if len(window) < 2:  # one token predicts nothing
            continue
        targets = np.empty_like(window)
        targets[:-1], targets[-1] = window[1:], IGNORE
        builder.add(window, targets)
        stats.windows += 1
        stats.tokens += len(window)
        stats.target_tokens += len(window) - 1


def prompts_and_answers(source, columns: str | dict | None = None) -> tuple[list[list[dict]], list[str]]:
    """The prompt and expected answer of every example in an instruction set (for exact match).

    A prompt is the conversation before the answer (system prompt and earlier turns included), for
    :func:`lora.generate.exact_match` to format exactly as training did (:func:`render_chat`). A chat record's
    tool definitions are not part of the prompt (generation renders conversations without them), and a tool-calling
    assistant turn without text gets ``"content": ""``.
    """
    records = Records(source, None, columns)
    fmt = records.format
    if fmt not in INSTRUCTION_FORMATS:
        raise ValueError(f"{records.name} is in the {fmt!r} format; exact-match evaluation needs prompts with answers")
    prompts, answers = [], []
    for where, record, _ in records:
        messages = to_messages(record, fmt)
        if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] == "assistant" \
                or not isinstance(messages[-1].get("content"), str):
            raise ValueError(f"{where}: exact-match evaluation needs a conversation that ends with a prompt turn and "
                             f"then the assistant's answer in text; found the roles {[m['role'] for m in messages]}")
        # a tool-calling turn may have no text; generation reads every turn's "content" (an empty one renders alike)
        prompts.append([m if "content" in m else {**m, "content": ""} for m in messages[:-1]])
        answers.append(messages[-1]["content"])
    return prompts, answers
