"""The recipe scripts end to end on a tiny model folder: they learn, save the adapter and write metrics.json."""

import json
import sys
from pathlib import Path

import pytest

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
                        "seq_len=64", ])
    assert metrics["accuracy_before"] < 0.3 and metrics["accuracy_after"] >= 0.9
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "train_seconds", "tokens_per_second", "peak_memory_bytes",
                "adapter"):
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
