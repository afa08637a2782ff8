"""`lora train RECIPE`: the recipes' one implementation through its second door, with the same settings, help and
errors as `python recipes/RECIPE.py`; recipes are found by their module name, and a file of your own runs too."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora.recipes
from lora import LoraConfig, TrainConfig
from lora.cli import main
from lora.recipe import parse_settings, run
from lora.recipes import sft
from conftest import make_char_tokenizer, make_llama_for

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"instruction": "First word?", "input": f"{w} {v}", "output": w} for w in ("red", "blue") for v in
        ("pink", "green")]


@pytest.fixture
def tiny_model_dir(tmp_path):
    tok = make_char_tokenizer()
    make_llama_for(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def sft_args(tmp_path, model_dir, name):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return [f"model={model_dir}", f"train_file={data}", f"eval_file={data}", f"output_dir={tmp_path / name}",
            f"adapter_dir={tmp_path / name / 'adapter'}", "batch_size=2", "grad_accum=1", "seq_len=64", "max_steps=2",
            "eval_max_new_tokens=2"]


def test_lora_train_and_the_script_give_the_same_adapter(tmp_path, tiny_model_dir):
    assert main(["train", "sft", *sft_args(tmp_path, tiny_model_dir, "cli")]) == 0
    torch.manual_seed(123)  # another random state before the run: the recipe seeds itself
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import sft as script  # recipes/sft.py, the door from a clone
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    assert script.main is sft.main and script.SFT is sft.SFT  # one implementation
    script.main(sft_args(tmp_path, tiny_model_dir, "script"))
    one, two = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("cli", "script"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    card = (tmp_path / "cli" / "adapter" / "README.md").read_text()  # the run's data and metrics in the card
    for row in (f"| train_file | {tmp_path / 't.jsonl'} |", "| train_examples | 4 |", "| eval_examples | 4 |",
                "| steps | 2 of 2 |", f"| accuracy_after | {metrics['accuracy_after']:.4g} |"):
        assert row in card, row


def test_help_lists_every_field_with_its_default_as_the_script_does(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "sft", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_settings(sft.SFT, ["--help"])
    assert capsys.readouterr().out == out
    defaults = {f.name: f.default for cls in (LoraConfig, TrainConfig, sft.SFT) for f in dataclasses.fields(cls)}
    defaults.update(sft.SFT.DEFAULTS)
    for name, value in defaults.items():
        assert re.search(rf"^  {name} \([^)]*\) = {re.escape(repr(value))}$", out, flags=re.M), name


def test_the_script_and_the_command_print_the_same_help_and_error():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outputs = []
    for cmd in ([sys.executable, str(ROOT / "recipes" / "sft.py")], [str(Path(sys.executable).parent / "lora"),
                                                                      "train", "sft"]):
        helped = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=300, env=env)
        failed = subprocess.run([*cmd, "r=0"], capture_output=True, text=True, timeout=300, env=env)
        outputs.append((helped.returncode, helped.stdout, failed.returncode, failed.stderr.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    assert outputs[0][2] == 1 and outputs[0][3] == "error: LoraConfig.r must be an integer >= 1, got 0"


def test_errors_are_the_scripts_and_a_wrong_recipe_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as via_cli:
        main(["train", "sft", "epoch=3"])
    with pytest.raises(SystemExit) as via_script:
        run(sft.main, ["epoch=3"])
    assert via_cli.value.code == via_script.value.code
    assert str(via_cli.value.code).startswith("error: unknown setting(s) ['epoch'] in the command line")
    capsys.readouterr()
    assert main(["train", "nope"]) == 2
    err = capsys.readouterr().err
    assert "lora train: error: no recipe 'nope'; the recipes are classify, dpo, grpo, pretrain, sft" in err
    assert main(["train"]) == 2
    assert "lora train needs a recipe" in capsys.readouterr().err
    assert main(["train", "--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in lora.recipes.names())


def test_a_recipe_added_later_is_found_by_its_name_and_a_file_of_your_own_runs(tmp_path, monkeypatch, capsys):
    extra = tmp_path / "more"
    extra.mkdir()
    (extra / "hello.py").write_text('"""Says hello."""\n\n\ndef main(argv):\n    print("hello", argv)\n    '
                                    'return {}\n')
    monkeypatch.setattr(lora.recipes, "__path__", [*lora.recipes.__path__, str(extra)])  # as if in lora/recipes/
    monkeypatch.delitem(sys.modules, "lora.recipes.hello", raising=False)
    assert "hello" in lora.recipes.names()
    assert main(["train", "hello", "a=1"]) == 0
    assert capsys.readouterr().out == "hello ['a=1']\n"
    assert main(["train", "--help"]) == 0
    assert "  hello      Says hello." in capsys.readouterr().out
    monkeypatch.delitem(sys.modules, "lora.recipes.hello")
    (tmp_path / "mine.py").write_text("def main(argv):\n    print('mine', argv)\n    return {}\n")
    assert main(["train", str(tmp_path / "mine.py"), "--config", "x.yaml"]) == 0
    assert capsys.readouterr().out == "mine ['--config', 'x.yaml']\n"
    (tmp_path / "nomain.py").write_text("x = 1\n")
    assert main(["train", str(tmp_path / "nomain.py")]) == 2
    assert "defines no main(argv)" in capsys.readouterr().err
