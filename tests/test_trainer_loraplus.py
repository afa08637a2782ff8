"""LoRA+ (issue 12): B matrices learn at loraplus_lr_ratio x the learning rate; 1.0 is plain LoRA."""

import pytest
import torch

import lora
from lora.train import TrainConfig, Trainer
from test_trainer import assert_stopped_and_resumed_run_is_exact, setup


def one_step(tmp_path, ratio):
    model, _, examples, cfg = setup(tmp_path, max_steps=1, batch_size=2, warmup_ratio=0.0, learning_rate=1e-3,
                                    loraplus_lr_ratio=ratio)
    Trainer(model, cfg, examples).train()
    return lora.adapter_state_dict(model)


def test_b_moves_ratio_times_as_far_and_a_is_unchanged(tmp_path):
    plain, plus = one_step(tmp_path / "plain", 1.0), one_step(tmp_path / "plus", 16.0)
    b_keys = [k for k in plain if ".lora_B." in k]
    a_keys = [k for k in plain if ".lora_A." in k]
    assert b_keys and a_keys
    for k in b_keys:  # B starts at zero and Adam's first step is lr * sign-like: exactly proportional to the lr
        assert plain[k].abs().max() > 0
        torch.testing.assert_close(plus[k], 16.0 * plain[k], atol=1e-7, rtol=1e-5)
    for k in a_keys:  # with B = 0 the first step gives A no gradient, whatever the ratio
        assert torch.equal(plus[k], plain[k])


def test_ratio_one_is_plain_lora(tmp_path):
    runs = []
    for groups in ("two", "one"):
        model, _, examples, cfg = setup(tmp_path / groups, max_steps=3, batch_size=2)
        trainer = Trainer(model, cfg, examples)
        assert [g["lr_ratio"] for g in trainer.optimizer.param_groups] == [1.0, 1.0]
        if groups == "one":  # what the trainer built before LoRA+: one group of every trainable parameter
            params = [p for p in model.parameters() if p.requires_grad]
            trainer.optimizer = trainer.accelerator.prepare(
                torch.optim.AdamW([{"params": params, "lr_ratio": 1.0}], lr=cfg.learning_rate))
        trainer.train()
        runs.append(lora.adapter_state_dict(model))
    for k, v in runs[0].items():  # equal up to float rounding (AdamW's foreach kernels batch groups differently)
        torch.testing.assert_close(v, runs[1][k], atol=1e-5, rtol=1e-4)


def test_resume_keeps_the_b_learning_rate(tmp_path):
    assert_stopped_and_resumed_run_is_exact(tmp_path, max_steps=4, batch_size=2, loraplus_lr_ratio=8.0)
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0"):
        TrainConfig(loraplus_lr_ratio=0)
