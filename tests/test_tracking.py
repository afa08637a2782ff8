"""TrainConfig(logger=...): TensorBoard, W&B (offline) and MLflow (a local file store) get the same scalars and the
run's settings through accelerate's trackers; each test reads back what its tracker wrote to disk. No network."""

import json
import math
import struct
from pathlib import Path

import pytest

import lora
from lora.data import load_dataset
from conftest import make_char_tokenizer, make_llama_for

ROWS = [{"instruction": "Repeat", "input": w, "output": w} for w in ("red", "blue", "green", "pink")] * 4


def train_with(logger: str, out: Path):
    tok = make_char_tokenizer()
    model = make_llama_for(tok)
    path = out.parent / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data, _ = load_dataset(path, tok, max_length=64)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    trainer = lora.Trainer(model, lora.TrainConfig(max_steps=3, batch_size=2, seq_len=64, log_every=1,
                                                   learning_rate=3e-3, logger=logger, output_dir=str(out)),
                           data, eval_data=data[:4])
    result = trainer.train()
    return trainer, result


def assert_same_scalars(trainer, result, logged: dict[str, dict[int, float]], rel: float) -> None:
    """Every step's loss and learning rate, and the final evaluation, as the trainer measured them."""
    for name in ("loss", "lr", "tokens_per_second"):
        expected = {h["step"]: h[name] for h in trainer.history}
        assert set(logged[name]) == set(expected) == {1, 2, 3}, (name, logged.get(name))
        for step, value in expected.items():
            assert math.isclose(logged[name][step], value, rel_tol=rel), (name, step, logged[name][step], value)
    assert math.isclose(logged["eval_loss"][3], result.eval_loss, rel_tol=rel)
    assert math.isclose(logged["perplexity"][3], result.perplexity, rel_tol=rel)


def test_tensorboard_event_files_hold_the_scalars_and_settings(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    trainer, result = train_with("tensorboard", tmp_path / "run")
    logged, settings = {}, {}
    for events in sorted((tmp_path / "run" / "lora").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            logged.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
        try:
            hparams = acc.PluginTagToContent("hparams")
        except KeyError:  # an event file of scalars only
            hparams = {}
        for content in hparams.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            for name, value in data.session_start_info.hparams.items():
                settings[name] = value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
    assert_same_scalars(trainer, result, logged, rel=1e-6)  # TensorBoard keeps float32
    assert settings["learning_rate"] == pytest.approx(3e-3) and settings["r"] == 4 and settings["alpha"] == 8
    assert settings["logger"] == "tensorboard" and settings["targets"] == "all-linear"


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file: LevelDB-style blocks of 32 KiB, each record a 7-byte header (CRC32, length,
    type: full, first, middle, last) and a piece of a protobuf ``Record``; the file starts with a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, pieces, out = run_file.read_bytes(), 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        piece, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        pieces = piece if kind in (1, 2) else pieces + piece
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(pieces))
    return out


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B writes a key one way or the other


def test_wandb_offline_run_holds_the_scalars_and_settings(tmp_path, monkeypatch):
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONFIG_DIR", tmp_path / "cfg"),
                       ("WANDB_CACHE_DIR", tmp_path / "cache"), ("WANDB_DATA_DIR", tmp_path / "data")):
        monkeypatch.setenv(var, str(value))
    trainer, result = train_with("wandb", tmp_path / "run")
    run_files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, "the W&B run belongs under output_dir"
    logged, settings, names = {}, {}, set()
    for record in wandb_records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item_key(i): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                logged.setdefault(key, {})[items["_step"]] = value
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            settings.update({item_key(u): json.loads(u.value_json) for u in updates})
            if kind == "run":
                names.add((record.run.project, record.run.display_name))
    assert names == {("lora", "run")}
    assert_same_scalars(trainer, result, logged, rel=1e-12)
    assert settings["learning_rate"] == 3e-3 and settings["r"] == 4 and settings["alpha"] == 8
    assert settings["logger"] == "wandb"


def test_mlflow_file_store_holds_the_scalars_and_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in output_dir/mlruns
    trainer, result = train_with("mlflow", tmp_path / "run")
    runs = [p for p in (tmp_path / "run" / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    assert len(runs) == 1
    logged = {}
    for metric in (runs[0] / "metrics").iterdir():
        for line in metric.read_text().splitlines():  # "timestamp value step"
            _, value, step = line.split()
            logged.setdefault(metric.name, {})[int(step)] = float(value)
    assert_same_scalars(trainer, result, logged, rel=1e-12)
    params = {p.name: p.read_text() for p in (runs[0] / "params").iterdir()}
    assert float(params["learning_rate"]) == 3e-3 and params["r"] == "4" and params["logger"] == "mlflow"
    assert (runs[0] / "tags" / "mlflow.runName").read_text() == "run"


def test_a_tracker_that_is_not_installed_is_refused_with_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"logger=wandb needs the wandb package.*pip install 'lora\[track\]'"):
        lora.TrainConfig(logger="wandb")
    with pytest.raises(ValueError, match=r"TrainConfig.logger must be one of \('none', 'tensorboard', 'wandb', "
                                         r"'mlflow'\)"):
        lora.TrainConfig(logger="comet")
