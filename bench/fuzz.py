"""Fuzz the parsers of user input with many cases: the properties of tests/reliability/fuzz_targets.py (the CI test
runs a few hundred of them), here 10,000 per target by default, with a fresh seed unless one is given.

    .venv/bin/python bench/fuzz.py                        # 10,000 cases per target
    .venv/bin/python bench/fuzz.py --cases 500 --targets jsonl recipe_settings --seed 1

Prints, per target, the cases run, the time, and every kind of failure found (an exception other than our own
clear ValueError, a hang, a big allocation) with how often it came up and the first input that showed it. Exits 1
if any target failed.
"""

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import fuzz_targets  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="inputs per target (default 10,000)")
    parser.add_argument("--targets", nargs="+", choices=sorted(fuzz_targets.TARGETS),
                        default=list(fuzz_targets.TARGETS))
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random)")
    args = parser.parse_args()

    failed = False
    for name in args.targets:
        found: collections.Counter = collections.Counter()
        first: dict[str, tuple[str, str]] = {}

        def on_failure(failure, value, found=found, first=first, name=name):
            found[failure.signature] += 1
            first.setdefault(failure.signature, (str(failure), fuzz_targets.describe(name, value)))

        start = time.perf_counter()
        ran = fuzz_targets.run(name, args.cases, seed=args.seed, on_failure=on_failure)
        seconds = time.perf_counter() - start
        bad = sum(found.values())
        print(f"{name}: {ran} cases in {seconds:.0f} s ({ran / seconds:.0f}/s), {bad} failing, "
              f"{len(found)} distinct failure(s)", flush=True)
        for signature, count in found.most_common():
            message, value = first[signature]
            print(f"  {count:6d} x {signature}\n           {message[:400]}\n           first input: {value[:400]}")
        failed |= bad > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
