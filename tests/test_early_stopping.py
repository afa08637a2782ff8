"""Early stopping on a validation slice held out from the training data (issue 10)."""

import pytest
import torch
from safetensors.torch import load_file

import lora
from lora.train.early_stopping import EarlyStopping, split_validation
from lora.train import TrainConfig, Trainer
from test_trainer import setup


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_validation_slice_is_seeded_disjoint_and_sized():
    examples = [{"input_ids": [i]} for i in range(40)]
    train, held = split_validation(examples, 0.1, seed=3)
    assert len(held) == 4 and len(train) == 36
    assert sorted(e["input_ids"][0] for e in train + held) == list(range(40))
    assert split_validation(examples, 0.1, seed=3) == (train, held)
    assert split_validation(examples, 0.1, seed=4)[1] != held
    assert len(split_validation(examples, 7, seed=0)[1]) == 7  # a count
    assert [e["input_ids"][0] for e in train] == sorted(e["input_ids"][0] for e in train)  # file order kept
    assert len(split_validation(examples, 0.001, seed=0)[1]) == 1  # a fraction holds out one example at least
    for bad in (0.999, 40, 100):
        with pytest.raises(ValueError, match="both need at least one"):
            split_validation(examples, bad, seed=0)


def test_patience_counts_evaluations_without_an_improvement_above_min_delta():
    model = torch.nn.Linear(2, 2)
    stop = EarlyStopping(patience=2, min_delta=0.1)
    decisions = [stop.update(step, loss, model) for step, loss in enumerate([1.0, 0.5, 0.45, 0.3, 0.29, 0.28], 1)]
    assert decisions == [False, False, False, False, False, True]
    assert (stop.best_step, stop.best_loss) == (4, 0.3)  # 0.45 and 0.29 were not better by more than 0.1


def test_training_stops_early_and_keeps_the_best_weights(tmp_path):
    # min_delta so large that no evaluation after the first counts as better: best at step 2, stop at step 6
    model, _, examples, cfg = setup(tmp_path, max_steps=20, batch_size=2, learning_rate=5e-3, validation_split=8,
                                    validate_every=2, early_stopping_patience=2, early_stopping_min_delta=100.0)
    seen = {}
    result = Trainer(model, cfg, examples, callbacks=[lambda t, step, m: seen.update({step: trainable(model)})]).train()
    assert result.stopped_early and result.steps == 6 and result.best_step == 2
    assert max(seen) == 6 and not all(torch.equal(seen[6][n], seen[2][n]) for n in seen[2])
    for n, p in trainable(model).items():
        assert torch.equal(p, seen[2][n]), n
    assert result.validation_loss == pytest.approx(Trainer(model, cfg, examples).validation_loss(), rel=1e-5)


def test_the_final_checkpoint_holds_the_kept_weights_when_the_stop_step_was_already_saved(tmp_path):
    model, _, examples, cfg = setup(tmp_path, max_steps=20, batch_size=2, learning_rate=5e-3, validation_split=8,
                                    validate_every=2, early_stopping_patience=2, early_stopping_min_delta=100.0,
                                    save_every=3)  # step 6, where it stops, is saved before the best is put back
    result = Trainer(model, cfg, examples).train()
    assert result.steps == 6 and result.best_step == 2 and result.checkpoint.endswith("step-0000006")
    saved = load_file(f"{result.checkpoint}/adapter/adapter_model.safetensors")
    kept = {k: v.float() for k, v in lora.adapter_state_dict(model).items()}
    assert all(torch.equal(saved[k], kept[k]) for k in kept)


def test_the_validation_slice_is_not_trained_on(tmp_path):
    model, _, examples, cfg = setup(tmp_path, max_steps=1, batch_size=2, validation_split=8, validate_every=1)
    trainer = Trainer(model, cfg, examples)
    assert len(trainer.validation_data) == 8
    # the training rows hold exactly the other examples' tokens
    assert sum(r["real_tokens"] for r in trainer.rows) == \
        sum(len(e["input_ids"]) for e in examples) - sum(len(e["input_ids"]) for e in trainer.validation_data)


def test_a_run_stopped_and_resumed_stops_where_an_uninterrupted_one_does(tmp_path):
    train = dict(max_steps=20, batch_size=2, learning_rate=5e-3, validation_split=8, validate_every=2,
                 early_stopping_patience=2, early_stopping_min_delta=100.0, save_every=1)
    dropout = 0.1
    model, _, examples, cfg = setup(tmp_path / "a", dropout=dropout, **train)
    whole = Trainer(model, cfg, examples).train()
    uninterrupted = lora.adapter_state_dict(model)

    def stop_at_3(trainer, step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    model, _, examples, cfg = setup(tmp_path / "b", dropout=dropout, **train)
    assert Trainer(model, cfg, examples, callbacks=[stop_at_3]).train().steps == 3
    model, _, examples, cfg = setup(tmp_path / "b", dropout=dropout, resume=True, **train)
    resumed = Trainer(model, cfg, examples).train()
    assert (resumed.steps, resumed.best_step, resumed.stopped_early) == (whole.steps, whole.best_step, True)
    for k, v in lora.adapter_state_dict(model).items():
        assert torch.equal(v, uninterrupted[k]), k  # the best weights came back from the checkpoint
    # resuming the finished run trains no further
    model, _, examples, cfg = setup(tmp_path / "b", dropout=dropout, resume=True, **train)
    assert Trainer(model, cfg, examples).train().steps == whole.steps


def test_resuming_a_run_without_validation_with_a_validation_split_is_refused(tmp_path):
    model, _, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2)
    Trainer(model, cfg, examples).train()
    model, _, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2, validation_split=8, validate_every=1,
                                    resume=True)
    with pytest.raises(ValueError, match="without a validation split.*resume=False"):
        Trainer(model, cfg, examples).train()


@pytest.mark.parametrize("kwargs, message", [
    ({"early_stopping_patience": 2}, "needs a validation loss: set validation_split"),
    ({"validation_split": 0.1}, "needs validate_every >= 1"),
    ({"validation_split": -0.1, "validate_every": 1}, "validation_split must be >= 0"),
    ({"validation_split": 2.5, "validate_every": 1}, "validation_split must be >= 0, a fraction below 1 or a whole"),
    ({"early_stopping_min_delta": -1.0}, "early_stopping_min_delta must be >= 0"),
    ({"validate_every": -1}, "validate_every must be an integer >= 0"),
])
def test_early_stopping_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
