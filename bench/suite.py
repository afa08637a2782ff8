"""Run the sft recipe on a suite of generated tasks unlike the bundled one and tabulate what it does (issue 20).

    .venv/bin/python bench/suite.py                                 # the tuning tasks, the recipe's own defaults
    .venv/bin/python bench/suite.py --tasks all --label defaults --json bench/suite.jsonl
    .venv/bin/python bench/suite.py --tasks held-out --label full-epoch -- early_stopping_patience=0 validation_split=0
    .venv/bin/python bench/suite.py --tasks snake_case --size snake_case=16 --eval-examples 8 -- max_steps=1  # smoke
    .venv/bin/python bench/suite.py --code /tmp/old --label old-defaults  # a worktree: git worktree add /tmp/old REV
    .venv/bin/python bench/suite.py --generate-only --out /tmp/lora-suite     # only write the task files

The tasks live in bench/tasks/ (their table is in its docstring). For every selected task the suite writes
``OUT/data/TASK/{train,eval}.jsonl``, runs ``recipes/sft.py train_file=... eval_file=... output_dir=...
adapter_dir=... <settings after -->`` in a subprocess (its output in ``OUT/runs/LABEL/TASK/log.txt``; that folder
is emptied first, and the run's checkpoints are deleted after it unless ``--keep-checkpoints``), reads the run's
``metrics.json`` and prints one markdown table (also written to ``OUT/runs/LABEL/table.md``). Exact-match tasks
report held-out exact match before -> after training; free-text tasks report held-out loss before -> after and a
word-overlap F1 of greedy answers, which the suite measures itself by loading the saved adapter
(``--free-text-check`` examples). ``--json FILE`` appends one JSON line per task, with the label and settings, so
runs of several defaults can be set side by side. Run it with ``OMP_NUM_THREADS`` set to share the machine; the
recipe inherits the environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: make bench/tasks importable

from tasks import TASKS, Task, write_task

ROOT = Path(__file__).resolve().parents[1]
RECIPE = Path("recipes") / "sft.py"  # in this checkout, or in the one given as --code
SET_BY_SUITE = ("train_file", "eval_file", "output_dir", "adapter_dir")
GROUPS = {"tuning": lambda t: t.role == "tuning", "held-out": lambda t: t.role == "held-out", "all": lambda t: True}


def select(spec: str) -> list[Task]:
    """Tasks named in ``spec`` (comma-separated names or the groups tuning, held-out, all), in suite order."""
    chosen: set[str] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part in GROUPS:
            chosen |= {t.name for t in TASKS.values() if GROUPS[part](t)}
        elif part in TASKS:
            chosen.add(part)
        else:
            raise SystemExit(f"error: unknown task {part!r}; choose from {', '.join(TASKS)} or a group "
                             f"({', '.join(GROUPS)})")
    return [t for t in TASKS.values() if t.name in chosen]


def sizes(task: Task, args: argparse.Namespace) -> tuple[int, int]:
    """(train, eval) example counts after --size, --examples-scale and --eval-examples."""
    train = args.size.get(task.name, max(8, round(task.train * args.examples_scale)))
    evals = min(task.eval, args.eval_examples) if args.eval_examples else task.eval
    return train, evals


def run_recipe(task: Task, train_file: Path, eval_file: Path, run_dir: Path, extra: list[str], verbose: bool,
               code: Path = ROOT) -> tuple[int, float, Path]:
    """Run ``code``'s recipes/sft.py on one task; returns (exit status, wall seconds, log file).

    ``code`` is this checkout, or another one (a ``git worktree`` of an older commit) whose ``lora`` package is put
    first on the path, so that older defaults run on the same tasks in the same session."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale metrics.json or checkpoint must not pass for this run's
    run_dir.mkdir(parents=True)
    log = run_dir / "log.txt"
    command = [sys.executable, str(code / RECIPE), f"train_file={train_file}",
               f"eval_file={eval_file}", f"output_dir={run_dir / 'run'}", f"adapter_dir={run_dir / 'adapter'}", *extra]
    start = time.perf_counter()
    with log.open("w") as f:
        f.write(" ".join(command) + "\n")
        f.flush()
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen(command, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        for line in process.stdout:
            f.write(line)
            if verbose:
                print(f"  [{task.name}] {line}", end="", flush=True)
        status = process.wait()
    return status, time.perf_counter() - start, log


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def word_f1(prediction: str, answer: str) -> float:
    """F1 of the bags of lower-cased words of ``prediction`` and ``answer`` (1.0 for the same words)."""
    got, want = _words(prediction), _words(answer)
    common = sum(min(got.count(w), want.count(w)) for w in set(want))
    if not got or not want or not common:
        return float(not got and not want)
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def free_text_check(eval_file: Path, adapter: Path, model_name: str, examples: int) -> dict:
    """Held-out loss over the whole eval file and word-overlap F1 of greedy answers on its first ``examples``, for
    the base model (adapter disabled) and the trained one: the recipe reports neither before training."""
    import torch  # only free-text tasks need the model in this process

    import lora
    from lora.data import collate, load_dataset, model_inputs, prompts_and_answers
    from lora.generate import exact_match

    model, tokenizer = lora.load_model(model_name)
    lora.load_adapter(model, str(adapter))
    model.eval()
    data, _ = load_dataset(eval_file, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, answers = prompts_and_answers(eval_file)
    prompts, answers = prompts[:examples], answers[:examples]

    def loss() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(data), 8):
                batch = collate(data[i:i + 8], pad)
                logits = model(**model_inputs(batch)).logits.float()  # (B, T, vocab)
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                           ignore_index=-100, reduction="sum").item()
                count += int((batch["targets"] != -100).sum())
        return total / count  # mean per answer token, as the trainer's eval_loss

    def overlap() -> tuple[float, list[str]]:
        _, predictions = exact_match(model, tokenizer, prompts, answers)
        return sum(map(word_f1, predictions, answers)) / len(answers), predictions

    with lora.disabled(model):
        loss_before = loss()
        f1_before, _ = overlap() if examples else (None, [])
    loss_after = loss()
    f1_after, shown = overlap() if examples else (None, [])
    return {"loss_before": loss_before, "loss_after": loss_after, "f1_before": f1_before, "f1_after": f1_after,
            "overlap_examples": len(answers) if examples else 0,
            "samples": [{"expected": a, "got": p} for a, p in zip(answers[:3], shown)]}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _wall(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def table(rows: list[dict]) -> str:
    lines = ["| task | kind | role | train | eval | held-out score before -> after | eval loss | steps | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("metrics") or {}
        if r.get("error"):
            score, steps = f"failed: {r['error']}", "-"
        else:
            if r["scoring"] == "loss" and r.get("free_text"):
                ft = r["free_text"]
                score = f"loss {ft['loss_before']:.3f} -> {ft['loss_after']:.3f}"
                if ft["f1_after"] is not None:
                    score += f"; word F1 {ft['f1_before']:.2f} -> {ft['f1_after']:.2f}"
                score += f" (exact {_pct(m.get('accuracy_before'))} -> {_pct(m.get('accuracy_after'))})"
            else:
                score = f"{_pct(m.get('accuracy_before'))} -> {_pct(m.get('accuracy_after'))}"
            steps = str(m.get("steps", "-"))
            if m.get("stopped_early"):
                steps += f" (stopped early, best {m.get('best_step')})"
        lines.append(f"| {r['task']} | {r['kind']} | {r['role']} | {r['train_examples']:,} | {r['eval_examples']} | "
                     f"{score} | {_num(m.get('eval_loss'))} | {steps} | {_wall(r['wall_seconds'])} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Mean exact match after training per role: the figure a default is chosen on (tuning) and judged by (held-out)."""
    parts = []
    for role in ("tuning", "held-out"):
        scores = [r["metrics"]["accuracy_after"] for r in rows if r["role"] == role and r["scoring"] == "exact"
                  and not r.get("error") and r["metrics"].get("accuracy_after") is not None]
        if scores:
            parts.append(f"{role} mean exact match after: {sum(scores) / len(scores):.1%} over {len(scores)} tasks")
    return "; ".join(parts)


def _commit(code: Path) -> str | None:
    try:  # read-only: which code the figures belong to
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _size(text: str) -> tuple[str, int]:
    name, _, count = text.partition("=")
    if name not in TASKS or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"--size takes TASK=TRAIN_EXAMPLES with a task of {', '.join(TASKS)}, "
                                         f"got {text!r}")
    return name, int(count)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="tuning", help="task names and/or groups tuning, held-out, all")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lora-suite"), help="data and runs go here")
    parser.add_argument("--label", default="default", help="names this run's settings in the results")
    parser.add_argument("--json", type=Path, help="append one JSON line per task to this file")
    parser.add_argument("--seed", type=int, default=0, help="data seed (the recipe's own seed= is separate)")
    parser.add_argument("--examples-scale", type=float, default=1.0, help="multiply every train size (min 8)")
    parser.add_argument("--size", type=_size, action="append", default=[], metavar="TASK=N",
                        help="train examples for one task (repeatable; wins over --examples-scale)")
    parser.add_argument("--eval-examples", type=int, help="at most this many eval examples per task")
    parser.add_argument("--free-text-check", type=int, default=50, metavar="N",
                        help="greedy answers for the word-overlap F1 of free-text tasks (0: loss only)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints folder")
    parser.add_argument("--generate-only", action="store_true", help="write the task files and stop")
    parser.add_argument("--verbose", action="store_true", help="echo the recipe's output as it runs")
    parser.add_argument("--code", type=Path, default=ROOT, metavar="DIR",
                        help="run the recipe of this checkout (e.g. a git worktree of an older commit)")
    args = parser.parse_args(ours)
    args.code = args.code.resolve()
    if not (args.code / RECIPE).is_file():
        parser.error(f"--code {args.code} has no {RECIPE}; give the root of a checkout")
    args.size = dict(args.size)
    if args.examples_scale <= 0 or (args.eval_examples is not None and args.eval_examples < 1):
        parser.error("--examples-scale must be > 0 and --eval-examples >= 1")
    clash = sorted({s.partition("=")[0] for s in extra} & set(SET_BY_SUITE))
    if clash:
        parser.error(f"{clash} are set by the suite for each task; pass other recipe settings after --")
    return args, extra


def main(argv: list[str]) -> list[dict]:
    args, extra = parse(argv)
    chosen = select(args.tasks)
    model_name = next((s.partition("=")[2] for s in extra if s.startswith("model=")), "smollm2-135m")
    files = {}
    for task in chosen:
        train_n, eval_n = sizes(task, args)
        files[task.name] = write_task(task, args.out / "data" / task.name, args.seed, train_n, eval_n)
        print(f"{task.name}: {train_n} train / {eval_n} eval examples in {args.out / 'data' / task.name}")
    if args.generate_only:
        return []
    rows = []
    commit = _commit(args.code)
    for task in chosen:
        train_file, eval_file = files[task.name]
        run_dir = args.out / "runs" / args.label / task.name
        print(f"{task.name}: training (log: {run_dir / 'log.txt'})", flush=True)
        status, wall, log = run_recipe(task, train_file, eval_file, run_dir, extra, args.verbose, args.code)
        train_n, eval_n = sizes(task, args)
        row = {"label": args.label, "task": task.name, "kind": task.kind, "role": task.role, "format": task.format,
               "scoring": task.scoring, "train_examples": train_n, "eval_examples": eval_n, "seed": args.seed,
               "settings": extra, "commit": commit, "time": datetime.datetime.now().isoformat(timespec="seconds"),
               "returncode": status, "wall_seconds": round(wall, 1), "metrics": None, "log": str(log)}
        metrics_file = run_dir / "run" / "metrics.json"
        if status != 0 or not metrics_file.is_file():
            tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            row["error"] = f"exit {status}: {tail[0][:160]}"
            print(f"{task.name}: FAILED ({row['error']}); see {log}", flush=True)
        else:
            row["metrics"] = json.loads(metrics_file.read_text())
            if not args.keep_checkpoints:  # ~100 MB a task, only needed to resume a run that stopped
                shutil.rmtree(run_dir / "run" / "checkpoints", ignore_errors=True)
            if task.scoring == "loss":
                start = time.perf_counter()
                try:
                    row["free_text"] = free_text_check(eval_file, Path(row["metrics"]["adapter"]), model_name,
                                                       min(args.free_text_check, eval_n))
                except (ValueError, RuntimeError, OSError) as e:  # keep the run's own metrics and go on
                    row["free_text_error"] = f"{type(e).__name__}: {e}"
                    print(f"{task.name}: free-text check failed ({row['free_text_error']})", flush=True)
                row["free_text_check_seconds"] = round(time.perf_counter() - start, 1)
            print(f"{task.name}: done in {_wall(wall)}", flush=True)
        rows.append(row)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            with args.json.open("a") as f:  # appended per task, so a long suite keeps what it finished
                f.write(json.dumps(row) + "\n")
    text = f"label {args.label!r}, settings {' '.join(extra) or '(recipe defaults)'}, commit {commit}\n\n" \
           f"{table(rows)}\n\n{summary(rows)}"
    (args.out / "runs" / args.label / "table.md").write_text(text + "\n")
    print("\n" + text)
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(r.get("error") for r in main(sys.argv[1:])) else 0)
