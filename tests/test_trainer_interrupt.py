"""Ctrl-C (a real SIGINT) stops training on a step boundary, and resume gives the same adapter (on several
processes: tests/test_scaleout.py).

Issue 9: a KeyboardInterrupt raised between ``optimizer.step()`` and ``self.step += 1`` saved updated weights under
the old step number, so resuming applied that step twice.
"""

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lora
from lora.train import Trainer
from test_trainer import setup

TESTS = Path(__file__).parent
TRAIN = dict(dropout=0.1, max_steps=12, batch_size=2, learning_rate=5e-3)

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from lora.train import Trainer
    from test_trainer import setup

    def announce(trainer, step, metrics):
        print(f"step {{step}}", flush=True)

    model, _, examples, cfg = setup(Path({tmp!r}), **{train!r})
    trainer = Trainer(model, cfg, examples, callbacks=[announce])
    ctrl_c_after_update = {ctrl_c_after_update!r}
    if ctrl_c_after_update is not None:
        real_step = trainer.optimizer.step

        def step_then_ctrl_c(*args, **kwargs):
            out = real_step(*args, **kwargs)
            if trainer.step == ctrl_c_after_update:
                os.kill(os.getpid(), signal.SIGINT)  # the weights are updated, trainer.step is not yet
            return out

        trainer.optimizer.step = step_then_ctrl_c
    result = trainer.train()
    print(json.dumps({{"steps": result.steps, "interrupted": result.interrupted, "checkpoint": result.checkpoint}}),
          flush=True)
""")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter of the same run without interruption."""
    model, _, examples, cfg = setup(tmp_path_factory.mktemp("uninterrupted"), **TRAIN)
    Trainer(model, cfg, examples).train()
    return lora.adapter_state_dict(model)


def resume_and_compare(run_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    model, _, examples, cfg = setup(run_dir, resume=True, **TRAIN)
    result = Trainer(model, cfg, examples).train()
    assert result.steps == TRAIN["max_steps"] and not result.interrupted
    for k, v in lora.adapter_state_dict(model).items():
        assert torch.equal(v, expected[k]), k


def start_child(run_dir: Path, ctrl_c_after_update: int | None = None) -> subprocess.Popen:
    script = CHILD.format(tests=str(TESTS), tmp=str(run_dir), train=TRAIN, ctrl_c_after_update=ctrl_c_after_update)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def child_result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_sigint_right_after_the_optimizer_step_finishes_that_step(tmp_path, uninterrupted):
    result = child_result(start_child(tmp_path / "run", ctrl_c_after_update=3))
    # step index 3 (the 4th step) had updated the weights: it is completed and saved as step 4, not as step 3
    assert result["interrupted"] and result["steps"] == 4, result
    assert result["checkpoint"].endswith("step-0000004")
    resume_and_compare(tmp_path / "run", uninterrupted)


def test_sigint_at_a_random_moment_resumes_to_the_same_adapter(tmp_path, uninterrupted):
    proc = start_child(tmp_path / "run")
    line = proc.stdout.readline()
    while line.startswith(("plan:", "~")):  # the run's plan and its expected time come first
        line = proc.stdout.readline()
    assert line.strip() == "step 1"  # training is under way
    started = time.perf_counter()
    assert proc.stdout.readline().strip() == "step 2"
    step_seconds = time.perf_counter() - started  # steps take 20 ms or 200 ms, as the machine's load goes
    delay = random.uniform(0.0, 3 * step_seconds)  # somewhere in steps 3 to 5 of 12
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    result = child_result(proc)
    assert result["interrupted"] and 1 <= result["steps"] < TRAIN["max_steps"], (delay, result)
    resume_and_compare(tmp_path / "run", uninterrupted)


def test_the_previous_sigint_handler_is_back_after_training(tmp_path):
    def mine(signum, frame):
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGINT, mine)
    try:
        seen = []

        def look(trainer, step, metrics):
            seen.append(signal.getsignal(signal.SIGINT))

        model, _, examples, cfg = setup(tmp_path, max_steps=1, batch_size=2)
        Trainer(model, cfg, examples, callbacks=[look]).train()
        assert seen[0] is not mine  # during training Ctrl-C only asks to stop
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)
