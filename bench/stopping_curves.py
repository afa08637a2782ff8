"""Validation and held-out curves of one sft run, and the stopping rules replayed on them (issue 20).

    .venv/bin/python bench/stopping_curves.py --task date_iso --size 400 --eval-examples 100 --out /tmp/curves.json
    .venv/bin/python bench/stopping_curves.py --replay /tmp/curves.json        # rules on a saved curve, no training

Trains one task of bench/tasks with the sft recipe's defaults, but never stops and judges the validation slice at
every ``--every`` steps; at each of those steps it also scores the held-out eval file the same way (exact match by
teacher forcing, which is what greedy decoding answers; see lora/train/early_stopping.py), which the recipe itself
only measures at the end. The curve is written as JSON, and every rule of a small grid (patience x min_delta) is
replayed on it: where it would stop, which step's weights it would keep, the held-out exact match of those weights
against the end of the run, and the share of the steps it would spend.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: make bench/tasks importable

from tasks import TASKS, write_task


def record(args: argparse.Namespace) -> dict:
    import lora
    from lora.data import load_dataset
    from lora.recipe import parse_settings, seed_everything
    from lora.recipes.sft import SFT
    from lora.train import Trainer

    task = TASKS[args.task]
    train_file, eval_file = write_task(task, args.out.parent / "data" / task.name, 0, args.size or task.train,
                                       min(task.eval, args.eval_examples))
    _, lora_cfg, cfg = parse_settings(SFT, [f"output_dir={args.out.parent / 'run' / task.name}",
                                            "early_stopping_patience=0", f"validate_every={args.every}",
                                            *args.settings])
    model, tokenizer = lora.load_model("smollm2-135m")
    train, _ = load_dataset(train_file, tokenizer, max_length=cfg.seq_len)
    held_out, _ = load_dataset(eval_file, tokenizer, max_length=cfg.seq_len)
    seed_everything(cfg.seed)
    lora.inject(model, lora_cfg)
    points: list[dict] = []

    def measure(trainer, step, metrics):
        if "validation_loss" not in metrics:
            return
        slice_ = trainer.validation_data
        trainer.validation_data = held_out  # the same one-pass scoring, on the eval file
        try:
            scores = trainer.validation_scores()
        finally:
            trainer.validation_data = slice_
        points.append({"step": step, "loss": metrics["validation_loss"], "correct": metrics["validation_correct"],
                       "eval_exact_match": scores["validation_exact_match"], "eval_loss": scores["validation_loss"]})
        print(f"step {step}: validation {metrics['validation_correct']}/{len(slice_)} right, loss "
              f"{metrics['validation_loss']:.4f}; held-out {scores['validation_exact_match']:.1%}", flush=True)

    trainer = Trainer(model, cfg, train, callbacks=[measure])
    if trainer.early_stopping is None:
        raise SystemExit(f"{task.name}: {len(train)} training examples cannot spare a validation slice of the "
                         f"default size; hold out a count to record its curve (... -- validation_split=24)")
    trainer.train()
    curve = {"task": task.name, "train": len(train), "validation": len(trainer.validation_data),
             "steps": trainer.total_steps, "stop_from": trainer.early_stopping.stop_from,
             "judge": trainer.early_stopping.judge, "points": points}
    args.out.write_text(json.dumps(curve, indent=1))
    return curve


def replay(curve: dict, patience: int, min_delta: float) -> dict:
    """Where the rule would stop on ``curve``, and what its kept weights score held out."""
    from lora.train.early_stopping import EarlyStopping

    class _NoWeights:  # the replay keeps step numbers, not weights
        def named_parameters(self):
            return iter(())

    rule = EarlyStopping(patience, min_delta, curve["judge"], curve["stop_from"])
    stop = curve["points"][-1]["step"]
    for p in curve["points"]:
        if rule.update(p["step"], p["loss"], _NoWeights(), p["correct"]):
            stop = p["step"]
            break
    kept = next(p for p in curve["points"] if p["step"] == rule.best_step)
    return {"patience": patience, "min_delta": min_delta, "stop": stop, "best": rule.best_step,
            "share": stop / curve["steps"], "kept": kept["eval_exact_match"],
            "end": curve["points"][-1]["eval_exact_match"]}


def report(curve: dict) -> str:
    lines = [f"{curve['task']}: {curve['train']} train, {curve['validation']} validation, {curve['steps']} steps, "
             f"no stop before {curve['stop_from']}, judged by {curve['judge']}",
             "| patience | min_delta | stops at | keeps | share of steps | held-out kept | held-out at the end |",
             "|---|---|---|---|---|---|---|"]
    for patience in (1, 2, 3):
        for delta in (0.0, 0.02, 0.05, 0.1):
            r = replay(curve, patience, delta)
            lines.append(f"| {patience} | {delta} | {r['stop']} | {r['best']} | {r['share']:.0%} | {r['kept']:.1%} | "
                         f"{r['end']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS))
    parser.add_argument("--size", type=int, help="train examples (default: the task's)")
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--every", type=int, default=1, help="validate every N steps")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lora-curves/curve.json"))
    parser.add_argument("--replay", type=Path, help="replay the rules on a saved curve instead of training")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.settings = extra
    if args.replay:
        print(report(json.loads(args.replay.read_text())))
        return
    if not args.task:
        parser.error("--task is needed to record a curve")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(report(record(args)))


if __name__ == "__main__":
    main(sys.argv[1:])
