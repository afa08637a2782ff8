"""`lora eval`: exact match and perplexity on a data file as the trainer measures them, and lm-evaluation-harness
tasks through its Python API with our model object, giving what lm-eval's own command line gives on the same model
folder and adapter. Offline: the task is a local JSONL file named in a task YAML."""

import json
import os
import re
import subprocess
import sys

import pytest

import lora
from lora.cli import main
from lora.data import load_dataset, prompts_and_answers
from lora.generate import exact_match
from conftest import make_char_tokenizer, make_llama_for, randomize_adapters

ROWS = [{"instruction": "First word?", "input": f"{w} {v}", "output": w} for w in ("red", "blue") for v in
        ("pink", "green", "gold")]
TASK = """task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def base_and_adapter(tmp_path):
    tok = make_char_tokenizer()
    model = make_llama_for(tok)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    randomize_adapters(model, std=0.5)
    lora.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model, tok


def test_data_metrics_are_the_trainers_perplexity_and_exact_match(tmp_path, base_and_adapter, capsys):
    base, adapter, model, tok = base_and_adapter
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["eval", "--model", str(base), "--adapter", str(adapter), "--data", str(data), "--max-length", "64",
                 "--max-new-tokens", "3", "--out", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    got = report["data"][0]
    examples, _ = load_dataset(data, tok, max_length=64)
    trainer = lora.Trainer(model, lora.TrainConfig(seq_len=64, batch_size=2, output_dir=str(tmp_path / "run")),
                           examples, eval_data=examples)
    expected = trainer.evaluate()
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert got["examples"] == len(ROWS) and got["target_tokens"] == sum(
        sum(t != -100 for t in e["targets"]) for e in examples)
    prompts, answers = prompts_and_answers(data)
    assert got["exact_match"] == exact_match(model, tok, prompts, answers, 3)[0]
    assert f"|eval.jsonl|{len(ROWS)}|exact_match|{got['exact_match']:.4f}|" in printed
    assert f"|perplexity|{got['perplexity']:.4f}|" in printed
    assert main(["eval", "--model", str(base), "--adapter", str(adapter), "--merge", "--data", str(data),
                 "--max-length", "64", "--max-new-tokens", "3", "--out", str(tmp_path / "m.json")]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())["data"][0]
    assert merged["perplexity"] == pytest.approx(got["perplexity"], rel=1e-5)
    text = tmp_path / "text.jsonl"  # plain text: perplexity, and the reason there is no exact match
    text.write_text('{"text": "the cat sat on the mat"}\n')
    assert main(["eval", "--model", str(base), "--data", str(text), "--out", str(tmp_path / "t.json")]) == 0
    plain = json.loads((tmp_path / "t.json").read_text())["data"][0]
    assert plain["exact_match"] is None and "exact-match evaluation needs prompts with answers" in \
        plain["exact_match_skipped"]


def table_rows(text: str) -> list[str]:
    """lm-eval's results table, its rows for our task and the row under it (acc_norm)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.startswith("|tiny_sums"))
    return lines[start:start + 2]


def test_lm_eval_task_gives_what_lm_evals_own_command_line_gives(tmp_path, base_and_adapter, capsys):
    base, adapter, _, _ = base_and_adapter
    rows = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b + 2)], "answer": 0}
            for a in range(6) for b in range(5)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_sums.yaml").write_text(TASK.format(data=tmp_path / "sums.jsonl"))

    assert main(["eval", "--model", str(base), "--adapter", str(adapter), "--tasks", "tiny_sums", "--include-path",
                 str(tasks), "--out", str(tmp_path / "ours.json")]) == 0
    ours = table_rows(capsys.readouterr().out)
    scores = json.loads((tmp_path / "ours.json").read_text())["tasks"]["tiny_sums"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={base},peft={adapter}", "--tasks", "tiny_sums", "--include_path", str(tasks),
                           "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "theirs")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table_rows(proc.stdout) == ours  # the same accuracy, printed the same way
    theirs = json.loads(next((tmp_path / "theirs").rglob("results_*.json")).read_text())["results"]["tiny_sums"]
    assert (scores["acc"], scores["acc_norm"]) == (theirs["acc,none"], theirs["acc_norm,none"])
    assert re.search(r"\|acc +\|", ours[0])

    assert main(["eval", "--model", str(base), "--adapter", str(adapter), "--merge", "--tasks", "tiny_sums",
                 "--include-path", str(tasks), "--out", str(tmp_path / "merged.json")]) == 0
    assert table_rows(capsys.readouterr().out) == ours
    assert main(["eval", "--model", str(base), "--tasks", "tiny_sums", "--include-path", str(tasks),
                 "--out", str(tmp_path / "base.json")]) == 0
    base_scores = json.loads((tmp_path / "base.json").read_text())["tasks"]["tiny_sums"]
    assert (base_scores["acc"], base_scores["acc_norm"]) != (scores["acc"], scores["acc_norm"])  # the adapter counts


def test_bad_requests_are_one_error_line(tmp_path, base_and_adapter, capsys):
    base, adapter, _, _ = base_and_adapter
    for argv, message in (([], "nothing to evaluate: give --data"),
                          (["--merge", "--tasks", "x"], "--merge needs --adapter DIR"),
                          (["--tasks", "no_such_task_here", "--include-path", str(tmp_path)],
                           r"lm-eval knows no task \['no_such_task_here'\]"),
                          (["--tasks", "x", "--include-path", str(tmp_path / "nope")], "is not a folder")):
        assert main(["eval", "--model", str(base), *argv, "--out", str(tmp_path / "x.json")]) == 2, argv
        err = capsys.readouterr().err
        assert re.search(r"lora eval: error: .*" + message, err), err
    assert not (tmp_path / "x.json").exists()
