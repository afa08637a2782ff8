"""Crash safety, shared by ``test_crash_safety.py`` (3 kills in CI) and ``bench/crash_safety.py`` (20 and more).

``kill -9``: a training run (a tiny model, a checkpoint after every step) is killed at a random moment, in a child
process: at a random time, or at a chosen point of a random step (inside the step; halfway through writing a
checkpoint file; just before or after the checkpoint folder is renamed into place; while old checkpoints are
pruned). Then ``resume=True`` must load only a complete checkpoint and finish with an adapter bit-identical
(``torch.equal``) to an uninterrupted run's, leaving no temporary file behind.

``Ctrl-C``: ``recipes/sft.py`` on a tiny model folder gets a SIGINT at a random moment of its training; it must
exit without a traceback, with its adapter and ``metrics.json`` written, and ``resume=true`` must give the adapter
of an uninterrupted run.

Run as a script, this module is the child: ``python crash_runner.py OUTPUT_DIR POINT STEP VARIANT RESUME``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IGNORE = -100

# The job: 10 optimizer steps of 2 x 2 packed rows, a checkpoint after each, dropout on (so RNG state matters).
JOB = {"max_steps": 10, "batch_size": 2, "grad_accum": 2, "save_every": 1, "keep_checkpoints": 2,
       "learning_rate": 5e-3, "seq_len": 48, "log_every": 1, "seed": 0, "warmup_ratio": 0.1}
# Where a child kills itself. "timer" is the parent's kill -9 after a random delay: anywhere at all.
POINTS = ("mid-step", "mid-file", "timer", "after-rename", "mid-adapter-file", "before-rename", "mid-prune")


class TinyLM(nn.Module):
    """Embeddings, one MLP block, an output head: enough layers to adapt, a few milliseconds per step."""

    def __init__(self, vocab: int = 64, dim: int = 32, block: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        x = self.tok(input_ids) + self.pos(position_ids)  # (B, T, C)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x)  # (B, T, vocab)


def examples() -> list[dict]:
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(48):
        n = int(torch.randint(4, 16, (1,), generator=g))
        ids = torch.randint(3, 64, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "targets": ids[1:] + [IGNORE]})
    return out


def make_trainer(output_dir: Path, resume: bool):
    import lora
    from lora.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model = TinyLM()
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, dropout=0.1, targets=["fc1", "fc2"]))
    return Trainer(model, TrainConfig(output_dir=str(output_dir), resume=resume, **JOB), examples())


def adapter_of(trainer) -> dict[str, torch.Tensor]:
    import lora

    return {k: v.detach().clone() for k, v in lora.adapter_state_dict(trainer.model).items()}


def reference_run(output_dir: Path) -> tuple[dict[str, torch.Tensor], float]:
    """The uninterrupted run's adapter, and how long its training took (to spread timer kills over it)."""
    trainer = make_trainer(output_dir, resume=False)
    start = time.perf_counter()
    trainer.train()
    return adapter_of(trainer), time.perf_counter() - start


