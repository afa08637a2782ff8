"""Every source and format trains through the recipes with only train_file=/eval_file= (and, for renamed columns,
columns=) changed: one step on a tiny model, whose first-step loss equals the JSONL run's where the data is the
same. Text goes through pretrain, preference pairs through dpo, labelled text through classify; a multi-turn
tool-calling set trains on a Qwen2-family model whose chat template renders tools."""

import csv
import json
import math

import pytest

from conftest import make_char_tokenizer, make_llama_for
from data_templates import TOOL_CHATML, tool_conversation
from families import make_family
from lora.recipes import classify, dpo, pretrain, sft

WORDS = ("red", "blue", "green", "pink")
ALPACA = [{"instruction": "First word?", "input": f"{w} {v}", "output": w} for w in WORDS for v in WORDS[:2]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tok = make_char_tokenizer()
    make_llama_for(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows, delimiter=","):
    columns = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows([[r.get(c, "") for c in columns] for r in rows])
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({k for r in rows for k in r})
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return path


def as_source(tmp_path, kind, rows, name):
    """``rows`` written as source ``kind`` under tmp_path/name; the path or glob to pass as train_file."""
    base = tmp_path / name
    if kind == "jsonl":
        return write_jsonl(base.with_suffix(".jsonl"), rows)
    if kind == "json":
        base.with_suffix(".json").write_text(json.dumps(rows))
        return base.with_suffix(".json")
    if kind in ("csv", "tsv"):
        return write_csv(base.with_suffix(f".{kind}"), rows, "," if kind == "csv" else "\t")
    if kind == "parquet":
        return write_parquet(base.with_suffix(".parquet"), rows)
    if kind == "arrow":
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(base))
        return base
    base.mkdir()
    half = len(rows) // 2
    write_jsonl(base / "part-0.jsonl", rows[:half])
    write_parquet(base / "part-1.parquet", rows[half:])
    return base if kind == "folder" else f"{base}/part-*"


def run(recipe, model_dir, tmp_path, train, evaluation, *extra):
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    return recipe.main([f"model={model_dir}", f"train_file={train}", f"eval_file={evaluation}", f"output_dir={out}",
                        f"adapter_dir={out / 'adapter'}", "max_steps=1", "batch_size=2", "grad_accum=1",
                        "seq_len=96", "validation_split=0", "early_stopping_patience=0", *extra])


def sft_run(model_dir, tmp_path, train, evaluation, *extra):
    return run(sft, model_dir, tmp_path, train, evaluation, "eval_max_new_tokens=2", "learning_rate=1e-2", *extra)


@pytest.fixture(scope="module")
def jsonl_loss(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    data = write_jsonl(tmp / "t.jsonl", ALPACA)
    return sft_run(model_dir, tmp, data, data)["train_loss"]


@pytest.mark.parametrize("kind", ["json", "csv", "tsv", "parquet", "arrow", "folder", "glob"])
def test_sft_trains_on_every_source_as_on_jsonl(kind, model_dir, tmp_path, jsonl_loss):
    train = as_source(tmp_path, kind, ALPACA, "train")
    evaluation = as_source(tmp_path, kind, ALPACA[:3], "eval")
    metrics = sft_run(model_dir, tmp_path, train, evaluation)
    assert metrics["steps"] == 1 and metrics["accuracy_before"] is not None
    assert metrics["train_loss"] == pytest.approx(jsonl_loss, rel=1e-6)  # the same examples, the same first step


def test_sft_trains_on_sharegpt_and_on_renamed_columns(model_dir, tmp_path, jsonl_loss):
    sharegpt = [{"conversations": [{"from": "human", "value": f"{r['instruction']}\n\n{r['input']}"},
                                   {"from": "gpt", "value": r["output"]}]} for r in ALPACA]
    train = write_jsonl(tmp_path / "share.jsonl", sharegpt)
    assert sft_run(model_dir, tmp_path, train, train)["train_loss"] == pytest.approx(jsonl_loss, rel=1e-6)
    renamed = [{"task": r["instruction"], "context": r["input"], "reply": r["output"]} for r in ALPACA]
    train = write_parquet(tmp_path / "renamed.parquet", renamed)
    metrics = sft_run(model_dir, tmp_path, train, train, "columns=instruction:task,input:context,output:reply")
    assert metrics["train_loss"] == pytest.approx(jsonl_loss, rel=1e-6)


def test_sft_trains_a_multi_turn_tool_calling_set_on_a_qwen2_model(tmp_path):
    tok = make_char_tokenizer()
    tok.chat_template = TOOL_CHATML
    folder = tmp_path / "qwen2"
    make_family("qwen2", tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    records = [tool_conversation(city, degrees) for city, degrees in (("Paris", 18), ("Rome", 25), ("Oslo", 3))]
    train = write_jsonl(tmp_path / "tools.jsonl", records * 2)
    metrics = run(sft, folder, tmp_path, train, write_jsonl(tmp_path / "tools_eval.jsonl", records[:1]),
                  "eval_max_new_tokens=2", "seq_len=512", "max_steps=2")
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"])


def test_pretrain_trains_on_a_text_file_and_on_parquet(model_dir, tmp_path):
    book = "\n\n\n".join(f"Chapter {i}.\nThe cat sat on the mat, again and again." * 3 for i in range(4))
    (tmp_path / "book.txt").write_text(book)
    (tmp_path / "notes.md").write_text("# Notes\n\nThe cat sat.\n")
    metrics = run(pretrain, model_dir, tmp_path, tmp_path / "book.txt", tmp_path / "notes.md")
    assert metrics["steps"] == 1 and math.isfinite(metrics["perplexity_before"])
    rows = [{"text": "the cat sat on the mat."}] * 6
    train = write_parquet(tmp_path / "t.parquet", rows)
    assert run(pretrain, model_dir, tmp_path, train, train)["steps"] == 1


def test_dpo_trains_on_alpaca_layout_pairs_in_a_json_array(model_dir, tmp_path):
    pairs = [{"instruction": "Say a color", "input": w, "chosen": w, "rejected": v}
             for w in WORDS for v in WORDS if v != w]
    (tmp_path / "p.json").write_text(json.dumps(pairs))
    metrics = run(dpo, model_dir, tmp_path, tmp_path / "p.json", tmp_path / "p.json")
    assert metrics["steps"] == 1 and metrics["preference_accuracy_before"] is not None


def test_classify_trains_on_csv(model_dir, tmp_path):
    rows = [{"text": f"WIN {i} prize", "label": "spam"} for i in range(6)]
    rows += [{"text": f"see you at {i}", "label": "ham"} for i in range(6)]
    train = write_csv(tmp_path / "sms.csv", rows)
    metrics = run(classify, model_dir, tmp_path, train, train, "packing=false")
    assert metrics["steps"] == 1 and metrics["labels"] == ["ham", "spam"]
