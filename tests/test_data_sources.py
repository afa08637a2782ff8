"""Every source load_dataset reads gives the same examples, token by token, as the same records in JSONL; errors
name the file and line (or row); text files become documents cut into windows; the tokenized set is compact,
cached by content, and packs as the list of dicts did."""

import bisect
import csv
import importlib
import inspect
import json
import random

import numpy as np
import pytest

from conftest import make_bpe_tokenizer, make_char_tokenizer
from lora.data import IGNORE, Examples, load_dataset, pack, read_jsonl
from lora.data.cache import _tokenizing_code
from lora.data.packing import best_fit_rows

ALPACA = [{"instruction": "Name a color", "input": "sky", "output": "blue"},
          {"instruction": "Say hi", "output": "hi"},
          {"instruction": "Echo", "input": "a,b \"q\"\nx", "output": "a,b"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_lists(examples):
    return [dict(e) for e in examples]


def write_csv(path, rows, delimiter=","):
    columns = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([r.get(c, "") for c in columns])
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({k for r in rows for k in r})  # from_pylist would take the first row's keys only
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return path


def arrow_folder(path, rows):
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def sources(tmp_path, rows):
    """The same records as every kind of source (name -> what to pass load_dataset)."""
    from datasets import Dataset, IterableDataset

    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "a.jsonl", rows[:1])
    write_parquet(tmp_path / "folder" / "b.parquet", rows[1:])
    (tmp_path / "glob").mkdir()
    for i, r in enumerate(rows):
        write_jsonl(tmp_path / "glob" / f"part-{i}.jsonl", [r])
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows, indent=2))

    def generate():
        yield from rows

    return {
        "json array": array,
        "json lines in a .json": write_jsonl(tmp_path / "lines.json", rows),
        "csv": write_csv(tmp_path / "d.csv", rows),
        "tsv": write_csv(tmp_path / "d.tsv", rows, delimiter="\t"),
        "parquet": write_parquet(tmp_path / "d.parquet", rows),
        "arrow folder": arrow_folder(tmp_path / "arrow", rows),
        "arrow file": next((tmp_path / "arrow").glob("*.arrow")),
        "folder of files": tmp_path / "folder",
        "glob": str(tmp_path / "glob" / "part-*.jsonl"),
        "Dataset": Dataset.from_list(rows),
        "IterableDataset": IterableDataset.from_generator(generate),
        "list of dicts": rows,
    }


@pytest.mark.parametrize("kind", ["json array", "json lines in a .json", "csv", "tsv", "parquet", "arrow folder",
                                  "arrow file", "folder of files", "glob", "Dataset", "IterableDataset",
                                  "list of dicts"])
def test_every_source_gives_the_jsonl_examples_token_by_token(tmp_path, kind, char_tokenizer):
    reference, _ = load_dataset(write_jsonl(tmp_path / "ref.jsonl", ALPACA), char_tokenizer, cache=False)
    source = sources(tmp_path, ALPACA)[kind]
    examples, stats = load_dataset(source, char_tokenizer, cache=False)
    assert stats.format == "alpaca" and stats.examples == 3
    assert as_lists(examples) == as_lists(reference)
    # and the mask itself, token by token: the answer and the end of its turn, nothing else
    ids, targets = examples[0]["input_ids"], examples[0]["targets"]
    learned = [i for i, t in enumerate(targets) if t != IGNORE]
    assert char_tokenizer.decode([targets[i] for i in learned]) == "blue<|im_end|>\n"
    assert all(targets[i] == ids[i + 1] for i in learned)
    assert learned == list(range(learned[0], len(ids) - 1))  # one span, up to the end of the example


def test_csv_label_integers_are_integers_and_sort_as_numbers(tmp_path, char_tokenizer):
    rows = [{"text": t, "label": label} for t, label in (("a", 10), ("b", 2), ("c", 1))]
    examples, stats = load_dataset(write_csv(tmp_path / "d.csv", rows), char_tokenizer, cache=False)
    assert stats.labels == [1, 2, 10] and [e["label"] for e in examples] == [2, 1, 0]
    assert read_jsonl(tmp_path / "d.csv")[1][0] == {"label": 10, "text": "a"}


def test_columnar_sources_read_missing_values_as_absent(tmp_path, char_tokenizer):
    """Parquet has every column in every row: a record without "input" reads it as None, which is no input."""
    examples, _ = load_dataset(write_parquet(tmp_path / "d.parquet", ALPACA[:2]), char_tokenizer, cache=False)
    reference, _ = load_dataset(ALPACA[:2], char_tokenizer, cache=False)
    assert as_lists(examples) == as_lists(reference)


