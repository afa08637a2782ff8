"""Reading records from where people keep them: JSONL, a JSON array, CSV/TSV, Parquet, plain text, an Arrow folder
written by ``datasets.Dataset.save_to_disk``, a folder or glob of such files, a ``datasets.Dataset`` or
``IterableDataset``, or a list of dicts.

Every record is checked against its format as it is read (:class:`Records`), and every error names where the record
is (``file:line`` for line-based files, ``file row N`` for Parquet and Arrow, ``records[i]`` for a list), what is
wrong there and what to do about it. Records are read one at a time (a JSON array and a text file are read whole),
so a large source is never held in memory as Python objects.
"""

from __future__ import annotations

import csv
import glob as globbing
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .formats import FORMATS, check_record, detect_format, parse_columns, rename_columns

MAX_LINE_BYTES = 32 * 1024**2  # one example; a longer "line" is a file that is not JSONL (or lost its newlines)
_EXAMPLE_LINE = '{"instruction": "...", "output": "..."}'
TEXT_SUFFIXES = (".txt", ".md")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow") + TEXT_SUFFIXES
_KINDS = "JSONL, JSON, CSV/TSV, Parquet, Arrow or text (.txt/.md)"
_WHAT_TO_PASS = (f"pass a data file ({_KINDS}), a folder or glob of them, a folder written by "
                 f"datasets.Dataset.save_to_disk, a datasets.Dataset or a list of dicts")
# Documents in a text file are separated by two or more blank lines (one blank line separates paragraphs).
_DOCUMENT_BREAK = re.compile(r"\n[ \t\r\f\v]*\n(?:[ \t\r\f\v]*\n)+")


def _label_kind(label) -> str:
    return "integer" if isinstance(label, int) else "string"


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


def _drop_none(row: dict) -> dict:
    """A row of a columnar source (Parquet, Arrow, Dataset) without its empty cells: every row has every column
    there, and chat messages every key of every other message, so an absent value reads as None."""
    row = {k: v for k, v in row.items() if v is not None}
    for key in ("messages", "conversations"):
        if isinstance(row.get(key), list):
            row[key] = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in row[key]]
    return row


# -- files ------------------------------------------------------------------------------------------------------------
def _cannot_read(path: Path, e: OSError) -> ValueError:
    return ValueError(f"cannot read the data file {path} ({e.strerror or e}); check that it is a readable file")


def _open_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line, read as UTF-8 in binary so a bad byte or line names its line."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise _cannot_read(path, e) from None
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except OSError as e:
                raise _cannot_read(path, e) from None
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


def _read_text(path: Path) -> str:
    """A whole file as UTF-8 text (a bad byte is reported with its line)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _cannot_read(path, e) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    for lineno, line in _open_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): {line.strip()[:80]!r}; each "
                             f"line must be one JSON object, e.g. {_EXAMPLE_LINE}") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer of thousands of digits, or deep nesting
            raise ValueError(f"{where}: the JSON cannot be read ({e or type(e).__name__}); each line must be one "
                             f"JSON object, e.g. {_EXAMPLE_LINE}") from None


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    """A ``.json`` file: a JSON array of records, or (as ``datasets``' ``to_json`` writes it) JSON Lines."""
    try:
        with path.open("rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as e:
        raise _cannot_read(path, e) from None
    if not head.startswith(b"["):
        yield from _jsonl_rows(path)
        return
    text = _read_text(path)
    decoder = json.JSONDecoder()
    fix = "a .json file holds one JSON array of records, e.g. [" + _EXAMPLE_LINE + ", ...]"
    i = text.index("[") + 1
    line, counted, n = 1, 0, 0
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if n == 0 and text.startswith("]", i):
            break
        line += text.count("\n", counted, i)
        counted = i
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); {fix}") from None
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}:{line}: the JSON cannot be read ({e or type(e).__name__}); {fix}") from None
        n += 1
        yield f"{path}:{line} (record {n})", record
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if text.startswith("]", i):
            break
        if not text.startswith(",", i):
            at = text.count("\n", 0, i) + 1
            found = repr(text[i:i + 20]) if i < len(text) else "the end of the file"
            raise ValueError(f"{path}:{at}: expected ',' or ']' after record {n}, found {found}; {fix}")
        i += 1
    rest = text[i + 1:].strip()
    if rest:
        at = text.count("\n", 0, i) + 1
        raise ValueError(f"{path}:{at}: text after the end of the JSON array ({rest[:20]!r}); {fix}")


