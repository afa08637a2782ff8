"""The Trainer: accumulation equivalence, exact resume (Ctrl-C and a killed process), non-finite stop, learning."""

import dataclasses
import json
import math
import os
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
from lora.train import TrainConfig, Trainer, lr_factor
from conftest import make_llama_for, make_char_tokenizer

WORDS = ["cat", "horse", "a", "elephant", "dog", "ox", "giraffe", "bee", "rhinoceros", "yak", "emu", "lion"]


def write_task(path: Path, n: int = 48) -> Path:
    """Reverse a word: varied lengths, exact answers."""
    rows = [{"instruction": "Reverse", "input": WORDS[i % len(WORDS)], "output": WORDS[i % len(WORDS)][::-1]}
            for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    # renamed into place: processes of one run write it at once, and none may read it half-written
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
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
    trainer._backward_window([trainer.batches.make(rows)])
    big = grads(model)
    model.zero_grad()
    trainer._backward_window([trainer.batches.make([r]) for r in rows])
    accumulated = grads(model)
    for n in big:
        torch.testing.assert_close(accumulated[n], big[n], atol=1e-6, rtol=1e-5)
    # the naive mean of per-micro-batch means differs: the test would catch that bug
    model.zero_grad()
    for r in rows:
        batch = trainer.batches.make([r])
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


def test_packed_rows_of_a_micro_batch_run_as_one_row_without_their_padding_tails(tmp_path):
    model, _, examples, cfg = setup(tmp_path, batch_size=2)
    trainer = Trainer(model, cfg, examples)
    assert trainer.batches.joins_rows  # the tiny Llama runs SDPA, so attention goes per example
    rows = [r for r in trainer.rows if r["real_tokens"] < cfg.seq_len][:2]  # rows that end in a padding tail
    assert len(rows) == 2
    joined = trainer.batches.make(rows, packed=True)
    assert joined["input_ids"].shape == (1, sum(r["real_tokens"] for r in rows))
    assert "attention_mask" not in joined
    results = []
    for batch in (joined, trainer.batches.make(rows)):  # the rows as they are, tails included
        loss, terms, tokens = trainer._backward_window([batch])
        results.append((loss, terms, tokens, grads(model)))
        model.zero_grad()
    (loss, terms, tokens, joined_grads), (loss_rows, terms_rows, tokens_rows, row_grads) = results
    assert (terms, tokens) == (terms_rows, tokens_rows)
    assert loss == pytest.approx(loss_rows, rel=1e-6)
    for n in row_grads:
        torch.testing.assert_close(joined_grads[n], row_grads[n], atol=1e-6, rtol=1e-5)


def test_an_epoch_trains_on_every_row_the_last_step_taking_the_rows_left_over(tmp_path):
    model, _, examples, cfg = setup(tmp_path, packing=False, batch_size=2, grad_accum=4)  # 8 rows a step
    trainer = Trainer(model, cfg, examples[:15])
    assert trainer.total_steps == 2
    seen = [row for step in range(2) for batch in trainer.plan.step_rows(step) for row in batch]
    assert sorted(id(r) for r in seen) == sorted(id(r) for r in trainer.rows)  # each of the 15 rows once
    last = trainer.plan.window(1)
    assert len(last) == 4 and not any("padding" in b for b in last)  # 7 rows: 4 micro-batches, none idle
    assert trainer.train().steps == 2


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


def test_a_fresh_run_in_an_earlier_runs_output_dir_keeps_only_its_own_checkpoints(tmp_path, capsys):
    model, _, examples, cfg = setup(tmp_path, max_steps=6, save_every=2, keep_checkpoints=2, batch_size=2)
    Trainer(model, cfg, examples).train()
    model, _, examples, cfg = setup(tmp_path, seed=1, max_steps=3, save_every=2, keep_checkpoints=2, batch_size=2)
    result = Trainer(model, cfg, examples).train()
    assert "held an earlier run's checkpoints (step-0000004, step-0000006): moved to" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    aside = tmp_path / "out" / "checkpoints.earlier"  # not deleted: a re-run that forgot resume=True loses nothing
    assert sorted(p.name for p in aside.iterdir()) == ["step-0000004", "step-0000006"]
    saved = load_file(Path(result.checkpoint) / "adapter" / "adapter_model.safetensors")
    mine = {k: v.float() for k, v in lora.adapter_state_dict(model).items()}
    assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in saved)


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
    from lora.train import Trainer
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
    # other data, the same number of steps: each step would see other rows
    model, _, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2, resume=True)
    with pytest.raises(ValueError, match="run of 12 steps per epoch, this one has 6, so its steps would see other rows"):
        Trainer(model, cfg, examples[:24]).train()
    # settings the saved optimizer groups would have kept silently (weight_decay), or that change the data order
    model, _, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2, resume=True, weight_decay=0.5, seed=5)
    before = {k: v.clone() for k, v in lora.adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"step-0000002 was written with seed=0, weight_decay=0.0; this run has "
                                         r"seed=5, weight_decay=0.5. Resume with the checkpoint's settings"):
        Trainer(model, cfg, examples).train()
    assert all(torch.equal(v, before[k]) for k, v in lora.adapter_state_dict(model).items())


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"learning_rate": 0}, "learning_rate must be > 0"),
    ({"schedule": "step"}, "schedule must be one of"),
    ({"precision": "int8"}, "precision must be one of"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ({"logger": "comet"}, "logger must be one of"),  # wandb and mlflow are loggers now
    # non-finite numbers and YAML values of the wrong type: our ValueError, never TypeError/OverflowError (fuzzer)
    ({"epochs": float("inf")}, r"epochs must be > 0 \(a finite number\), got inf"),
    ({"learning_rate": float("nan")}, r"learning_rate must be > 0 \(a finite number\), got nan"),
    ({"weight_decay": None}, r"weight_decay must be >= 0 \(a finite number\), got None"),
    ({"weight_decay": "0.1"}, r"weight_decay must be >= 0 \(a finite number\), got '0.1'"),
    ({"max_grad_norm": float("inf")}, r"max_grad_norm must be None or > 0 \(a finite number\), got inf"),
    ({"warmup_ratio": None}, r"warmup_ratio must be in \[0, 1\) \(a finite number\), got None"),
    ({"batch_size": 2.0}, "batch_size must be an integer >= 1"),
    ({"packing": "yes"}, "packing must be true or false"),
])
def test_train_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("where", ["notes.txt", "notes.txt/run/deeper"])
def test_output_dir_that_is_or_lies_under_a_file_is_refused_before_training(tmp_path, where):
    (tmp_path / "notes.txt").write_text("the user's notes")
    model, _, examples, cfg = setup(tmp_path)
    with pytest.raises(ValueError, match=r"notes\.txt is a file; pass an output_dir that is a folder"):
        Trainer(model, cfg.replace(output_dir=str(tmp_path / where)), examples)
    assert (tmp_path / "notes.txt").read_text() == "the user's notes"


