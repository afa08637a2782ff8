"""The Trainer: accumulation equivalence, exact resume (Ctrl-C and a killed process), non-finite stop, learning."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
from lora.data import load_dataset
from lora.trainer import TrainConfig, Trainer, lr_factor
from conftest import make_llama_for, make_char_tokenizer

WORDS = ["cat", "horse", "a", "elephant", "dog", "ox", "giraffe", "bee", "rhinoceros", "yak", "emu", "lion"]


def write_task(path: Path, n: int = 48) -> Path:
    """Reverse a word: varied lengths, exact answers."""
    rows = [{"instruction": "Reverse", "input": WORDS[i % len(WORDS)], "output": WORDS[i % len(WORDS)][::-1]}
            for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def setup(tmp_path, dropout=0.0, seed=0, **train):
    tok = make_char_tokenizer()
    model = make_llama_for(tok, seed=seed)
    torch.manual_seed(seed)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, dropout=dropout))
    examples, _ = load_dataset(write_task(tmp_path / "task.jsonl"), tok)
    cfg = TrainConfig(**{"output_dir": str(tmp_path / "out"), "log_every": 1, "seed": seed, "seq_len": 96, **train})
    return model, tok, examples, cfg


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulated_window_has_the_gradient_of_one_big_batch(tmp_path):
    model, _, examples, cfg = setup(tmp_path, packing=False)
    rows = examples[:4]  # lengths differ, so per-micro-batch averaging would give another gradient
    assert len({len(r["input_ids"]) for r in rows}) > 1
    trainer = Trainer(model, cfg.replace(batch_size=4), examples)
    trainer._backward_window([trainer._batch(rows)])
    big = grads(model)
    model.zero_grad()
    trainer._backward_window([trainer._batch([r]) for r in rows])
    accumulated = grads(model)
    for n in big:
        torch.testing.assert_close(accumulated[n], big[n], atol=1e-6, rtol=1e-5)
    # the naive mean of per-micro-batch means differs: the test would catch that bug
    model.zero_grad()
    for r in rows:
        batch = trainer._batch([r])
        loss_sum, n_terms = trainer._loss_sum(batch)
        (loss_sum / n_terms / len(rows)).backward()
    naive = grads(model)
    assert any(not torch.allclose(naive[n], big[n], atol=1e-6) for n in big)


def test_accumulation_and_batch_size_give_the_same_training(tmp_path):
    runs = []
    for bs, accum in ((4, 1), (1, 4), (2, 2)):
        model, _, examples, cfg = setup(tmp_path / f"{bs}x{accum}", packing=False, batch_size=bs, grad_accum=accum,
                                        max_steps=3)
        Trainer(model, cfg, examples).train()
        runs.append(lora.adapter_state_dict(model))
    for other in runs[1:]:
        for k in runs[0]:
            torch.testing.assert_close(other[k], runs[0][k], atol=1e-6, rtol=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)
    linear = TrainConfig(warmup_ratio=0.0, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(50, 100, linear) == pytest.approx(0.5)
    assert lr_factor(70, 100, TrainConfig(schedule="constant")) == 1.0


def test_training_lowers_the_loss_and_reports_everything(tmp_path):
    model, tok, examples, cfg = setup(tmp_path, learning_rate=1e-2, batch_size=2, epochs=8, logger="tensorboard")
    trainer = Trainer(model, cfg, examples, eval_data=examples[:8])
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    assert result.eval_loss < 0.7 * before
    assert result.perplexity == pytest.approx(torch.tensor(result.eval_loss).exp().item(), rel=1e-5)
    assert result.steps == trainer.total_steps == 8 * (len(trainer.rows) // 2)
    assert result.tokens_per_second > 0 and result.peak_memory_bytes > 0
    out = tmp_path / "out"
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert list(out.rglob("events.out.tfevents.*"))
    assert len(list((out / "checkpoints").glob("step-*"))) == 1
    assert (Path(result.checkpoint) / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoints_keep_only_the_newest(tmp_path):
    model, _, examples, cfg = setup(tmp_path, max_steps=6, save_every=1, keep_checkpoints=2, batch_size=2)
    Trainer(model, cfg, examples).train()
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["step-0000005", "step-0000006"]


def test_ctrl_c_checkpoints_and_resume_gives_the_same_adapter(tmp_path):
    train = dict(max_steps=8, batch_size=2, learning_rate=5e-3)
    model, _, examples, cfg = setup(tmp_path / "a", dropout=0.1, **train)
    Trainer(model, cfg, examples).train()
    uninterrupted = lora.adapter_state_dict(model)

    def ctrl_c_at_3(trainer, step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    model, _, examples, cfg = setup(tmp_path / "b", dropout=0.1, **train)
    result = Trainer(model, cfg, examples, callbacks=[ctrl_c_at_3]).train()
    assert result.interrupted and result.steps == 3 and result.checkpoint.endswith("step-0000003")

    model, _, examples, cfg = setup(tmp_path / "b", dropout=0.1, resume=True, **train)
    resumed = Trainer(model, cfg, examples)
    result = resumed.train()
    assert result.steps == 8 and not result.interrupted
    for k, v in lora.adapter_state_dict(model).items():
        assert torch.equal(v, uninterrupted[k]), k


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import lora
    from lora.trainer import Trainer
    from test_trainer import setup

    def kill_at_5(trainer, step, metrics):
        if step == 5:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

    model, _, examples, cfg = setup(Path({tmp!r}), dropout=0.1, max_steps=8, batch_size=2, learning_rate=5e-3,
                                    save_every=2)
    Trainer(model, cfg, examples, callbacks=[kill_at_5]).train()
""")