def _csv_rows(path: Path) -> Iterator[tuple[str, object]]:
    """CSV (``,``) or TSV (tab): the first line names the columns. A ``label`` that is an integer literal is read
    as an integer (CSV has no types), so integer classes sort as numbers, as in JSON."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    fix = (f"quote fields that hold the delimiter ({delimiter!r}), a quote or a line break with double quotes, as "
           f"spreadsheet programs write them")
    lines = iter(_open_lines(path))
    position = [0]  # the line number of the last line handed to the csv reader

    def feed():
        for lineno, text in lines:
            position[0] = lineno
            yield text

    csv.field_size_limit(MAX_LINE_BYTES)
    reader = csv.reader(feed(), delimiter=delimiter, strict=True)
    header, start = None, 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{path}:{position[0]}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} ({e}); "
                             f"{fix}") from None
        where, start = f"{path}:{start}", position[0] + 1
        if not any(c.strip() for c in cells):
            continue
        if header is None:
            header = [c.strip() for c in cells]
            duplicate = sorted({c for c in header if header.count(c) > 1})
            if duplicate or not all(header):
                raise ValueError(f"{where}: the header line must name every column once; found {header}. Name the "
                                 f"columns, e.g. instruction{delimiter}input{delimiter}output")
            continue
        if len(cells) != len(header):
            raise ValueError(f"{where}: {len(cells)} fields, but the header has {len(header)} ({header}); {fix}")
        row = dict(zip(header, cells))
        if re.fullmatch(r"\s*-?\d{1,18}\s*", row.get("label", "")):
            row["label"] = int(row["label"])
        yield where, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except OSError as e:
        raise _cannot_read(path, e) from None
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({e}); write it again (e.g. with pandas' "
                         f"to_parquet or datasets' to_parquet), or check that it was copied whole") from None
    n = 0
    try:
        for batch in table.iter_batches(batch_size=2048):
            for row in batch.to_pylist():
                n += 1
                yield f"{path} row {n}", _drop_none(row)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # a damaged page, or a string that is not UTF-8
        raise ValueError(f"{path} row {n + 1}: the Parquet file cannot be read there ({type(e).__name__}: {e}); "
                         f"write it again, or check that it was copied whole") from None


def _dataset_rows(dataset, name: str) -> Iterator[tuple[str, object]]:
    """The rows of a ``datasets.Dataset`` (read in Arrow batches) or ``IterableDataset``."""
    import pyarrow as pa

    n = 0
    if hasattr(dataset, "with_format") and hasattr(dataset, "num_rows"):
        try:
            for batch in dataset.with_format("arrow").iter(batch_size=2048):
                for row in batch.to_pylist():
                    n += 1
                    yield f"{name} row {n}", _drop_none(row)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # an Arrow file damaged on disk
            raise ValueError(f"{name} row {n + 1}: the data cannot be read there ({type(e).__name__}: {e}); write "
                             f"it again (save_to_disk), or check that it was copied whole") from None
        return
    for row in dataset:
        n += 1
        yield f"{name} row {n}", _drop_none(row) if isinstance(row, dict) else row


def _arrow_file_rows(path: Path) -> Iterator[tuple[str, object]]:
    from datasets import Dataset

    try:
        dataset = Dataset.from_file(str(path))
    except Exception as e:  # pyarrow's errors, or datasets' own, for a file that is not Arrow
        raise ValueError(f"{path} is not a readable Arrow file ({type(e).__name__}: {e}); write it with "
                         f"datasets.Dataset.save_to_disk, or pass another format") from None
    yield from _dataset_rows(dataset, str(path))


def _text_documents(path: Path) -> Iterator[tuple[str, object]]:
    """The documents of a text file (see :func:`lora.data.load_dataset`): cut at two or more blank lines."""
    text = _read_text(path)
    start, line = 0, 1
    for cut in [*_DOCUMENT_BREAK.finditer(text), None]:
        end = cut.start() if cut else len(text)
        doc = text[start:end]
        if doc.strip():
            first = len(doc) - len(doc.lstrip("\r\n"))
            yield f"{path}:{line + doc.count(chr(10), 0, first)}", {"text": doc.strip("\r\n")}
        if cut:
            line += text.count("\n", start, cut.end())
            start = cut.end()


_READERS = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".tsv": _csv_rows,
            ".parquet": _parquet_rows, ".arrow": _arrow_file_rows, ".txt": _text_documents, ".md": _text_documents}


# -- what a source is -------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """Where records come from: a list of files, a ``datasets`` object, or records in memory.

    ``fingerprint()`` identifies the content (for the tokenized-data cache), or is None where it cannot be had
    cheaply (an ``IterableDataset``).
    """

    name: str
    files: list[Path] = field(default_factory=list)
    dataset: object = None
    records: list | None = None

    def rows(self) -> Iterator[tuple[str, object, bool]]:
        """``(where, raw row, is a text document)`` of every row, in order."""
        if self.records is not None:
            for i, record in enumerate(self.records):
                yield f"records[{i}]", record, False
            return
        if self.dataset is not None:
            for where, row in _dataset_rows(self.dataset, self.name):
                yield where, row, False
            return
        for path in self.files:
            if path.is_dir():  # an Arrow folder inside a folder of files
                for where, row in _dataset_rows(_load_from_disk(path), str(path)):
                    yield where, row, False
                continue
            reader = _READERS.get(path.suffix.lower(), _jsonl_rows)  # another name: read as JSONL, as always
            document = path.suffix.lower() in TEXT_SUFFIXES
            for where, row in reader(path):
                yield where, row, document

    def fingerprint(self) -> str | None:
        digest = hashlib.sha256()
        if self.records is not None:
            return None  # records in memory: tokenizing them is as quick as hashing them
        if self.dataset is not None:
            fp = getattr(self.dataset, "_fingerprint", None)
            if not fp or not hasattr(self.dataset, "num_rows"):
                return None
            digest.update(f"dataset {fp} {self.dataset.num_rows}".encode())
            return digest.hexdigest()
        for path in self.files:
            for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
                digest.update(f"{file.name}\0{file.suffix}\0".encode())
                try:
                    with file.open("rb") as f:
                        while chunk := f.read(1 << 22):
                            digest.update(chunk)
                except OSError as e:
                    raise _cannot_read(file, e) from None
        return digest.hexdigest()


def _is_arrow_folder(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _load_from_disk(path: Path):
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except Exception as e:  # a folder half-written or from another datasets version
        raise ValueError(f"{path} looks like a folder written by datasets.Dataset.save_to_disk but cannot be read "
                         f"({type(e).__name__}: {e}); write it again with save_to_disk") from None


def _dataset_source(obj) -> Source:
    kind = type(obj).__name__
    if kind in ("DatasetDict", "IterableDatasetDict"):
        raise ValueError(f"this is a {kind} with the splits {sorted(obj)}; pass one split, e.g. dataset['train']")
    if kind == "Dataset" and obj.num_rows == 0:
        raise ValueError("the datasets.Dataset holds no rows; pass a data set with examples")
    return Source(name=f"the {kind}", dataset=obj)


def open_source(source) -> Source:
    """What ``source`` is (see the module's docstring); nothing is read yet.

    Raises:
        ValueError: a path that does not exist, a folder with no data files, a glob that matches nothing, a
            ``DatasetDict`` (pass one split), or something that is no source at all.
    """
    if isinstance(source, Source):
        return source
    if isinstance(source, (list, tuple)):
        return Source(name="the records", records=list(source))
    if type(source).__module__.split(".")[0] == "datasets":
        return _dataset_source(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"cannot read data from a {type(source).__name__}; {_WHAT_TO_PASS}")
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise ValueError(f"{path} holds a DatasetDict (the splits {splits}); pass one split's folder, e.g. "
                             f"{path / (splits[0] if splits else 'train')}")
        if _is_arrow_folder(path):
            return Source(name=str(path), dataset=_load_from_disk(path), files=[path])
        files = sorted(p for p in path.iterdir() if (p.is_file() and p.suffix.lower() in FILE_SUFFIXES
                                                     and p.suffix.lower() != ".arrow") or
                       (p.is_dir() and _is_arrow_folder(p)))
        if not files:
            raise ValueError(f"the data folder {path} holds no data files ({', '.join(FILE_SUFFIXES)}, or folders "
                             f"written by save_to_disk); {_WHAT_TO_PASS}")
        return Source(name=str(path), files=files)
    if path.exists():
        if not path.is_file():
            raise ValueError(f"the data file {path} is not a regular file (a pipe or a device?); {_WHAT_TO_PASS}")
        return Source(name=str(path), files=[path])
    if any(c in str(source) for c in "*?["):
        files = sorted(Path(p) for p in globbing.glob(str(path), recursive=True)
                       if Path(p).is_file() and Path(p).suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise ValueError(f"the pattern {str(source)!r} matches no data file ({', '.join(FILE_SUFFIXES)}); "
                             f"check the pattern, e.g. 'data/*.jsonl'")
        return Source(name=str(source), files=files)
    raise ValueError(f"data file {path} does not exist; pass the path of a JSONL file (one JSON object per line, "
                     f"e.g. {_EXAMPLE_LINE}), or another source: {_WHAT_TO_PASS}")


def _place(earlier: str, current: str) -> str:
    """How an error at ``current`` names an earlier record: ``line N`` in the same file, else where it is."""
    file, _, line = earlier.rpartition(":")
    return f"line {line}" if line.isdigit() and current.startswith(file + ":") else earlier


# -- records, checked -------------------------------------------------------------------------------------------------
class Records:
    """The records of a source in one format, each checked as it is read: ``for where, record, document in ...``.

    The format is the one given, else the one the first record's keys say (``columns=`` renames a data set's
    columns to our field names first); every record must then be in it. ``document`` is True for the documents of
    a text file. Iterate once.
    """

    def __init__(self, source, format: str | None = None, columns=None):
        if format is not None and format not in FORMATS:
            raise ValueError(f"unknown data format {format!r}; choose one of {sorted(FORMATS)}")
        self.columns = parse_columns(columns)
        self.source = source if isinstance(source, Source) else open_source(source)
        self.name = self.source.name
        self._given = format
        self.format = format
        self._rows = self._checked()
        try:
            self._first = next(self._rows)
        except StopIteration:
            raise ValueError(f"{self.name} holds no examples; a JSONL file has one JSON object per line, e.g. "
                             f"{_EXAMPLE_LINE} (or {_WHAT_TO_PASS})") from None

    def __iter__(self) -> Iterator[tuple[str, dict, bool]]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            yield from self._rows

    def _no_format(self, where: str, record: dict) -> ValueError:
        what = "columns" if " row " in where else "keys"
        return ValueError(f"{where}: cannot tell the format from the {what} {sorted(record)}; expected "
                          + "; or ".join(f"{k}: {v}" for k, v in FORMATS.items())
                          + "; or map your columns to those fields with columns=, e.g. "
                            "columns=prompt:question,completion:answer")

    def _checked(self) -> Iterator[tuple[str, dict, bool]]:
        format = self._given
        detected = format is None
        first_label = None  # (where, label) of the first classification label: all labels must be of one kind
        format_where = None
        for where, record, document in self.source.rows():
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}; each line must be "
                                 f"one JSON object, e.g. {_EXAMPLE_LINE}")
            if self.columns:
                try:
                    record = rename_columns(record, self.columns)
                except KeyError as e:
                    ours = next(k for k, v in self.columns.items() if v == e.args[0])
                    raise ValueError(f"{where}: no column {e.args[0]!r}, which columns= maps to {ours!r}; this "
                                     f"record has {sorted(record)}: fix the mapping") from None
            record_format = detect_format(record)
            if format is None:
                format = record_format
                if format is None:
                    raise self._no_format(where, record)
                format_where = where
            problem = check_record(record, format)
            if record_format not in (None, format) and (detected or problem):
                since = f"{_place(format_where, where)} is" if detected else "the file is read as"
                raise ValueError(f"{where}: this record is in the {record_format!r} format ({FORMATS[record_format]})"
                                 f", but {since} {format!r}; one file holds one format: split the file, or convert "
                                 f"these records to {FORMATS[format]}")
            if problem:
                raise ValueError(f"{where}: {problem} for the {format!r} format; found keys {sorted(record)}")
            bad = _unencodable(record)
            if bad is not None:
                raise ValueError(f"{where}: the string {bad[:40]!r} holds an unpaired surrogate escape (such as "
                                 f"\\ud800), which is not text; write the character itself or a valid pair")
            if format == "classification":
                label = record["label"]
                if first_label is None:
                    first_label = (where, label)
                elif _label_kind(label) != _label_kind(first_label[1]):
                    raise ValueError(f"{where}: label {label!r} is {_label_kind(label)}, but "
                                     f"{_place(first_label[0], where)} has the {_label_kind(first_label[1])} label "
                                     f"{first_label[1]!r}; use one kind for every label (all strings, or all "
                                     f"integers)")
            self.format = format
            yield where, record, document


def read_records(source, format: str | None, columns=None) -> tuple[str, list[dict], list[str]]:
    """Every record of ``source`` in memory: ``(format, records, where each record is)``."""
    records = Records(source, format, columns)
    rows = list(records)
    return records.format, [r for _, r, _ in rows], [w for w, _, _ in rows]


def read_jsonl(path: str | Path, format: str | None = None) -> tuple[str, list[dict]]:
    """Read and validate a data file (JSONL, or any source :func:`open_source` takes); the format is detected from
    the first record's keys unless given.

    Every record must be in that one format; classification labels must be all strings or all integers.

    Returns:
        ``(format, records)``.

    Raises:
        ValueError: ``file:line``, what was found there and what was expected.
    """
    format, records, _ = read_records(path, format)
    return format, records