@pytest.mark.parametrize("packing", [True, False])
def test_examples_longer_than_seq_len_are_refused_packed_or_padded(tmp_path, packing):
    model, _, examples, cfg = setup(tmp_path, packing=packing, seq_len=32)
    longest = max(len(e["input_ids"]) for e in examples)
    over = sum(len(e["input_ids"]) > 32 for e in examples)
    with pytest.raises(ValueError, match=rf"{over} training example\(s\) are longer than seq_len=32 tokens \(the "
                                         rf"longest: {longest}\); load the data with max_length=seq_len"):
        Trainer(model, cfg, examples)


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
    batch = trainer.batches.make(trainer.rows[:2])
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
        trainer._backward_window([trainer.batches.make(trainer.rows[:2])])
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


def counting_examples(n: int = 32, vocab: int = 64) -> list[dict]:
    """Sequences that count upwards modulo ``vocab``, of lengths 8 to 15 (so rows are padded)."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(n):
        start, length = int(torch.randint(0, vocab, (1,), generator=g)), 8 + i % 8
        ids = [(start + t) % vocab for t in range(length)]
        examples.append({"input_ids": ids, "targets": ids[1:] + [-100]})
    return examples


def test_a_hand_written_gpt_trains_through_the_trainer(tmp_path, capsys):
    from tiny_gpt import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(vocab=64, dim=32, n_layers=2, block_size=32)  # forward(idx): no input_ids=, no position_ids
    lora.inject(model, lora.LoraConfig(r=8, alpha=16))
    examples = counting_examples()
    cfg = TrainConfig(output_dir=str(tmp_path), seq_len=32, batch_size=8, epochs=10, learning_rate=1e-2,
                      warmup_ratio=0.0, schedule="constant")
    trainer = Trainer(model, cfg, examples, eval_data=examples[:8])
    notice = [line for line in capsys.readouterr().out.splitlines() if "packing off" in line]
    assert len(notice) == 1 and "TinyGPT.forward takes no position_ids" in notice[0]
    assert trainer.rows is examples  # padded rows, one example each
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    assert result.eval_loss < 0.7 * before, (before, result.eval_loss)
    assert all(v.abs().sum() > 0 for k, v in lora.adapter_state_dict(model).items() if "lora_B" in k)


def test_a_hand_written_gpt_that_only_embeds_position_ids_is_not_packed(tmp_path, capsys):
    """Taking position_ids is not enough: this model adds them to its embeddings but attends causally across the
    whole row, so packed examples would see each other. The packing probe finds that and trains on padded rows."""
    from tiny_gpt import TinyGPT

    class PositionedGPT(TinyGPT):
        def forward(self, idx, position_ids=None):
            self.seen_positions = position_ids
            x = self.tok(idx) + self.pos(position_ids)  # (B, T, C)
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    torch.manual_seed(0)
    model = PositionedGPT(vocab=64, dim=32, n_layers=1, block_size=32)
    lora.inject(model, lora.LoraConfig(r=4))
    examples = counting_examples()
    trainer = Trainer(model, TrainConfig(output_dir=str(tmp_path), seq_len=32, batch_size=2), examples)
    notice = [line for line in capsys.readouterr().out.splitlines() if "packing off" in line]
    assert len(notice) == 1 and "PositionedGPT does not keep packed examples apart" in notice[0]
    assert trainer.rows is examples
    batch = trainer.batches.make(trainer.rows[:2])
    loss, n = trainer._loss_sum(batch)
    assert torch.isfinite(loss) and n > 0
    assert torch.equal(model.seen_positions, batch["position_ids"])  # positions still reach the model


def assert_stopped_and_resumed_run_is_exact(tmp_path, before_first_run=None, **train):
    """A run stopped at step 2 and resumed ends with the adapter of an uninterrupted run, bit for bit.

    ``before_first_run(trainer)`` may alter the stopped run's trainer first.
    """
    model, _, examples, cfg = setup(tmp_path / "a", **train)
    Trainer(model, cfg, examples).train()
    uninterrupted = lora.adapter_state_dict(model)

    def stop_at_2(trainer, step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    model, _, examples, cfg = setup(tmp_path / "b", **train)
    trainer = Trainer(model, cfg, examples, callbacks=[stop_at_2])
    if before_first_run is not None:
        before_first_run(trainer)
    assert trainer.train().steps == 2
    model, _, examples, cfg = setup(tmp_path / "b", resume=True, **train)
    assert Trainer(model, cfg, examples).train().steps == train["max_steps"]
    for k, v in lora.adapter_state_dict(model).items():
        assert torch.equal(v, uninterrupted[k]), k


def test_optimizer_state_is_matched_by_parameter_name_on_resume(tmp_path):
    def reverse_the_optimizer_order(trainer):  # no longer the model's order; the resumed run has the model's own
        trainer.optimizer.param_groups[0]["params"].reverse()

    assert_stopped_and_resumed_run_is_exact(tmp_path, reverse_the_optimizer_order, max_steps=4, batch_size=2,
                                            learning_rate=5e-3)


def test_a_checkpoint_with_optimizer_state_for_other_parameters_is_refused(tmp_path):
    from safetensors.torch import save_file

    model, _, examples, cfg = setup(tmp_path, max_steps=1, batch_size=2)
    Trainer(model, cfg, examples).train()
    state_file = tmp_path / "out" / "checkpoints" / "step-0000001" / "state.safetensors"
    tensors = load_file(state_file)
    renamed = {k.replace("layers.1.mlp.down_proj", "layers.1.mlp.up_proj_old"): v for k, v in tensors.items()}
    assert renamed != tensors
    save_file(renamed, str(state_file))
    model, _, examples, cfg = setup(tmp_path, max_steps=1, batch_size=2, resume=True)
    with pytest.raises(ValueError, match=r"step-0000001 holds optimizer state for other parameters .*up_proj_old"
                                         r".*resume=False"):
        Trainer(model, cfg, examples).train()


def test_resuming_with_another_rank_is_refused_before_anything_is_loaded(tmp_path):
    model, tok, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2)  # r=4
    Trainer(model, cfg, examples).train()
    other = make_llama_for(tok)
    lora.inject(other, lora.LoraConfig(r=8, alpha=8))
    before = {k: v.clone() for k, v in lora.adapter_state_dict(other).items()}
    with pytest.raises(ValueError, match=r"lora_A.* is \(8, 32\) here, \(4, 32\) in the checkpoint, and \d+ more\)"
                                         r": another r"):
        Trainer(other, cfg.replace(resume=True), examples).train()
    assert all(torch.equal(v, before[k]) for k, v in lora.adapter_state_dict(other).items())


@pytest.fixture
def other_precision():
    """accelerate fixes mixed precision once per process: let a test choose another, and put it back after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_trainable_parameters_of_a_bf16_model_are_kept_and_updated_in_fp32(tmp_path, other_precision):
    from conftest import make_gpt2

    model = make_gpt2().to(torch.bfloat16)  # GPT-2: biases in Conv1D and LayerNorm layers
    lora.inject(model, lora.LoraConfig(r=2, bias="all"))
    bias = model.transformer.h[0].attn.c_attn.base_layer.bias
    with torch.no_grad():
        bias.fill_(1.0)  # bf16 holds 1.0 exactly, and nothing within 1/256 of it
    examples = counting_examples(n=4)
    cfg = TrainConfig(output_dir=str(tmp_path), precision="bf16", max_steps=1, batch_size=4, seq_len=32,
                      learning_rate=1e-4, warmup_ratio=0.0, weight_decay=0.0)
    trainer = Trainer(model, cfg, examples)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p is bias for p in trainable) and all(p.dtype == torch.float32 for p in trainable)
    trainer.train()
    moved = bias.detach() != 1.0
    assert moved.float().mean() > 0.9  # AdamW's first step moves each entry by about lr
    assert (bias.detach() - 1.0).abs().max() <= 1.01e-4
    assert bool((bias.detach().to(torch.bfloat16) == 1.0).all())  # bf16 storage would have kept none of it