def test_a_killed_run_resumes_to_the_same_adapter(tmp_path):
    train = dict(max_steps=8, batch_size=2, learning_rate=5e-3)
    model, _, examples, cfg = setup(tmp_path / "a", dropout=0.1, **train)
    Trainer(model, cfg, examples).train()
    uninterrupted = lora.adapter_state_dict(model)

    script = KILLED_RUN.format(tests=str(Path(__file__).parent), tmp=str(tmp_path / "b"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "out" / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-0000002", "step-0000004"]

    model, _, examples, cfg = setup(tmp_path / "b", dropout=0.1, resume=True, **train)
    assert Trainer(model, cfg, examples).train().steps == 8
    for k, v in lora.adapter_state_dict(model).items():
        assert torch.equal(v, uninterrupted[k]), k


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model, _, examples, cfg = setup(tmp_path, max_steps=6, save_every=1, batch_size=2)

    def poison_at_2(trainer, step, metrics):
        if step == 2:
            with torch.no_grad():
                model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"loss became nan at step 3.*step-0000002.*resume=True"):
        Trainer(model, cfg, examples, callbacks=[poison_at_2]).train()
    kept = load_file(tmp_path / "out" / "checkpoints" / "step-0000002" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_resume_with_other_settings_is_refused(tmp_path):
    model, _, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2)
    Trainer(model, cfg, examples).train()
    model, _, examples, cfg = setup(tmp_path, max_steps=3, batch_size=2, resume=True)
    with pytest.raises(ValueError, match="was for a run of 2 steps, this one has 3"):
        Trainer(model, cfg, examples).train()


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"learning_rate": 0}, "learning_rate must be > 0"),
    ({"schedule": "step"}, "schedule must be one of"),
    ({"precision": "int8"}, "precision must be one of"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ({"logger": "wandb"}, "logger must be one of"),
])
def test_train_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_model_without_trainable_parameters_is_refused(tmp_path):
    tok = make_char_tokenizer()
    model = make_llama_for(tok)
    for p in model.parameters():
        p.requires_grad_(False)
    examples, _ = load_dataset(write_task(tmp_path / "t.jsonl"), tok)
    with pytest.raises(ValueError, match="no trainable parameters; call lora.inject"):
        Trainer(model, TrainConfig(output_dir=str(tmp_path)), examples)


def test_head_only_at_labelled_positions_equals_the_full_logits_loss(tmp_path):
    import torch.nn.functional as F
    from lora.data import IGNORE, model_inputs

    model, _, examples, cfg = setup(tmp_path, loss_chunk=5)  # several chunks per batch
    trainer = Trainer(model, cfg, examples)
    batch = trainer._batch(trainer.rows[:2])
    chunked, n = trainer._loss_sum(batch)
    logits = model(**model_inputs(batch)).logits
    full = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum")
    assert n == int((batch["targets"] != IGNORE).sum()) > 10
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-5)


def test_public_api_names_from_the_contract():
    for name in ("LoraConfig", "inject", "save_adapter", "load_adapter", "merge", "unmerge", "merge_and_unload",
                 "disabled", "set_active", "adapter_state_dict", "load_model", "generate", "Trainer", "TrainConfig"):
        assert name in lora.__all__ and callable(getattr(lora, name)), name
    result_fields = set(lora.TrainResult.__dataclass_fields__)
    assert {"steps", "train_loss", "eval_loss", "perplexity", "tokens_per_second", "peak_memory_bytes"} <= result_fields


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads_by_setting = []
    for checkpointing in (False, True):
        model, _, examples, cfg = setup(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing)
        trainer = Trainer(model, cfg, examples)
        trainer.loss_module.train()
        trainer._backward_window([trainer._batch(trainer.rows[:2])])
        grads_by_setting.append(grads(model))
    for name, g in grads_by_setting[0].items():
        torch.testing.assert_close(grads_by_setting[1][name], g, atol=1e-6, rtol=1e-5)


def test_generation_exact_match_is_reported_during_and_after_training(tmp_path):
    from lora.generate import exact_match

    model, tok, examples, cfg = setup(tmp_path, learning_rate=1e-2, batch_size=2, epochs=4, eval_every=10)
    prompts = [f"Reverse\n\n{w}" for w in WORDS[:6]]
    answers = [w[::-1] for w in WORDS[:6]]
    trainer = Trainer(model, cfg, examples, exact_match_data=(prompts, answers), tokenizer=tok)
    result = trainer.train()
    longest = max(len(a) for a in answers)  # one token per character
    assert result.exact_match == exact_match(model, tok, prompts, answers, max_new_tokens=longest + 4)[0]
    assert any("exact_match" in h for h in trainer.history)  # also at the eval_every steps
    with pytest.raises(ValueError, match="exact_match_data needs the model's tokenizer"):
        Trainer(model, cfg, examples, exact_match_data=(prompts, answers))
