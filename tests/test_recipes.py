"""The recipe scripts end to end on a tiny model folder: they learn, save the adapter and write metrics.json."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora

from conftest import make_llama_for, make_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import classify  # noqa: E402
import pretrain  # noqa: E402
import sft  # noqa: E402


@pytest.fixture
def tiny_model_dir(tmp_path):
    tok = make_char_tokenizer()
    make_llama_for(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sft_recipe_learns_the_answer_and_writes_metrics(tmp_path, tiny_model_dir):
    # the answer is the first word of the input: learnable by a tiny model in a few hundred steps
    words = ["red", "blue", "green", "pink"]
    rows = [{"instruction": "First word?", "input": f"{w} {v}", "output": w} for w in words for v in words] * 4
    out = tmp_path / "run"
    metrics = sft.main([f"model={tiny_model_dir}", f"train_file={write(tmp_path / 't.jsonl', rows)}",
                        f"eval_file={write(tmp_path / 'e.jsonl', rows[:16])}", f"output_dir={out}",
                        f"adapter_dir={tmp_path / 'adapter'}", "epochs=30", "learning_rate=1e-2", "batch_size=4",
                        "seq_len=64", "validation_split=0", "early_stopping_patience=0"])  # 30 epochs, on purpose
    assert metrics["accuracy_before"] < 0.3 and metrics["accuracy_after"] >= 0.9
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "train_seconds", "tokens_per_second", "peak_memory_bytes",
                "adapter", "stopped_early", "best_step"):
        assert key in saved
    assert (Path(saved["adapter"]) / "adapter_model.safetensors").is_file()
    assert (out / "loss_curve.png").is_file()


def test_classify_recipe_beats_the_majority_baseline(tmp_path, tiny_model_dir):
    rows = [{"text": f"WIN {i} prize now!!", "label": "spam"} for i in range(30)]
    rows += [{"text": f"see you at {i}", "label": "ham"} for i in range(50)]
    out = tmp_path / "run"
    metrics = classify.main([f"model={tiny_model_dir}", f"train_file={write(tmp_path / 't.jsonl', rows)}",
                             f"eval_file={write(tmp_path / 'e.jsonl', rows[::4])}", f"output_dir={out}",
                             f"adapter_dir={tmp_path / 'adapter'}", "epochs=4", "batch_size=8",
                             "learning_rate=5e-3"])
    assert metrics["accuracy_after"] >= 0.95 > metrics["majority_baseline"]
    assert json.loads((out / "metrics.json").read_text())["labels"] == ["ham", "spam"]
    adapter_keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    assert adapter_keys == ["score"]


def test_pretrain_recipe_lowers_perplexity(tmp_path, tiny_model_dir):
    rows = [{"text": "the cat sat on the mat. " * 3}] * 40
    metrics = pretrain.main([f"model={tiny_model_dir}", f"train_file={write(tmp_path / 't.jsonl', rows)}",
                             f"eval_file={write(tmp_path / 'e.jsonl', rows[:4])}", f"output_dir={tmp_path / 'run'}",
                             f"adapter_dir={tmp_path / 'adapter'}", "epochs=4", "learning_rate=1e-2",
                             "seq_len=128"])
    assert metrics["perplexity_after"] < 0.5 * metrics["perplexity_before"]


def test_recipe_rejects_unknown_settings(tiny_model_dir):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['epoch'\]"):
        sft.main([f"model={tiny_model_dir}", "epoch=3"])


SFT_ROWS = [{"instruction": "First word?", "input": f"{w} {v}", "output": w} for w in ("red", "blue") for v in
            ("pink", "green")]


def sft_args(tmp_path, model_dir, name, *extra):
    data = write(tmp_path / "t.jsonl", SFT_ROWS)
    return [f"model={model_dir}", f"train_file={data}", f"eval_file={data}", f"output_dir={tmp_path / name}",
            f"adapter_dir={tmp_path / name / 'adapter'}", "batch_size=2", "grad_accum=1", "seq_len=64", *extra]


def test_the_same_sft_command_gives_the_same_adapter(tmp_path, tiny_model_dir):
    adapters = []
    for run, seed in (("one", 1), ("two", 2)):
        torch.manual_seed(seed)  # as two processes would, each with its own random state
        sft.main(sft_args(tmp_path, tiny_model_dir, run, "max_steps=2", "eval_max_new_tokens=2"))
        adapters.append(load_file(tmp_path / run / "adapter" / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        assert torch.equal(value, adapters[1][key]), key


@pytest.mark.parametrize("recipe", ["sft", "pretrain", "classify"])
def test_a_recipe_stopped_by_ctrl_c_saves_its_adapter_and_metrics(tmp_path, tiny_model_dir, monkeypatch, recipe):
    backward_window = lora.Trainer._backward_window

    def ctrl_c_in_the_first_step(trainer, micro_batches):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of step 1
        return backward_window(trainer, micro_batches)

    monkeypatch.setattr(lora.Trainer, "_backward_window", ctrl_c_in_the_first_step)
    if recipe == "sft":
        argv = sft_args(tmp_path, tiny_model_dir, "run", "max_steps=5", "eval_max_new_tokens=2")
    else:
        rows = ([{"text": "the cat sat on the mat."}] * 8 if recipe == "pretrain" else
                [{"text": f"WIN {i}", "label": "spam"} for i in range(4)] + [{"text": f"at {i}", "label": "ham"}
                                                                              for i in range(4)])
        data = write(tmp_path / "t.jsonl", rows)
        argv = [f"model={tiny_model_dir}", f"train_file={data}", f"eval_file={data}", f"output_dir={tmp_path / 'run'}",
                f"adapter_dir={tmp_path / 'run' / 'adapter'}", "batch_size=2", "seq_len=64", "max_steps=5"]
    metrics = {"sft": sft, "pretrain": pretrain, "classify": classify}[recipe].main(argv)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == metrics and saved["interrupted"] is True and saved["steps"] == 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-0000001").is_dir()  # resume=true continues from here


@pytest.mark.parametrize("setting, message", [
    ("output_dir={file}/run", r"error: output_dir '.*file/run': .*file is a file; pass an output_dir that is a folder"),
    ("learning_rate=1e30", r"error: the training loss became (nan|inf) at step 2; .*resume=True"),
])
def test_a_recipe_that_fails_prints_one_error_line(tmp_path, tiny_model_dir, setting, message):
    (tmp_path / "file").write_text("a file where a folder should go: writing the checkpoint fails\n")
    argv = sft_args(tmp_path, tiny_model_dir, "run", "max_steps=3", "max_grad_norm=none", "eval_max_new_tokens=1",
                    setting.format(file=tmp_path / "file"))
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "sft.py"), *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and proc.stderr.splitlines()[-1] == errors[0], proc.stderr[-3000:]
    assert re.match(message, errors[0]), errors[0]


def test_dpo_recipe_learns_the_preferences_with_the_adapter_off_as_reference(tmp_path, tiny_model_dir):
    import dpo

    # preferring a word from the prompt over an unrelated one: learnable by a tiny model in a few steps
    words = ["red", "blue", "green", "pink", "gray", "teal"]
    rows = [{"prompt": f"Say {w}", "chosen": w, "rejected": v} for w in words for v in words if v != w]
    out = tmp_path / "run"
    metrics = dpo.main([f"model={tiny_model_dir}", f"train_file={write(tmp_path / 't.jsonl', rows)}",
                        f"eval_file={write(tmp_path / 'e.jsonl', rows)}", f"output_dir={out}",
                        f"adapter_dir={tmp_path / 'adapter'}", "epochs=6", "learning_rate=1e-2", "batch_size=6",
                        "grad_accum=1", "seq_len=64", "dpo_beta=0.5"])
    assert metrics["preference_accuracy_before"] < 0.75
    assert metrics["preference_accuracy_after"] >= 0.95 and metrics["reward_margin_after"] > 0
    assert json.loads((out / "metrics.json").read_text())["preference_accuracy_after"] == \
        metrics["preference_accuracy_after"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