def test_half_precision_trainable_parameters_without_autocast_are_refused(tmp_path):
    from conftest import make_gpt2

    model = make_gpt2().to(torch.bfloat16)
    lora.inject(model, lora.LoraConfig(r=2, bias="all"))
    with pytest.raises(ValueError, match=r"are torch.bfloat16, and precision='fp32' trains without autocast.*"
                                         r"set precision='bf16'"):
        Trainer(model, TrainConfig(output_dir=str(tmp_path), precision="fp32"), counting_examples(n=4))


def test_exact_match_generates_exact_match_max_new_tokens(tmp_path):
    from lora.generate import exact_match

    model, tok, examples, cfg = setup(tmp_path)
    prompts = [f"Reverse\n\n{w}" for w in WORDS[:6]]
    _, three_tokens = exact_match(model, tok, prompts, ["?"] * len(prompts), max_new_tokens=3)
    # the model's own 3-token answers: right only when generation stops after 3 tokens
    default = Trainer(model, cfg, examples, exact_match_data=(prompts, three_tokens), tokenizer=tok)
    assert default.evaluate()["exact_match"] < 1.0
    limited = Trainer(model, cfg, examples, exact_match_data=(prompts, three_tokens), tokenizer=tok,
                      exact_match_max_new_tokens=3)
    assert limited.evaluate()["exact_match"] == 1.0