# -- the child: train, and die at the chosen point ---------------------------------------------------------------------
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(point: str, step: int, variant: int, trainer_ref: list) -> None:
    """Make the child kill itself at ``point`` of optimizer step ``step`` (the step that makes trainer.step == step)."""
    import lora.adapter_io
    import lora.train.trainer
    import lora.train.checkpoint

    def at_step() -> bool:
        return bool(trainer_ref) and trainer_ref[0].step == step

    if point == "mid-step":  # gradients of the step accumulated, the optimizer not stepped
        real = lora.train.trainer.Trainer._backward_window

        def backward_then_die(self, micro_batches):
            out = real(self, micro_batches)
            if self.step + 1 == step:
                _die()
            return out

        lora.train.trainer.Trainer._backward_window = backward_then_die
    elif point in ("mid-file", "mid-adapter-file"):  # half of one checkpoint file written
        module = lora.train.checkpoint if point == "mid-file" else lora.adapter_io
        real_save, calls = module.save_file, [0]

        def save_half_then_die(tensors, filename, *args, **kwargs):
            real_save(tensors, filename, *args, **kwargs)
            if at_step() and ".step-" in str(filename):
                calls[0] += 1
                if calls[0] == variant:
                    size = os.path.getsize(filename)
                    os.truncate(filename, size // 2)
                    _die()

        module.save_file = save_half_then_die
    elif point in ("before-rename", "after-rename"):
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            ours = Path(src).name.startswith(".step-") and at_step()
            if ours and point == "before-rename":
                _die()
            real_replace(src, dst, *args, **kwargs)
            if ours:
                _die()

        os.replace = replace
    elif point == "mid-prune":  # an old checkpoint half deleted
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name.startswith("step-") and at_step():
                files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                for p in files[: max(1, len(files) // 2)]:
                    p.unlink()
                _die()
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif point != "timer":
        raise ValueError(f"unknown kill point {point!r}; choose one of {POINTS}")


def child_main(argv: list[str]) -> None:
    output_dir, point, step, variant, resume = argv
    trainer_ref: list = []
    _install_kill(point, int(step), int(variant), trainer_ref)
    trainer = make_trainer(Path(output_dir), resume=resume == "1")
    trainer_ref.append(trainer)
    print("ready", flush=True)
    trainer.train()
    print("finished", flush=True)


# -- the parent: plan kills, run children, check the checkpoints, resume ---------------------------------------------
@dataclass
class Kill:
    point: str
    step: int  # the optimizer step the kill happens in (timer kills: unused)
    variant: int = 1  # mid-file: which file of the checkpoint (1 = trainable, 2 = state)
    delay: float = 0.0  # timer: seconds after the child is ready

    def describe(self) -> str:
        if self.point == "timer":
            return f"timer {self.delay:.2f}s"
        return f"{self.point} at step {self.step}" + (f" (file {self.variant})" if self.point == "mid-file" else "")


def plan_kills(n: int, seed: int, train_seconds: float) -> list[Kill]:
    """``n`` kills, cycling through every kind of point, each at a random step (or a random time)."""
    rng = random.Random(seed)
    steps = JOB["max_steps"]
    kills = []
    for i in range(n):
        point = POINTS[i % len(POINTS)]
        first = JOB["keep_checkpoints"] + 1 if point == "mid-prune" else 1  # pruning starts once there are more
        variant = rng.choice([1, 2]) if point == "mid-file" else 1  # a checkpoint's adapter is one file
        kills.append(Kill(point, rng.randint(first, steps - 1), variant, rng.uniform(0.0, 1.1 * train_seconds)))
    return kills


def _loads(path: Path) -> bool:
    from safetensors.torch import load_file

    try:
        load_file(str(path))
        return True
    except Exception:
        return False


def checkpoint_problem(folder: Path) -> str | None:
    """What is missing or broken in a checkpoint folder (None: complete and readable)."""
    from lora.adapter_io import read_adapter

    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json unreadable ({e})"
    if state.get("step") != int(folder.name.removeprefix("step-")):
        return f"trainer_state.json says step {state.get('step')}"
    for name in ("trainable.safetensors", "state.safetensors"):
        if not _loads(folder / name):
            return f"{name} missing or truncated"
    try:
        read_adapter(folder / "adapter")
    except ValueError as e:
        return f"adapter unreadable ({e})"
    return None


def temporaries(output_dir: Path) -> list[str]:
    """Hidden temporary files and folders left in the checkpoint folder (or the output folder)."""
    found = []
    for folder in (output_dir, output_dir / "checkpoints"):
        if folder.is_dir():
            found += [p.name for p in folder.iterdir() if p.name.startswith(".")]
    return sorted(found)


@dataclass
class Outcome:
    kills: list[str]
    reached: list[bool]  # did the child die where planned (a timer kill may come after the run ended)
    checkpoints_before_resume: list[str]
    resumed_from: str | None
    temporaries_before_resume: list[str]
    temporaries_after_resume: list[str]
    identical: bool
    problems: list[str] = field(default_factory=list)


def run_child(output_dir: Path, kill: Kill, resume: bool, timeout: float = 300) -> bool:
    """Run a training child and kill it as planned; True if it died by SIGKILL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(HERE / "crash_runner.py"), str(output_dir), kill.point,
                             str(kill.step), str(kill.variant), "1" if resume else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        if kill.point == "timer":
            line = proc.stdout.readline()  # "ready": imports done, the model built
            if line.strip() == "ready":
                time.sleep(kill.delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"the training child ({kill.describe()}) hung") from None
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"the training child ({kill.describe()}) failed with status {proc.returncode}:\n"
                           f"{stderr[-3000:]}")
    return proc.returncode == -signal.SIGKILL


def kill_and_resume(workdir: Path, kills: list[Kill], reference: dict[str, torch.Tensor]) -> Outcome:
    """Run the job killed by each of ``kills`` in turn (each later child resumes), then resume it to the end here."""
    from lora.train import run_state

    out = workdir / "out"
    reached = [run_child(out, kill, resume=i > 0) for i, kill in enumerate(kills)]
    problems = []
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() \
        else []
    broken = {name: checkpoint_problem(out / "checkpoints" / name) for name in checkpoints}
    broken = {name: why for name, why in broken.items() if why}
    complete = [name for name in checkpoints if name not in broken]
    temporaries_before = temporaries(out)

    loaded: list[Path] = []
    real_resume = run_state.resume

    def recording_resume(trainer, latest):
        loaded.append(Path(latest))
        why = checkpoint_problem(Path(latest))  # checked again at the moment it is read
        if why:
            problems.append(f"resume loaded the half-written checkpoint {Path(latest).name}: {why}")
        return real_resume(trainer, latest)

    run_state.resume = recording_resume
    try:
        trainer = make_trainer(out, resume=True)
        trainer.train()
    finally:
        run_state.resume = real_resume
    resumed_from = loaded[0].name if loaded else None
    newest_complete = complete[-1] if complete else None
    if resumed_from != newest_complete:
        problems.append(f"resume started from {resumed_from}, the newest complete checkpoint was {newest_complete}")
    adapter = adapter_of(trainer)
    identical = adapter.keys() == reference.keys() and all(torch.equal(adapter[k], reference[k]) for k in reference)
    if not identical:
        worst = max(float((adapter[k] - reference[k]).abs().max()) for k in reference if k in adapter)
        problems.append(f"the resumed adapter differs from the uninterrupted one (max |diff| {worst:.3g})")
    left = temporaries(out)
    if left:
        problems.append(f"temporary files left after the resumed run: {left}")
    return Outcome([k.describe() for k in kills], reached, checkpoints, resumed_from, temporaries_before, left,
                   identical, problems)


# -- Ctrl-C through a recipe -------------------------------------------------------------------------------------------
RECIPE_STEPS = 60  # steps of ~20 ms (save_every=1): they outlast the Ctrl-C's delay, up to 0.3 s after the first
WORDS = ["cat", "horse", "a", "elephant", "dog", "ox", "giraffe", "bee", "rhinoceros", "yak", "emu", "lion"]


def recipe_job(workdir: Path) -> list[str]:
    """A tiny chat model folder and a word-reversal task; the recipe arguments that train on them."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_char_tokenizer, make_llama_for

    tok = make_char_tokenizer()
    make_llama_for(tok).save_pretrained(workdir / "model")
    tok.save_pretrained(workdir / "model")
    rows = [{"instruction": "Reverse", "input": w, "output": w[::-1]} for w in WORDS * 4]
    (workdir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workdir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return [f"model={workdir / 'model'}", f"train_file={workdir / 'train.jsonl'}",
            f"eval_file={workdir / 'eval.jsonl'}", f"max_steps={RECIPE_STEPS}", "batch_size=2", "grad_accum=1",
            "seq_len=64", "save_every=1", "keep_checkpoints=2", "dropout=0.1", "r=4", "alpha=8",
            "learning_rate=5e-3", "warmup_ratio=0.1", "eval_max_new_tokens=4"]


@dataclass
class CtrlCOutcome:
    delay: float
    returncode: int
    traceback: bool
    stderr_tail: str
    metrics: dict | None
    adapter_written: bool
    identical: bool
    problems: list[str] = field(default_factory=list)


def _recipe_main(argv: list[str]) -> dict:
    if str(ROOT / "recipes") not in sys.path:
        sys.path.insert(0, str(ROOT / "recipes"))
    import sft

    return sft.main(argv)


def ctrl_c_recipe(workdir: Path, delay: float, reference_adapter: Path | None = None,
                  timeout: float = 300) -> CtrlCOutcome:
    """SIGINT ``recipes/sft.py`` ``delay`` seconds after its first checkpoint, then resume it here and compare the
    adapter with an uninterrupted run's (``reference_adapter``; without one, it is trained here meanwhile)."""
    from safetensors.torch import load_file

    args = recipe_job(workdir)
    run, adapter = workdir / "run", workdir / "adapter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(ROOT / "recipes" / "sft.py"), *args, f"output_dir={run}",
                             f"adapter_dir={adapter}"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def ctrl_c_once_training() -> None:
        first = run / "checkpoints" / "step-0000001"
        deadline = time.monotonic() + timeout
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    watcher = threading.Thread(target=ctrl_c_once_training, daemon=True)
    watcher.start()
    if reference_adapter is None:  # the uninterrupted run, here, while the child trains
        _recipe_main([*args, f"output_dir={workdir / 'ref-run'}", f"adapter_dir={workdir / 'ref-adapter'}"])
        reference_adapter = workdir / "ref-adapter"
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    watcher.join()
    problems = []
    metrics_file = run / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode} after Ctrl-C")
    if "Traceback" in stderr:
        problems.append("a traceback after Ctrl-C")
    if metrics is None:
        problems.append("no metrics.json after Ctrl-C")
    elif not metrics.get("interrupted"):
        problems.append(f"metrics.json does not say the run was interrupted (steps={metrics.get('steps')}); "
                        f"the SIGINT came after training ended")
    written = (adapter / "adapter_model.safetensors").is_file()
    if not written:
        problems.append("no adapter after Ctrl-C")

    _recipe_main([*args, f"output_dir={run}", f"adapter_dir={adapter}", "resume=true"])
    got = load_file(adapter / "adapter_model.safetensors")
    want = load_file(reference_adapter / "adapter_model.safetensors")
    identical = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    if not identical:
        problems.append("the resumed recipe's adapter differs from the uninterrupted run's")
    return CtrlCOutcome(delay, proc.returncode, "Traceback" in stderr, stderr[-1500:], metrics, written, identical,
                        problems)


if __name__ == "__main__":
    child_main(sys.argv[1:])
