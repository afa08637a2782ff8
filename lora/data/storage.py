"""Tokenized examples kept compact: every example's tokens in one flat int32 array (and its targets in another),
with offsets, instead of Python lists of ints (~70 bytes a token). A tokenized set is saved as raw arrays plus a
JSON file, and read back memory-mapped, so a cached set of millions of examples opens in a moment.

:class:`Examples` is a sequence of :class:`Example` views: ``examples[i]["input_ids"]`` is a list of ints, as the
trainer, :func:`lora.data.collate` and user code have always read it; slicing gives a list of views. Each view holds
only its index, so a list of a million of them (what sorting or splitting the set makes) stays small.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

_FILES = ("input_ids", "targets", "offsets", "labels")


class Example(Mapping):
    """One example of an :class:`Examples` set: ``input_ids`` and ``targets`` (or ``label``), read on access."""

    __slots__ = ("store", "index")

    def __init__(self, store: "Examples", index: int):
        self.store, self.index = store, index

    def _keys(self) -> tuple[str, ...]:
        return ("input_ids", "label") if self.store.labels is not None else ("input_ids", "targets")

    def __getitem__(self, key: str):
        # read millions of times (collation reads the examples one by one): plain lists and ndarrays, no numpy scalars
        store, i = self.store, self.index
        bounds = store.bounds()
        if key == "input_ids":
            return store.input_ids[bounds[i]:bounds[i + 1]].tolist()
        if key == "targets" and store.targets is not None:
            return store.targets[bounds[i]:bounds[i + 1]].tolist()
        if key == "label" and store.labels is not None:
            return int(store.labels[i])
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return 2

    def __repr__(self) -> str:
        return repr(dict(self))


class Examples(Sequence):
    """Tokenized examples in flat arrays (see the module's docstring).

    Args:
        input_ids: Every example's token ids, one after the other (int32).
        offsets: ``len + 1`` positions: example ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]`` (int64).
        targets: The shifted labels beside ``input_ids`` (int32), for causal LM examples.
        labels: One class index per example (int32), for classification examples.
    """

    def __init__(self, input_ids: np.ndarray, offsets: np.ndarray, targets: np.ndarray | None = None,
                 labels: np.ndarray | None = None):
        self.input_ids, self.offsets, self.targets, self.labels = input_ids, offsets, targets, labels
        self._bounds: list[int] | None = None

    def bounds(self) -> list[int]:
        """``offsets`` as a Python list (indexing it is several times quicker than indexing the array)."""
        if self._bounds is None:
            self._bounds = self.offsets.tolist()
        return self._bounds

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [Example(self, j) for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"example {i} of {n}")
        return Example(self, i % n)

    def __iter__(self) -> Iterator[Example]:
        return (Example(self, i) for i in range(len(self)))

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples, {len(self.input_ids)} tokens)"

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.input_ids, self.offsets, self.targets, self.labels) if a is not None)

    def save(self, folder: Path, meta: dict) -> None:
        """Write the arrays (raw, little-endian) and ``meta`` (plus their dtypes and lengths) into ``folder``."""
        arrays = {}
        for name in _FILES:
            array = getattr(self, name)
            if array is not None:
                np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tofile(folder / name)
                arrays[name] = [array.dtype.str, len(array)]
        (folder / "meta.json").write_text(json.dumps({**meta, "arrays": arrays}) + "\n")

    @classmethod
    def load(cls, folder: Path) -> tuple["Examples", dict]:
        """The set :meth:`save` wrote, memory-mapped (read-only), and its ``meta``."""
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {}
        for name, (dtype, length) in meta.pop("arrays").items():
            # a plain ndarray over the mapped file: slices of an np.memmap are memmaps, each one slower to make
            arrays[name] = (np.memmap(folder / name, dtype=np.dtype(dtype), mode="r", shape=(length,))
                            .view(np.ndarray) if length else np.zeros(0, dtype=np.dtype(dtype)))
        return cls(**arrays), meta


class Builder:
    """Collects examples; :meth:`finish` joins them into one :class:`Examples`. Small arrays are joined every
    4096 examples, so a million examples are a few hundred arrays, not a million objects."""

    def __init__(self, classification: bool = False):
        self.classification = classification
        self._pending: tuple[list, list] = ([], [])  # (input_ids, targets) of the examples not yet joined
        self._chunks: tuple[list, list] = ([], [])
        self.lengths: list[int] = []
        self.labels: list = []

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, input_ids: np.ndarray, targets: np.ndarray | None = None, label=None) -> None:
        self._pending[0].append(np.asarray(input_ids, dtype=np.int32))
        self.lengths.append(len(input_ids))
        if self.classification:
            self.labels.append(label)
        else:
            self._pending[1].append(np.asarray(targets, dtype=np.int32))
        if len(self._pending[0]) >= 4096:
            self._join()

    def _join(self) -> None:
        for pending, chunks in zip(self._pending, self._chunks):
            if pending:
                chunks.append(np.concatenate(pending))
                pending.clear()

    def finish(self, label_index: dict | None = None) -> Examples:
        """The examples; classification labels are mapped to class indices through ``label_index``."""
        self._join()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])

        def joined(chunks):
            return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)

        ids = joined(self._chunks[0])
        if self.classification:
            labels = np.asarray([label_index[v] for v in self.labels], dtype=np.int32)
            return Examples(ids, offsets, labels=labels)
        return Examples(ids, offsets, targets=joined(self._chunks[1]))
