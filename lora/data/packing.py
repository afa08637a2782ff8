"""Examples -> batches: packing into rows, joining rows, padding and stacking, and a model's keyword arguments."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from .chat import IGNORE
from .storage import Example, Examples


def best_fit_rows(lengths: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """The example indices of each row (ascending) when examples of ``lengths`` are packed best-fit decreasing.

    One example at a time, longest first (in index order among equal lengths), into the row with the least room
    that still fits it (the lowest-numbered such row), else a new row. Done example by example this is a sorted
    insertion per example, minutes for a million; here all the examples of one length are placed at once: the
    best-fit row for them is the one whose room is the smallest at least that length, and it takes ``room // n``
    of them in a row before its room falls below ``n`` (nothing between ``n`` and its room is free, or it would be
    the best fit). Rows with the same room are interchangeable but for their number, so they are kept as groups.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    row_of = np.full(len(lengths), -1, dtype=np.int64)
    groups: dict[int, np.ndarray] = {}  # room -> the rows with that much room, ascending
    rooms: list[int] = []  # the keys of groups, sorted
    rows = 0

    def put(room: int, members: np.ndarray) -> None:
        if not len(members):
            return
        if room in groups:
            groups[room] = np.sort(np.concatenate([groups[room], members]))
        else:
            groups[room] = members
            bisect.insort(rooms, room)

    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    cuts = np.flatnonzero(np.diff(sorted_lengths)) + 1
    for items in np.split(order, cuts) if len(order) else []:
        n, placed = int(lengths[items[0]]), 0
        if n == 0:  # empty examples (none come from load_dataset): into the fullest row, as one at a time would
            if not rows:
                rows = 1
                put(seq_len, np.arange(1))
            row_of[items] = groups[rooms[0]][0]
            continue
        while placed < len(items):
            at = bisect.bisect_left(rooms, n)
            left = len(items) - placed
            if at == len(rooms):  # no row has room: new rows, each filled with seq_len // n of them
                per = seq_len // n
                count = -(-left // per)
                new = np.arange(rows, rows + count)
                row_of[items[placed:]] = np.repeat(new, per)[:left]
                put(seq_len - per * n, new[:left // per])
                put(seq_len - (left % per) * n, new[left // per:])
                rows += count
                break
            room = rooms[at]
            members = groups.pop(room)
            rooms.pop(at)
            per = room // n
            take = min(len(members) * per, left)
            full, part = divmod(take, per)
            row_of[items[placed:placed + take]] = np.repeat(members, per)[:take]
            put(room - per * n, members[:full])
            if part:
                put(room - part * n, members[full:full + 1])
            put(room, members[full + (1 if part else 0):])
            placed += take
    by_row = np.argsort(row_of, kind="stable")  # indices grouped by row, ascending inside each row
    return np.split(by_row, np.cumsum(np.bincount(row_of, minlength=rows))[:-1]) if rows else []


class PackedRows(Sequence):
    """Rows of :class:`Examples` packed by :func:`pack`, each made when it is read (a row is a few examples'
    tokens; a million examples' rows built at once would hold them all a second time, in int64)."""

    def __init__(self, store: Examples, members: list[np.ndarray], seq_len: int, pad_id: int):
        self.store, self.members, self.seq_len, self.pad_id = store, members, seq_len, pad_id

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _row(self.store, self.members[i], self.seq_len, self.pad_id)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _row(store: Examples, members: np.ndarray, seq_len: int, pad_id: int) -> dict:
    starts, ends = store.offsets[members], store.offsets[members + 1]
    lengths = ends - starts
    real = int(lengths.sum())
    fill = seq_len - real
    # (real,): the positions in the flat arrays of the row's tokens, and each token's position in its example
    within = np.arange(real) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = np.repeat(starts, lengths) + within
    ids = np.concatenate([store.input_ids[flat], np.full(fill, pad_id)]).astype(np.int64)
    targets = np.concatenate([store.targets[flat], np.full(fill, IGNORE)]).astype(np.int64)
    positions = np.concatenate([within, np.arange(fill)]).astype(np.int64)
    return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets),
            "position_ids": torch.from_numpy(positions), "real_tokens": real}


def _one_store(examples) -> tuple[Examples, np.ndarray] | None:
    """The :class:`Examples` that every example is a view of, and their indices in it (None if there is none)."""
    if isinstance(examples, Examples):
        return examples, np.arange(len(examples))
    if not len(examples) or not isinstance(examples[0], Example):
        return None
    store = examples[0].store
    if not all(isinstance(ex, Example) and ex.store is store for ex in examples):
        return None
    return store, np.fromiter((ex.index for ex in examples), dtype=np.int64, count=len(examples))


def example_lengths(examples, found: tuple[Examples, np.ndarray] | None = None) -> np.ndarray:
    """The token count of every example, from the offsets of a compact set (no example read: the trainer measures
    sets of millions) or, for a list of dicts, from each one."""
    found = found if found is not None else _one_store(examples)
    if found is not None:
        store, indices = found
        return store.lengths[indices]
    return np.fromiter((len(ex["input_ids"]) for ex in examples), dtype=np.int64, count=len(examples))


def pack(examples, seq_len: int, pad_id: int) -> list[dict] | PackedRows:
    """Pack examples into rows of exactly ``seq_len`` tokens, without splitting any example.

    Longest first, each example goes into the row with the least room that still fits it (best-fit decreasing,
    :func:`best_fit_rows`): rows come out nearly full, where filling them in file order leaves ~10% padding on
    short-example data. Inside a row, examples keep their file order; the trainer shuffles rows every epoch.

    Positions restart at 0 for every example, which Hugging Face models turn into block-diagonal attention when no
    ``attention_mask`` is given, so packed examples never see each other. Row tails are padding with no loss, and
    their positions restart too (a segment of its own).

    Examples from :func:`lora.data.load_dataset` (views of one compact set) give :class:`PackedRows`, whose rows
    are made as they are read; a list of dicts gives a list of rows.
    """
    found = _one_store(examples)
    lengths = example_lengths(examples, found)
    too_long = np.flatnonzero(lengths > seq_len)
    if len(too_long):
        raise ValueError(f"an example of {int(lengths[too_long[0]])} tokens does not fit a packed row of {seq_len}; "
                         f"load the data with max_length <= {seq_len}")
    members = best_fit_rows(lengths, seq_len)
    if found is not None:
        store, indices = found
        return PackedRows(store, [indices[m] for m in members], seq_len, pad_id)
    rows = []
    for chosen in members:
        parts = [examples[i] for i in chosen]
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

    Where attention runs per example (:mod:`lora.train.attention`), the row an example sits in changes none of its
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


_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """Keyword arguments for a Hugging Face causal LM's forward on a batch from :func:`collate` (targets left out).

    ``use_cache=False`` matters for packed rows: transformers builds its block-diagonal mask from restarting
    ``position_ids`` only when there is neither an ``attention_mask`` nor a KV cache.
    """
    inputs: dict[str, torch.Tensor | bool] = {k: batch[k] for k in _MODEL_KEYS if k in batch}
    inputs["use_cache"] = False
    return inputs