@pytest.mark.parametrize("name, content, message", [
    ("d.json", '[\n  {"text": "a"},\n  {"text": 5}\n]', r"d\.json:3 \(record 2\): 'text' must be a non-empty string"),
    ("d.json", '[{"text": "a"},\n\n{"txt": "b"}]', r"d\.json:3 \(record 2\): this record is in the None|cannot tell|"
                                                  r"d\.json:3 \(record 2\): 'text' must be"),
    ("d.csv", 'text,label\n"a\nb",x\n,y\n', r"d\.csv:4: 'text' must be a non-empty string and 'label'"),
    ("d.tsv", "instruction\toutput\nq\ta\nq\n", r"d\.tsv:3: 1 fields, but the header has 2"),
    ("d.txt", "caf\xe9".encode("latin-1"), r"d\.txt:1: not UTF-8 text"),
], ids=["json-array-line", "json-array-second-record", "csv-after-a-quoted-newline", "tsv-short-row", "text-latin1"])
def test_errors_name_the_line_of_the_record(tmp_path, char_tokenizer, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        load_dataset(path, char_tokenizer, cache=False)


def test_parquet_and_dataset_errors_name_the_row(tmp_path, char_tokenizer):
    from datasets import Dataset

    rows = [{"text": "a", "label": "x"}, {"text": "", "label": "y"}]
    with pytest.raises(ValueError, match=r"d\.parquet row 2: 'text' must be a non-empty string"):
        load_dataset(write_parquet(tmp_path / "d.parquet", rows), char_tokenizer, cache=False)
    with pytest.raises(ValueError, match=r"the Dataset row 2: 'text' must be a non-empty string"):
        load_dataset(Dataset.from_list(rows), char_tokenizer, cache=False)
    with pytest.raises(ValueError, match=r"records\[1\]: 'text' must be a non-empty string"):
        load_dataset(rows, char_tokenizer, cache=False)


# -- text files --------------------------------------------------------------------------------------------------------
BOOK = "Chapter one.\nIt was a dark night.\n\nThe end of one.\n\n\n\nChapter two.\nDawn came."


def test_a_text_file_is_cut_into_documents_then_windows(tmp_path, char_tokenizer):
    path = tmp_path / "book.txt"
    path.write_text(BOOK)
    examples, stats = load_dataset(path, char_tokenizer, max_length=16, cache=False)
    docs = ["Chapter one.\nIt was a dark night.\n\nThe end of one.", "Chapter two.\nDawn came."]
    eos = char_tokenizer.eos_token_id
    expected = []
    for doc in docs:  # one blank line stays inside a document; three separate two documents
        ids = char_tokenizer(doc)["input_ids"] + [eos]
        expected += [ids[i:i + 16] for i in range(0, len(ids), 16) if len(ids[i:i + 16]) > 1]
    assert [e["input_ids"] for e in examples] == expected
    for e in examples:  # every token of a window is predicted from the ones before it, the last predicts nothing
        assert e["targets"] == e["input_ids"][1:] + [IGNORE]
    assert stats.examples == 2 and stats.windows == len(expected) and "2 documents cut into" in stats.describe()
    assert stats.target_tokens == sum(len(w) - 1 for w in expected)


def test_text_documents_name_their_line_and_markdown_reads_the_same(tmp_path, char_tokenizer):
    (tmp_path / "a.md").write_text(BOOK)
    (tmp_path / "a.txt").write_text(BOOK)
    md, _ = load_dataset(tmp_path / "a.md", char_tokenizer, max_length=32, cache=False)
    txt, _ = load_dataset(tmp_path / "a.txt", char_tokenizer, max_length=32, cache=False)
    assert as_lists(md) == as_lists(txt)
    from lora.data.sources import Records

    assert [w.rsplit(":", 1)[1] for w, _, _ in Records(tmp_path / "a.txt")] == ["1", "8"]


def test_a_long_document_is_tokenized_in_pieces_with_the_same_ids_on_whitespace_tokenizers(monkeypatch,
                                                                                           char_tokenizer):
    import lora.data.encode as encode

    monkeypatch.setattr(encode, "LONG_TEXT", 40)
    text = ("word " * 30 + "\n\n") * 4
    ids = encode.Encoder(char_tokenizer).texts([text], eos=True)[0]
    assert ids.tolist() == char_tokenizer(text)["input_ids"] + [char_tokenizer.eos_token_id]


# -- storage and packing -----------------------------------------------------------------------------------------------
def test_examples_are_compact_and_read_as_lists(tmp_path, char_tokenizer):
    rows = [{"instruction": f"Repeat {w}", "output": w} for w in ("cat", "horse", "a", "elephant")] * 50
    examples, stats = load_dataset(rows, char_tokenizer, cache=False)
    assert isinstance(examples, Examples) and examples.input_ids.dtype == np.int32
    assert examples.nbytes() <= 8 * stats.tokens + 8 * (len(examples) + 1)  # int32 ids + targets, int64 offsets
    first = examples[0]
    assert isinstance(first["input_ids"], list) and all(type(t) is int for t in first["input_ids"])
    assert dict(first).keys() == {"input_ids", "targets"} and examples[-1] == examples[len(examples) - 1]
    assert [dict(e) for e in examples[1:3]] == [dict(examples[1]), dict(examples[2])]
    with pytest.raises(IndexError):
        examples[len(examples)]


def _reference_best_fit(lengths, seq_len):
    """Best-fit decreasing one example at a time (the packing before issue 19)."""
    members, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            members.append([i])
            free, row = seq_len - n, len(members) - 1
        else:
            free, row = room.pop(at)
            members[row].append(i)
            free -= n
        bisect.insort(room, (free, row))
    return [sorted(m) for m in members]


def test_best_fit_by_groups_packs_exactly_as_one_example_at_a_time():
    rng = random.Random(0)
    for _ in range(200):
        seq_len = rng.choice([8, 10, 33, 64, 512])
        top = rng.choice([seq_len, max(1, seq_len // 4)])
        lengths = [rng.randint(1, top) for _ in range(rng.randint(0, 200))]
        assert [m.tolist() for m in best_fit_rows(np.array(lengths), seq_len)] == \
            _reference_best_fit(lengths, seq_len), (seq_len, lengths)


def test_packing_compact_examples_gives_the_rows_of_the_same_dicts(char_tokenizer):
    import torch

    rows = [{"instruction": f"Repeat {w}", "output": w} for w in ("cat", "horse", "a", "elephant", "dog", "ox")] * 3
    examples, _ = load_dataset(rows, char_tokenizer, cache=False)
    lazy = pack(examples, 80, char_tokenizer.pad_token_id)
    eager = pack([dict(e) for e in examples], 80, char_tokenizer.pad_token_id)
    assert len(lazy) == len(eager) < len(examples)
    for a, b in zip(lazy, eager):
        assert a.keys() == b.keys() and a["real_tokens"] == b["real_tokens"]
        for k in ("input_ids", "targets", "position_ids"):
            assert a[k].dtype == b[k].dtype == torch.int64 and torch.equal(a[k], b[k]), k
    subset = pack(examples[2:9], 80, 0)  # views of one set, as a validation split leaves them
    assert sorted(len(r["input_ids"]) for r in subset) == [80] * len(subset)


# -- the cache ---------------------------------------------------------------------------------------------------------
def test_a_second_identical_load_reads_the_cache(tmp_path):
    tok = make_bpe_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA * 20)
    cache = tmp_path / "cache"
    first, stats = load_dataset(path, tok, max_length=64, cache=cache)
    assert not stats.cached and len(list(cache.iterdir())) == 1
    again, stats2 = load_dataset(path, tok, max_length=64, cache=cache)
    assert stats2.cached and "from the cache" in stats2.describe()
    assert isinstance(again.input_ids.base, np.memmap) and as_lists(again) == as_lists(first)  # mapped, not read
    assert (stats2.tokens, stats2.target_tokens, stats2.examples) == (stats.tokens, stats.target_tokens, 60)


def test_the_cache_key_follows_content_tokenizer_template_and_settings(tmp_path):
    tok = make_bpe_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cache = tmp_path / "cache"

    def entries():
        return len(list(cache.iterdir()))

    load_dataset(path, tok, cache=cache)
    load_dataset(tmp_path / "d.jsonl", tok, cache=cache)  # the same content: the same entry
    assert entries() == 1
    write_jsonl(tmp_path / "d.jsonl", ALPACA[:2])  # new content under the same name
    examples, stats = load_dataset(path, tok, cache=cache)
    assert not stats.cached and len(examples) == 2 and entries() == 2
    load_dataset(path, tok, mask_prompt=False, cache=cache)  # another setting
    assert entries() == 3
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")  # another template
    load_dataset(path, tok, cache=cache)
    load_dataset(path, make_char_tokenizer(), cache=cache)  # another tokenizer
    assert entries() == 5
    load_dataset(path, tok, cache=False)
    assert entries() == 5


def test_the_cache_key_hashes_every_module_the_tokenizing_code_uses():
    # found another way than the cache finds them (by import statements): from what each module's globals hold at
    # run time, starting at lora.data.dataset
    seen, todo = set(), [importlib.import_module("lora.data.dataset")]
    while todo:
        module = todo.pop()
        if module.__name__ not in seen:
            seen.add(module.__name__)
            owners = (v if inspect.ismodule(v) else inspect.getmodule(v) for v in vars(module).values())
            todo += [m for m in owners if m is not None and m.__name__.startswith("lora.data.")]
    assert {name.rpartition(".")[2] + ".py" for name in seen} == set(_tokenizing_code())
    assert {"dataset.py", "encode.py", "chat.py"} <= set(_tokenizing_code())


def test_a_damaged_cache_entry_is_tokenized_again(tmp_path, char_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cache = tmp_path / "cache"
    first = as_lists(load_dataset(path, char_tokenizer, cache=cache)[0])
    (entry,) = cache.iterdir()
    (entry / "input_ids").write_bytes(b"\0" * 3)  # shorter than meta.json says
    again, stats = load_dataset(path, char_tokenizer, cache=cache)
    assert not stats.cached and as_lists(again) == first
