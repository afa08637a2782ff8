"""Crash safety with many kills: the runner of tests/reliability/crash_runner.py (the CI test does 3 kills and one
Ctrl-C), here 20 kill -9s by default, cycling through every kill point at random steps and times, and a few Ctrl-Cs
through recipes/sft.py at random moments.

    .venv/bin/python bench/crash_safety.py                       # 20 kills, 3 Ctrl-Cs
    .venv/bin/python bench/crash_safety.py --kills 50 --ctrl-c 5 --chain 2 --seed 3

``--chain 2`` kills each run twice (the second child resumes the first) before the final resume. Prints one line per
run and a summary; exits 1 if any resume was not bit-identical, loaded a half-written checkpoint, or left files.
"""

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))

import crash_runner  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="killed runs (default 20)")
    parser.add_argument("--chain", type=int, default=1, help="kills per run before the final resume (default 1)")
    parser.add_argument("--ctrl-c", type=int, default=3, help="Ctrl-Cs through recipes/sft.py (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="plan seed (default: random)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"seed {seed}", flush=True)
    bad = 0
    with tempfile.TemporaryDirectory(prefix="lora-crash-") as tmp:
        tmp = Path(tmp)
        adapter, train_seconds = crash_runner.reference_run(tmp / "reference")
        plan = crash_runner.plan_kills(args.kills * args.chain, seed, train_seconds)
        random.Random(seed).shuffle(plan)
        start, reached, partial = time.perf_counter(), 0, 0
        for i in range(args.kills):
            kills = plan[i * args.chain:(i + 1) * args.chain]
            outcome = crash_runner.kill_and_resume(tmp / f"run{i}", kills, adapter)
            reached += sum(outcome.reached)
            partial += bool(outcome.temporaries_before_resume)
            ok = not outcome.problems
            bad += not ok
            print(f"run {i + 1:3d}: {' then '.join(outcome.kills):45s} died={outcome.reached} "
                  f"checkpoints={outcome.checkpoints_before_resume} half-written={outcome.temporaries_before_resume} "
                  f"resumed from {outcome.resumed_from}: {'identical' if outcome.identical else 'DIFFERENT'}"
                  + ("" if ok else f"  PROBLEMS: {outcome.problems}"), flush=True)
        print(f"kill -9: {args.kills} runs, {reached} kills landed ({partial} left a half-written checkpoint), "
              f"{args.kills - bad} resumed bit-identical and clean, {bad} failed, in "
              f"{time.perf_counter() - start:.0f} s", flush=True)

        rng, reference_adapter, ctrl_c_bad = random.Random(seed), None, 0
        for i in range(args.ctrl_c):
            outcome = crash_runner.ctrl_c_recipe(tmp / f"ctrl-c{i}", rng.uniform(0.0, 0.5), reference_adapter)
            reference_adapter = reference_adapter or tmp / f"ctrl-c{i}" / "ref-adapter"
            ctrl_c_bad += bool(outcome.problems)
            print(f"ctrl-c {i + 1}: after {outcome.delay:.2f}s, exit {outcome.returncode}, stopped at step "
                  f"{(outcome.metrics or {}).get('steps')}, resumed "
                  f"{'identical' if outcome.identical else 'DIFFERENT'}"
                  + ("" if not outcome.problems else f"  PROBLEMS: {outcome.problems}"), flush=True)
        print(f"ctrl-c: {args.ctrl_c} runs, {args.ctrl_c - ctrl_c_bad} clean and bit-identical after resume",
              flush=True)
    return 1 if bad or ctrl_c_bad else 0


if __name__ == "__main__":
    sys.exit(main())
