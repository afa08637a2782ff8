"""Crash safety in CI: 3 ``kill -9``\\ s of a training run (inside a step, halfway through a checkpoint file, at a
random time) and one Ctrl-C through ``recipes/sft.py``; after each, ``resume=True`` loads only a complete checkpoint
and ends with the adapter of an uninterrupted run, bit for bit. The runner is crash_runner.py; bench/crash_safety.py
runs it with 20 kills and more."""

import random

import pytest

import crash_runner

CI_KILLS = 3
SEED = 9


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    adapter, train_seconds = crash_runner.reference_run(out)
    return adapter, train_seconds, out


@pytest.mark.parametrize("index", range(CI_KILLS))
def test_a_killed_run_resumes_to_the_uninterrupted_adapter(index, reference, tmp_path):
    adapter, train_seconds, _ = reference
    kill = crash_runner.plan_kills(CI_KILLS, SEED, train_seconds)[index]
    outcome = crash_runner.kill_and_resume(tmp_path, [kill], adapter)
    assert outcome.problems == [], outcome
    assert outcome.identical
    if kill.point != "timer":  # a timer kill may come after the run ended; a planned point is always reached
        assert outcome.reached == [True], f"the child did not die at {kill.describe()}"
    if kill.point == "mid-file":  # the crash left a half-written checkpoint, which resume skipped and removed
        assert outcome.temporaries_before_resume and not outcome.temporaries_after_resume
        assert outcome.resumed_from == f"step-{kill.step - 1:07d}"


def test_the_plan_covers_a_step_a_checkpoint_write_and_a_random_time():
    points = [k.point for k in crash_runner.plan_kills(CI_KILLS, SEED, 1.0)]
    assert points == ["mid-step", "mid-file", "timer"]
    assert set(crash_runner.POINTS) <= {k.point for k in crash_runner.plan_kills(20, SEED, 1.0)}


def test_a_half_written_checkpoint_is_recognised(reference):
    """The checker the kill tests rely on does see a truncated checkpoint file (so it could fail)."""
    latest = sorted((reference[2] / "checkpoints").glob("step-*"))[-1]  # the last test to use the reference
    assert crash_runner.checkpoint_problem(latest) is None
    state = latest / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    assert crash_runner.checkpoint_problem(latest) == "state.safetensors missing or truncated"


def test_ctrl_c_through_the_recipe_then_resume_gives_the_same_adapter(tmp_path):
    outcome = crash_runner.ctrl_c_recipe(tmp_path, delay=random.Random(SEED).uniform(0.0, 0.3))
    assert outcome.problems == [], outcome
    assert outcome.metrics["interrupted"] and outcome.metrics["steps"] < crash_runner.RECIPE_STEPS
    assert outcome.identical and not outcome.traceback
