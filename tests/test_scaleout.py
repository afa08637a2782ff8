"""Scale-out on two CPU processes (torchrun, DDP over gloo): no run hangs, and resume works anywhere (issue 11).

On CPU, `accelerate launch` starts one process unless MPI is set up, while `Accelerator` reads torchrun's
environment and, told to use the CPU (ACCELERATE_USE_CPU), runs DDP over gloo, as it does over NCCL under
`accelerate launch` on GPUs.

- Two processes x batch_size 2 train to the adapter of one process x batch_size 4 (the same rows per step).

- A NaN on one process stops every process with the same FloatingPointError (a process that stopped alone left
  the other waiting in the gradient all-reduce forever).
- Fewer rows than processes: the process without rows runs a zero-weight padding micro-batch, so DDP's all-reduce
  still meets, and the run trains exactly as one process on those rows.
- Ctrl-C seen by one process stops every process at the same step.
- A two-process run killed with SIGKILL resumes to the adapter of an uninterrupted two-process run; one process
  may resume it when it takes the same rows per optimizer step (exact), and is refused with a clear message when
  it does not.

Every torchrun costs seconds of start-up on two cores, so one launch runs every scenario that ends normally, and
then the one that is killed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
from lora.train import Trainer
from test_trainer import setup

TESTS = Path(__file__).parent
# 2 processes x batch_size 2 x grad_accum 2 = 8 rows per optimizer step
TRAIN = dict(packing=False, batch_size=2, grad_accum=2, max_steps=4, learning_rate=5e-3, save_every=2)

WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from safetensors.torch import save_file
    import torch
    import lora
    from lora.train import Trainer
    from test_trainer import setup

    scenario, tmp = {scenario!r}, Path({tmp!r})

    def save(model, trainer, name):
        if trainer.accelerator.is_main_process:
            save_file({{k: v.contiguous() for k, v in lora.adapter_state_dict(model).items()}}, str(tmp / name))

    def run(folder, callbacks=(), rows=None, **changes):
        model, _, examples, cfg = setup(tmp / folder, **{{**{train!r}, **changes}})
        trainer = Trainer(model, cfg, examples[:rows] if rows else examples, callbacks=list(callbacks))
        assert trainer.world == 2, trainer.world
        trainer.train()
        return model, trainer

    if scenario == "reference":  # every run that ends normally, then one killed with SIGKILL
        save(*run("uninterrupted"), "uninterrupted.safetensors")
        save(*run("one-row", rows=1, batch_size=1, grad_accum=1, max_steps=2), "one-row.safetensors")

        def ctrl_c_on_rank_1(trainer, step, metrics):
            if step == 2 and trainer.accelerator.process_index == 1:
                os.kill(os.getpid(), signal.SIGINT)  # only this process sees Ctrl-C
        _, trainer = run("ctrl-c", callbacks=[ctrl_c_on_rank_1], max_steps=6, save_every=0)
        sys.stdout.write(f"CTRL-C rank {{trainer.accelerator.process_index}} stopped at step {{trainer.step}}\\n")
        sys.stdout.flush()

        # early stopping where process 1's validations disagree with process 0's (as a GPU's kernels may): on
        # process 1 every validation looks better than the last
        model, _, examples, cfg = setup(tmp / "early", **{{**{train!r}, "max_steps": 8, "save_every": 0,
                                        "validation_split": 8, "validate_every": 1, "early_stopping_patience": 2,
                                        "early_stopping_min_delta": 0.99}})
        trainer = Trainer(model, cfg, examples)
        if trainer.accelerator.process_index == 1:
            trainer.validation_scores = lambda: {{"validation_loss": 100.0 - trainer.step,
                                                  "validation_correct": trainer.step, "validation_exact_match": 0.0}}
        result = trainer.train()
        sys.stdout.write(f"EARLY rank {{trainer.accelerator.process_index}} steps {{result.steps}} best "
                         f"{{result.best_step}}\\n")
        sys.stdout.flush()
        save_file({{k: v.contiguous() for k, v in lora.adapter_state_dict(model).items()}},
                  str(tmp / f"early-{{trainer.accelerator.process_index}}.safetensors"))

        def kill_at_3(trainer, step, metrics):
            if step == 3 and trainer.accelerator.process_index == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint
        run("killed", callbacks=[kill_at_3])
    elif scenario == "nan-on-rank-1":
        def poison(trainer, step, metrics):
            if step == 2 and trainer.accelerator.process_index == 1:  # this process's copy of the weights only
                with torch.no_grad():
                    trainer.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(float("nan"))
        try:
            run("nan", callbacks=[poison], save_every=1)
        except FloatingPointError as e:
            # one write for the whole line: both ranks share the pipe, and print's separate newline write could
            # land after the other rank's line (seen in CI as "...checkpointRANK 0: ...")
            sys.stdout.write(f"RANK {{os.environ['RANK']}}: {{e}}\\n")
            sys.stdout.flush()
            sys.exit(3)
    elif scenario == "resume":
        save(*run("killed", resume=True), "resumed.safetensors")
""")


