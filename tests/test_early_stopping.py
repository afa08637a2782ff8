"""Early stopping on a validation slice held out from the training data (issue 10), judged as the user judges the
run, and a budget fitted to the data (issue 20)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lora
from lora.data import IGNORE, prompts_and_answers
from lora.generate import exact_match
from lora.train.budget import (MIN_VALIDATION, first_stop_step, fitted_grad_accum, total_steps, validation_count,
                               validation_interval)
from lora.train.early_stopping import EarlyStopping, judge_of, split_validation
from lora.train import TrainConfig, Trainer
from test_trainer import setup


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_validation_slice_is_seeded_disjoint_and_sized():
    examples = [{"input_ids": [i]} for i in range(1000)]
    train, held = split_validation(examples, 0.1, seed=3)
    assert len(held) == 100 and len(train) == 900
    assert sorted(e["input_ids"][0] for e in train + held) == list(range(1000))
    assert split_validation(examples, 0.1, seed=3) == (train, held)
    assert split_validation(examples, 0.1, seed=4)[1] != held
    assert len(split_validation(examples, 7, seed=0)[1]) == 7  # a count is taken as it is
    assert [e["input_ids"][0] for e in train] == sorted(e["input_ids"][0] for e in train)  # file order kept
    # a fraction holds out MIN_VALIDATION at least, and nothing where that would be over a fifth of the set
    assert len(split_validation(examples, 0.001, seed=0)[1]) == MIN_VALIDATION
    assert validation_count(1000, 0.3) == 300  # a larger fraction is taken as asked, beyond the floor's ceiling
    assert validation_count(5 * MIN_VALIDATION, 0.02) == MIN_VALIDATION
    assert validation_count(5 * MIN_VALIDATION - 1, 0.02) == 0
    assert split_validation(examples[:60], 0.05, seed=0) == (examples[:60], [])
    for bad in (1000, 2000, 0.9999):  # a count, or a fraction, that leaves nothing to train on
        with pytest.raises(ValueError, match="leaves 0 for training; hold out fewer"):
            split_validation(examples, bad, seed=0)


def test_patience_counts_validations_without_a_relative_fall_of_min_delta():
    model = torch.nn.Linear(2, 2)
    stop = EarlyStopping(patience=2, min_delta=0.1)
    decisions = [stop.update(step, loss, model) for step, loss in enumerate([1.0, 0.5, 0.46, 0.3, 0.28, 0.28], 1)]
    assert decisions == [False, False, False, False, False, True]
    assert (stop.best_step, stop.best_loss) == (4, 0.3)  # 0.46 and 0.28 were not 10% below the best


def test_the_threshold_is_relative_to_the_best_loss():
    # from 0.06 to 0.055 is 8% down: progress at min_delta=0.05, where an absolute 0.01 would have stopped
    stop = EarlyStopping(patience=1, min_delta=0.05)
    model = torch.nn.Linear(2, 2)
    assert [stop.update(s, loss, model) for s, loss in ((2, 0.06), (4, 0.055), (6, 0.0505))] == [False, False, False]
    assert stop.best_step == 6
    assert stop.update(8, 0.049, model)  # 3% down: no progress, and patience 1


def test_a_plateau_stops_and_a_slow_steady_improvement_does_not():
    model = torch.nn.Linear(2, 2)
    plateau = EarlyStopping(patience=2, min_delta=0.02, judge="exact match")
    scores = [(0.9, 10), (0.5, 30), (0.45, 40), (0.45, 40), (0.46, 39), (0.47, 40)]
    assert [plateau.update(2 * i, loss, model, right) for i, (loss, right) in enumerate(scores, 1)] == \
        [False, False, False, False, True, True]
    assert (plateau.best_step, plateau.best_correct) == (6, 40)
    # the loss falls 3% a validation and no more answers come right: that is progress, for 40 validations
    steady = EarlyStopping(patience=1, min_delta=0.02, judge="exact match")
    assert not any(steady.update(s, 0.5 * 0.97 ** s, model, 20) for s in range(40))
    # one more answer right counts even when the loss rose (exact match is what the user measures)
    assert not steady.update(41, 0.9, model, 21) and steady.best_step == 41


def test_no_stop_before_stop_from_however_flat_the_validations():
    model = torch.nn.Linear(2, 2)
    stop = EarlyStopping(patience=1, min_delta=0.02, stop_from=7)
    assert [stop.update(s, 1.0, model) for s in (2, 4, 6, 8)] == [False, False, False, True]
    assert first_stop_step(100, 0.05) == 50 and first_stop_step(10, 0.6) == 6  # half, or once warm-up is over


def judged_by_loss(trainer: Trainer) -> Trainer:
    """The trainer with its early stopping judging by loss alone: with min_delta 0.99 no validation after the first
    is progress, which exact match (one more answer right) would not promise."""
    assert trainer.early_stopping.judge == "exact match"  # what the short answers of the task get by default
    trainer.early_stopping.judge = "loss"
    return trainer


def test_training_stops_early_and_keeps_the_best_weights(tmp_path):
    # min_delta so large that no evaluation after the first counts as better: best at step 2, stop at step 6
    # (12 steps: no stop before half of them, step 6)
    model, _, examples, cfg = setup(tmp_path, max_steps=12, batch_size=2, learning_rate=5e-3, validation_split=8,
                                    validate_every=2, early_stopping_patience=2, early_stopping_min_delta=0.99)
    seen = {}
    result = judged_by_loss(Trainer(model, cfg, examples,
                                    callbacks=[lambda t, step, m: seen.update({step: trainable(model)})])).train()
    assert result.stopped_early and result.steps == 6 and result.best_step == 2
    assert max(seen) == 6 and not all(torch.equal(seen[6][n], seen[2][n]) for n in seen[2])
    for n, p in trainable(model).items():
        assert torch.equal(p, seen[2][n]), n
    assert result.validation_loss == pytest.approx(Trainer(model, cfg, examples).validation_loss(), rel=1e-5)


def test_the_final_checkpoint_holds_the_kept_weights_when_the_stop_step_was_already_saved(tmp_path):
    model, _, examples, cfg = setup(tmp_path, max_steps=12, batch_size=2, learning_rate=5e-3, validation_split=8,
                                    validate_every=2, early_stopping_patience=2, early_stopping_min_delta=0.99,
                                    save_every=3)  # step 6, where it stops, is saved before the best is put back
    result = judged_by_loss(Trainer(model, cfg, examples)).train()
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
    # the budget's own choices too: the steps from min_steps, validations every 20 / 12 -> 2 steps
    train = dict(min_steps=20, batch_size=2, learning_rate=5e-3, validation_split=8, validate_every=0,
                 early_stopping_patience=2, early_stopping_min_delta=0.99, save_every=1)
    dropout = 0.1
    model, _, examples, cfg = setup(tmp_path / "a", dropout=dropout, **train)
    trainer = judged_by_loss(Trainer(model, cfg, examples))
    assert (trainer.total_steps, trainer.validate_every, trainer.early_stopping.stop_from) == (20, 2, 10)
    whole = trainer.train()
    assert whole.stopped_early and whole.steps < 20
    uninterrupted = lora.adapter_state_dict(model)

    def stop_at_3(trainer, step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    model, _, examples, cfg = setup(tmp_path / "b", dropout=dropout, **train)
    assert judged_by_loss(Trainer(model, cfg, examples, callbacks=[stop_at_3])).train().steps == 3
    model, _, examples, cfg = setup(tmp_path / "b", dropout=dropout, resume=True, **train)
    resumed = judged_by_loss(Trainer(model, cfg, examples)).train()
    assert (resumed.steps, resumed.best_step, resumed.stopped_early) == (whole.steps, whole.best_step, True)
    for k, v in lora.adapter_state_dict(model).items():
        assert torch.equal(v, uninterrupted[k]), k  # the best weights came back from the checkpoint
    # resuming the finished run trains no further
    model, _, examples, cfg = setup(tmp_path / "b", dropout=dropout, resume=True, **train)
    assert judged_by_loss(Trainer(model, cfg, examples)).train().steps == whole.steps


def test_resuming_a_run_without_validation_with_a_validation_split_is_refused(tmp_path):
    model, _, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2)
    Trainer(model, cfg, examples).train()
    model, _, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2, validation_split=8, validate_every=1,
                                    resume=True)
    with pytest.raises(ValueError, match="without a validation split.*resume=False"):
        Trainer(model, cfg, examples).train()


def test_the_exact_match_judge_keeps_the_step_with_the_most_answers_right(tmp_path):
    # no stop (patience 0), a validation every 10 steps: the weights kept at the end are those of the validation
    # with the most answers right (ties: the lower loss), and the result reports its share of the slice
    model, _, examples, cfg = setup(tmp_path, max_steps=60, batch_size=4, learning_rate=2e-2, validation_split=16,
                                    validate_every=10)
    seen, weights = {}, {}

    def record(trainer, step, metrics):
        weights[step] = trainable(model)
        if "validation_correct" in metrics:
            seen[step] = (metrics["validation_correct"], -metrics["validation_loss"])

    trainer = Trainer(model, cfg, examples, callbacks=[record])
    assert trainer.early_stopping.judge == "exact match"
    result = trainer.train()
    assert sorted(seen) == list(range(10, 61, 10)) and not result.stopped_early
    best = max(seen, key=lambda step: (seen[step], -step))
    assert len({correct for correct, _ in seen.values()}) > 1  # the validations differ, or nothing is shown
    assert result.best_step == best
    assert result.validation_exact_match == seen[best][0] / 16
    assert all(torch.equal(p, weights[best][n]) for n, p in trainable(model).items())


def test_validation_split_0_alone_turns_the_recipes_early_stopping_off():
    from lora.recipe import parse_settings
    from lora.recipes.sft import SFT

    assert parse_settings(SFT, [])[2].early_stopping_patience == 2  # the recipe's default
    assert parse_settings(SFT, ["validation_split=0"])[2].early_stopping_patience == 0
    with pytest.raises(ValueError, match="needs a validation slice: .*or early_stopping_patience=0"):
        parse_settings(SFT, ["validation_split=0", "early_stopping_patience=2"])


def test_resuming_under_another_validation_slice_is_refused_before_anything_loads(tmp_path):
    model, _, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2, validation_split=8, validate_every=1)
    Trainer(model, cfg, examples).train()
    # another count is refused by the slice's size, a vanished slice as a run without one
    for split, message in ((10, "held out 8 examples judged by exact match, this run 10"),
                           (0, "written with a validation split, and this run has none")):
        model, _, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2, validation_split=split,
                                        validate_every=1, resume=True)
        before = trainable(model)
        with pytest.raises(ValueError, match=message):
            Trainer(model, cfg, examples).train()
        assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())  # nothing was loaded
    # a checkpoint from before the slice's size and judge were saved: refused in words, not as "held out None"
    state_file = next((tmp_path / "out" / "checkpoints").glob("step-*")) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["early_stopping"]["held_out"], state["early_stopping"]["judge"]
    state_file.write_text(json.dumps(state))
    model, _, examples, cfg = setup(tmp_path, max_steps=2, batch_size=2, validation_split=8, validate_every=1,
                                    resume=True)
    with pytest.raises(ValueError, match="written by an older version of lora.*resume=False"):
        Trainer(model, cfg, examples).train()


@pytest.mark.parametrize("kwargs, message", [
    ({"early_stopping_patience": 2}, "needs a validation slice: set validation_split"),
    ({"early_stopping_min_delta": 1.0}, "early_stopping_min_delta must be in \\[0, 1\\)"),
    ({"min_steps": -1}, "min_steps must be an integer >= 0"),
    ({"validation_split": -0.1, "validate_every": 1}, "validation_split must be >= 0"),
    ({"validation_split": 2.5, "validate_every": 1}, "validation_split must be >= 0, a fraction below 1 or a whole"),
    ({"early_stopping_min_delta": -1.0}, "early_stopping_min_delta must be in"),
    ({"validate_every": -1}, "validate_every must be an integer >= 0"),
])
def test_early_stopping_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_validation_exact_match_is_what_greedy_decoding_answers(tmp_path):
    # trained until some answers come out right and some not: the one-forward judge must count the same ones as
    # generating each answer greedily, in packed rows (several examples per row) as in padded ones
    model, tok, examples, cfg = setup(tmp_path, max_steps=60, batch_size=4, learning_rate=2e-2, validation_split=16,
                                      validate_every=60)
    trainer = Trainer(model, cfg, examples)
    trainer.train()
    prompts, answers = prompts_and_answers(tmp_path / "task.jsonl")
    index = {tuple(e["input_ids"]): i for i, e in enumerate(examples)}
    rows = [index[tuple(e["input_ids"])] for e in trainer.validation_data]
    greedy, _ = exact_match(model, tok, [prompts[i] for i in rows], [answers[i] for i in rows])
    assert 0 < greedy < 1  # a mix of right and wrong answers, or the test shows nothing
    packed = trainer.validation_scores()
    assert trainer.packing and packed["validation_exact_match"] == greedy
    trainer.packing = False
    assert trainer.validation_scores()["validation_exact_match"] == greedy
    assert packed["validation_loss"] == pytest.approx(trainer.validation_loss(), rel=1e-4)


def test_short_answers_are_judged_by_exact_match_long_ones_by_loss():
    short = [{"input_ids": [1] * 20, "targets": [IGNORE] * 10 + [5] * 10}]
    long = [{"input_ids": [1] * 200, "targets": [IGNORE] * 10 + [5] * 190}]
    multi_turn = [{"input_ids": [1] * 200, "targets": [IGNORE] * 10 + [5] * 150 + [IGNORE] * 30 + [5] * 10}]
    assert judge_of("lm", short) == "exact match" and judge_of("lm", long) == "loss"
    assert judge_of("lm", multi_turn) == "exact match"  # the last answer is what exact match scores
    assert judge_of("classification", short) == "loss"


def test_a_small_set_gets_its_minimum_steps_and_no_validation_slice(tmp_path, capsys):
    # 48 examples in 96-token rows, 4 x 2 rows a step: one epoch is 3 steps. min_steps=12 first makes the steps
    # smaller (grad_accum 2 -> 1: 6 steps an epoch, no extra work), then takes 2 passes
    model, _, examples, cfg = setup(tmp_path, batch_size=4, grad_accum=2, min_steps=12, validation_split=0.05,
                                    early_stopping_patience=2)
    trainer = Trainer(model, cfg, examples)
    assert (trainer.cfg.grad_accum, trainer.plan.steps_per_epoch, trainer.total_steps) == (1, 6, 12)
    assert trainer.validation_data == [] and trainer.early_stopping is None  # 48 cannot spare MIN_VALIDATION
    result = trainer.train()
    assert result.steps == 12 and not result.stopped_early
    out = capsys.readouterr().out
    assert "plan: 48 training examples, 12 optimizer steps of up to 4 rows (2 epochs of 6 steps); grad_accum 2 -> 1" \
        in out
    assert "no validation slice: 48 examples cannot spare 48" in out
    # max_steps still wins, and neither the steps nor the passes change without min_steps
    model, _, examples, cfg = setup(tmp_path / "b", batch_size=4, grad_accum=2, min_steps=12, max_steps=3)
    trainer = Trainer(model, cfg, examples)
    assert (trainer.total_steps, trainer.cfg.grad_accum) == (3, 2)
    assert total_steps(40, 1.0, None, 12) == 40 and total_steps(2, 1.0, None, 12) == 12
    # 88 rows of 2 x 4: 11 steps; grad_accum 2 gives 22 >= 16. 300 rows already have 38; 7 rows get 1
    assert [fitted_grad_accum(rows, 2, 4, 1, 1.0, None, 16) for rows in (88, 300, 7)] == [2, 4, 1]
    assert fitted_grad_accum(88, 2, 4, 1, 1.0, None, 0) == 4 and fitted_grad_accum(88, 2, 4, 1, 1.0, 5, 16) == 4
    assert validation_interval(120, 0) == 10 and validation_interval(5, 0) == 1 and validation_interval(120, 3) == 3