def test_checkpoints_save_rotate_and_load_without_a_trainer(tmp_path):
    from lora.train.checkpoint import Checkpoints, RunShape, gather_rng, optimizer_state, rng_state

    class OneProcess:
        num_processes = 1

    def model_and_optimizer(seed):
        model, _, examples, _ = setup(tmp_path / f"m{seed}", seed=seed)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-2)

    model, optimizer = model_and_optimizer(0)
    store, shape = Checkpoints(tmp_path / "checkpoints", keep=2), RunShape(10, 1, 2, 1)
    for step in (1, 2, 3):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, 0.1 * step)
        optimizer.step()
        rng = rng_state()
        names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        store.save(step, model, optimizer_state(optimizer, names), "default", rng, gather_rng(OneProcess(), rng),
                   {"total_steps": 10, "shape": dataclasses.asdict(shape), "history": [{"step": step}]})
        expected_draw = torch.rand(3)  # the next draw after the saved state
    assert [p.name for p in store.all()] == ["step-0000002", "step-0000003"] and store.latest().name == "step-0000003"

    other, other_optimizer = model_and_optimizer(1)  # other weights, empty optimizer state
    state = Checkpoints.load(store.latest(), other, other_optimizer, shape, process_index=0)
    assert state["step"] == 3 and state["history"] == [{"step": 3}]
    assert torch.equal(torch.rand(3), expected_draw)
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        if p.requires_grad:  # the base stays the model's own
            assert torch.equal(p, q), name
    saved, loaded = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)
    with pytest.raises(ValueError, match=r"taking 2 rows per optimizer step .* this one takes 4 rows"):
        Checkpoints.load(store.latest(), other, other_optimizer, RunShape(10, 2, 2, 1), process_index=0)
    # DeepSpeed's engine keeps the optimizer state to itself: such a checkpoint holds none and cannot resume exactly
    rng = rng_state()
    store.save(4, model, None, "default", rng, gather_rng(OneProcess(), rng),
               {"total_steps": 10, "shape": dataclasses.asdict(shape), "history": []})
    with pytest.raises(ValueError, match=r"step-0000004 was written under DeepSpeed, .* holds none, so it cannot "
                                         r"resume exactly; its adapter is in .*step-0000004/adapter"):
        Checkpoints.load(store.latest(), other, other_optimizer, shape, process_index=0)


def test_evaluate_without_a_trainer_is_the_mean_token_loss_in_eval_mode(tmp_path):
    import torch.nn.functional as F
    from lora.data import IGNORE, collate, model_inputs
    from lora.train.evaluate import evaluate
    from lora.train.objective import BatchLoss

    model, _, examples, _ = setup(tmp_path, dropout=0.5)  # dropout: eval mode must switch it off
    objective = BatchLoss(model, "lm", loss_chunk=7)
    batches = [collate(examples[:3], 0), collate(examples[3:5], 0)]
    model.train()
    metrics = evaluate(objective, batches)
    assert model.training  # put back
    model.eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(model(**model_inputs(b)).logits.flatten(0, 1), b["targets"].flatten(),
                                    ignore_index=IGNORE, reduction="sum") for b in batches)
    count = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
    assert metrics["eval_loss"] == pytest.approx(float(total) / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)
    assert evaluate(objective, []) == {}