def torchrun(tmp: Path, scenario: str, timeout: float) -> subprocess.CompletedProcess:
    script = tmp / f"{scenario}.py"
    script.write_text(WORKER.format(tests=str(TESTS), tmp=str(tmp), scenario=scenario, train=TRAIN))
    try:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(script)], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: a process hung (still running after {timeout} s)")


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=atol, rtol=0.0, msg=key)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("two")
    proc = torchrun(tmp, "reference", timeout=240)
    assert proc.returncode != 0  # its last run was killed
    assert (tmp / "one-row.safetensors").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp, proc


def test_a_nan_on_one_process_stops_both_with_the_same_error(tmp_path):
    started = time.perf_counter()
    proc = torchrun(tmp_path, "nan-on-rank-1", timeout=60)
    assert time.perf_counter() - started < 60
    assert proc.returncode != 0
    errors = sorted(line for line in proc.stdout.splitlines() if line.startswith("RANK "))
    assert [e[:6] for e in errors] == ["RANK 0", "RANK 1"], proc.stdout[-2000:] + proc.stderr[-3000:]
    messages = {e[len("RANK 0: "):] for e in errors}
    assert len(messages) == 1, errors  # the same decision, the same words, on both
    # rank 1's weights are NaN, so the newest checkpoint (step 2, saved before the poison) is the last good state
    assert "loss became nan at step 3" in errors[0] and "step-0000002" in errors[0], errors[0]


def test_two_processes_train_as_one_process_with_the_same_global_batch(tmp_path, two_processes):
    two_processes, _ = two_processes
    model, _, examples, cfg = setup(tmp_path, **{**TRAIN, "batch_size": 4})  # 1 x 4 x 2 = 2 x 2 x 2 rows per step
    Trainer(model, cfg, examples).train()
    assert_same(load_file(two_processes / "uninterrupted.safetensors"), lora.adapter_state_dict(model), atol=1e-6)


def test_fewer_rows_than_processes_trains_as_one_process_would(tmp_path, two_processes):
    two_processes, _ = two_processes
    model, _, examples, cfg = setup(tmp_path, **{**TRAIN, "batch_size": 1, "grad_accum": 1, "max_steps": 2})
    Trainer(model, cfg, examples[:1]).train()
    assert_same(load_file(two_processes / "one-row.safetensors"), lora.adapter_state_dict(model), atol=1e-6)


def test_a_killed_two_process_run_resumes_on_two_processes_or_on_one_with_the_same_global_batch(tmp_path,
                                                                                                two_processes):
    two_processes, _ = two_processes
    uninterrupted = load_file(two_processes / "uninterrupted.safetensors")
    shutil.copytree(two_processes / "killed", tmp_path / "killed")
    checkpoints = tmp_path / "killed" / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000002"]
    state = json.loads((checkpoints / "step-0000002" / "trainer_state.json").read_text())
    assert state["shape"] == {"total_steps": 4, "processes": 2, "batch_size": 2, "grad_accum": 2,
                              "steps_per_epoch": state["shape"]["steps_per_epoch"]}
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    shutil.copytree(tmp_path / "killed" / "out", single_dir / "out")

    resumed = torchrun(tmp_path, "resume", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(load_file(tmp_path / "resumed.safetensors"), uninterrupted)  # bit for bit

    # one process, batch_size 4: the same 8 rows per step, in the same order
    model, _, examples, cfg = setup(single_dir, **{**TRAIN, "batch_size": 4, "resume": True})
    assert Trainer(model, cfg, examples).train().steps == 4
    assert_same(lora.adapter_state_dict(model), uninterrupted, atol=1e-6)

    model, _, examples, cfg = setup(single_dir, **{**TRAIN, "resume": True})  # 4 rows per step: refused
    shutil.rmtree(single_dir / "out" / "checkpoints" / "step-0000004")
    with pytest.raises(ValueError, match=r"step-0000002 was written by a run taking 8 rows per optimizer step \(2 "
                                         r"processes x batch_size 2 x grad_accum 2\); this one takes 4 rows .*"
                                         r"processes x batch_size x grad_accum = 8, or set resume=False"):
        Trainer(model, cfg, examples).train()


def test_the_main_processs_validations_decide_what_every_process_keeps(two_processes):
    # the steps, the kept step and the kept weights are the same on both processes, though process 1 measured
    # otherwise: the main process's scores decide (an update from each process's own would keep two adapters)
    tmp, proc = two_processes
    runs = sorted(re.findall(r"EARLY rank \d steps \d+ best \d+", proc.stdout))
    assert len(runs) == 2 and runs[0][len("EARLY rank 0"):] == runs[1][len("EARLY rank 1"):], proc.stdout[-2000:]
    kept = [load_file(str(tmp / f"early-{rank}.safetensors")) for rank in (0, 1)]
    assert all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0])


def test_ctrl_c_on_one_process_stops_all_of_them_at_the_same_step(two_processes):
    tmp, proc = two_processes
    stops = sorted(re.findall(r"CTRL-C rank \d stopped at step \d+", proc.stdout))
    assert stops == ["CTRL-C rank 0 stopped at step 2", "CTRL-C rank 1 stopped at step 2"], proc.stdout[-2000:]
    assert [p.name for p in (tmp / "ctrl-c" / "out" / "checkpoints").glob("step-*")] == ["step-0000002"]
