"""DPO through the Trainer (issue 12): the reference is the same model with its adapters off, the loss is DPO's."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import lora
from lora.data import load_dataset
from lora.data import load_preferences
from lora.train import TrainConfig, Trainer
from conftest import make_char_tokenizer, make_llama_for, randomize_adapters


def pairs_file(path):
    rows = [{"prompt": f"Say {w}", "chosen": w, "rejected": w[::-1] + "x"} for w in ("cat", "horse", "emu", "ox")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def setup(tmp_path, **train):
    tok = make_char_tokenizer()
    model = make_llama_for(tok)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    pairs, _ = load_preferences(pairs_file(tmp_path / "p.jsonl"), tok)
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), batch_size=4, **train)
    return model, pairs, Trainer(model, cfg, pairs, eval_data=pairs)


def manual_logps(model, example):
    ids = torch.tensor([example["input_ids"]])
    targets = torch.tensor(example["targets"])
    logps = model(ids).logits[0].log_softmax(-1)  # (T, vocab)
    keep = targets != -100
    return float(logps[keep].gather(1, targets[keep][:, None]).sum())


def test_policy_and_reference_logps_are_the_model_with_and_without_its_adapters(tmp_path):
    model, pairs, trainer = setup(tmp_path)
    randomize_adapters(model, std=0.3)
    batch = trainer.batches.make(pairs[:2])
    policy, reference = trainer.objective.pair_logps(batch)
    examples = [p["chosen"] for p in pairs[:2]] + [p["rejected"] for p in pairs[:2]]
    for i, example in enumerate(examples):
        assert float(policy[i]) == pytest.approx(manual_logps(model, example), abs=1e-4)
        with lora.disabled(model):
            assert float(reference[i]) == pytest.approx(manual_logps(model, example), abs=1e-4)
    assert not torch.allclose(policy, reference)  # the adapter really acts
    # one model: the objective holds no second copy of the weights for the reference
    assert sum(p.numel() for p in trainer.objective.parameters()) == sum(p.numel() for p in model.parameters())


def test_loss_starts_at_log_2_and_training_separates_the_pairs(tmp_path):
    model, pairs, trainer = setup(tmp_path, max_steps=15, learning_rate=1e-2, dpo_beta=0.5)
    batch = trainer.batches.make(pairs)
    loss_sum, n = trainer._loss_sum(batch)
    assert n == 4 and float(loss_sum) / n == pytest.approx(math.log(2), abs=1e-6)  # fresh B = 0: policy == reference
    before = trainer.evaluate()
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    trainer.train()
    after = trainer.evaluate()
    assert after["preference_accuracy"] == 1.0 and after["reward_margin"] > before["reward_margin"]
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    policy, reference = trainer.objective.pair_logps(batch)
    beta = 0.5
    expected = -F.logsigmoid(beta * ((policy[:4] - reference[:4]) - (policy[4:] - reference[4:]))).mean()
    assert after["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_dpo_with_trained_base_biases_is_refused_as_its_reference_would_drift(tmp_path):
    tok = make_char_tokenizer()
    model = make_llama_for(tok)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, bias="all"))
    pairs, _ = load_preferences(pairs_file(tmp_path / "p.jsonl"), tok)
    with pytest.raises(ValueError, match=r"DPO compares against the base model.*bias='all'.*bias='none'"):
        Trainer(model, TrainConfig(output_dir=str(tmp_path / "out"), batch_size=4), pairs)


def test_bad_preference_files_are_refused_with_the_line(tmp_path):
    tok = make_char_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'prompt', 'chosen' and 'rejected' must be strings for the "
                                         r"'preference' format"):
        load_preferences(bad, tok)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(ValueError, match=r"holds preference pairs .* recipes/dpo.py"):
        load_dataset(good, tok)
    with pytest.raises(ValueError, match="does not exist"):
        load_preferences(tmp_path / "missing.jsonl", tok)
