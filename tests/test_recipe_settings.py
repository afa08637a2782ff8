"""Recipe settings: YAML keys and key=value overrides are exactly the dataclass fields; errors list valid keys."""

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora.recipe import parse_settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


@dataclass(frozen=True)
class Demo:
    model: str = "m"
    limit: int | None = None
    DEFAULTS = {"r": 4, "learning_rate": 1e-3}


def test_defaults_file_and_overrides_stack(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("r: 8\nmodel: from-file\ntargets: [q_proj, v_proj]\n")
    demo, lora_cfg, train_cfg = parse_settings(Demo, ["--config", str(path), "learning_rate=5e-4", "limit=3",
                                                      "packing=false", "exclude=k_proj,o_proj", "layers=[0, 1]"])
    assert demo == Demo(model="from-file", limit=3)
    assert lora_cfg.r == 8 and lora_cfg.targets == ("q_proj", "v_proj") and lora_cfg.exclude == ("k_proj", "o_proj")
    assert lora_cfg.layers == (0, 1)
    assert train_cfg.learning_rate == 5e-4 and train_cfg.packing is False
    assert parse_settings(Demo, ["limit=none"])[0].limit is None
    assert parse_settings(Demo, ["layers=0,1"])[1].layers == (0, 1)
    assert parse_settings(Demo, ["layers=3"])[1].layers == (3,)


@pytest.mark.parametrize("argv, message", [
    (["learning_rat=1e-3"], r"unknown setting\(s\) \['learning_rat'\] in the command line. Valid settings: .*"
                            r"learning_rate"),
    (["batch_size=eight"], r"batch_size='eight': expected int"),
    (["packing=maybe"], r"packing='maybe': expected bool"),
    (["--lr", "3"], "unexpected argument '--lr'"),
    (["--config"], "--config needs a YAML file"),
    (["r=0"], "LoraConfig.r must be an integer >= 1"),
    (["schedule=step"], "TrainConfig.schedule must be one of"),
    (["layers=0,x"], r"layers='0,x': expected tuple\[int, \.\.\.\] \| None"),
])
def test_bad_settings_are_explained(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_settings(Demo, argv)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rank: 8\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['rank'\] in .*c.yaml"):
        parse_settings(Demo, ["--config", str(path)])
    with pytest.raises(ValueError, match="does not exist"):
        parse_settings(Demo, ["--config", str(tmp_path / "none.yaml")])


@pytest.mark.parametrize("recipe, cls", [("sft", "SFT"), ("classify", "Classify"), ("pretrain", "Pretrain")])
def test_shipped_configs_match_their_recipes(recipe, cls):
    module = __import__(recipe)
    settings, _, train_cfg = parse_settings(getattr(module, cls), ["--config", str(ROOT / "recipes" / "configs" /
                                                                                     f"{recipe}.yaml")])
    assert Path(settings.train_file).name.endswith("_train.jsonl")
    assert train_cfg.output_dir == f"runs/{recipe}"
    header = (ROOT / "recipes" / "configs" / f"{recipe}.yaml").read_text().splitlines()[0]
    assert header == f"# python recipes/{recipe}.py --config recipes/configs/{recipe}.yaml [key=value ...]"


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_settings(Demo, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "  learning_rate (float) = 0.001" in out and "  limit (int | None) = None" in out and "  r (int) = 4" in out


@pytest.mark.parametrize("value, targets", [
    ("q_proj,v_proj", ("q_proj", "v_proj")),
    ("q_proj, v_proj", ("q_proj", "v_proj")),
    ("q_proj", ("q_proj",)),
    ("self_attn.q_proj,mlp.up_proj", ("self_attn.q_proj", "mlp.up_proj")),
    ("all-linear", "all-linear"),
    (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
    (r"model\.layers\.0\..*", r"model\.layers\.0\..*"),
    ("[q_proj, k_proj]", ("q_proj", "k_proj")),
])
def test_targets_on_the_command_line_are_a_list_of_names_or_a_regex(value, targets):
    assert parse_settings(Demo, [f"targets={value}"])[1].targets == targets


def test_comma_separated_targets_from_the_command_line_match_modules():
    import lora
    from conftest import make_llama

    _, lora_cfg, _ = parse_settings(Demo, ["targets=q_proj,v_proj"])
    wrapped = lora.inject(make_llama(), lora_cfg)
    assert {path.rsplit(".", 1)[-1] for path in wrapped} == {"q_proj", "v_proj"}


@dataclass(frozen=True)
class WithAdapter:
    adapter_dir: str = "adapters/x"


def test_an_adapter_dir_that_would_delete_the_run_or_other_files_is_refused_before_training(tmp_path):
    run = tmp_path / "run"
    for adapter_dir in (run, tmp_path):  # the same folder, or one holding it
        with pytest.raises(ValueError, match="would delete the run's checkpoints"):
            parse_settings(WithAdapter, [f"adapter_dir={adapter_dir}", f"output_dir={run}"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"already holds \['notes.txt'\]"):
        parse_settings(WithAdapter, [f"adapter_dir={tmp_path / 'mine'}", f"output_dir={run}"])
    settings, _, _ = parse_settings(WithAdapter, [f"adapter_dir={run / 'adapter'}", f"output_dir={run}"])
    assert settings.adapter_dir == str(run / "adapter")
