"""Tokenizing training data: the loader before issue 19 against lora.data.load_dataset now, and a million records
tokenized, cached and trained on.

    python bench/tokenize_speed.py                      # throughput on the bundled 1,100 Alpaca records
    python bench/tokenize_speed.py scale --records 1000000 --work /tmp/tok1m

``speed``: the 1,000 training and 100 held-out records of the bundled extraction task (Alpaca layout) as one
file, tokenized for SmolLM2-135M (its chat template) by the loader as it was before issue 19 (reproduced below: each
record rendered and tokenized one at a time by ``tokenize_chat``, the tokens kept as Python lists) and by
``load_dataset`` (batched, compact; cache off, then a second call reading the cache). Both must give the same
tokens. Reports wall and CPU seconds, tokens per second, and the memory each keeps per token.

``scale``: a generated Alpaca set of ``--records`` records (short answers, varied prompts) is tokenized, cached
and trained on for 3 steps, each run in a fresh process: a baseline run on 1,000 records (the model's own peak
RSS), a first run on the whole set (tokenizes and writes the cache) and a second identical run (reads it).
Reports each run's peak RSS, how long tokenization took, and how long after the process started its first
training step ended.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "lora" / "recipes" / "data"


def legacy_load(path, tokenizer) -> tuple[list[dict], int]:
    """The loader before issue 19, as it tokenized (lora/data.py at b967dd0): per record, tokenize_chat renders and
    tokenizes the prompt and the conversation, and the example keeps Python lists."""
    from lora.data import IGNORE, to_messages, tokenize_chat
    from lora.data.sources import read_records

    fmt, records, _ = read_records(path, None)
    examples, tokens = [], 0
    for record in records:
        ids, labels = tokenize_chat(tokenizer, to_messages(record, fmt))
        examples.append({"input_ids": ids, "targets": labels[1:] + [IGNORE]})
        tokens += len(ids)
    return examples, tokens


def timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def kept_bytes(call) -> tuple[object, int]:
    """``call()``'s result and the bytes it still holds (traced Python allocations; numpy's are traced too)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    result = call()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return result, after - before


def speed(repeats: int) -> dict:
    import tempfile

    import lora
    from lora.data import load_dataset

    _, tokenizer = lora.load_model("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="tokenize-speed-"))
    path = work / "alpaca_1100.jsonl"
    path.write_text((DATA / "extract_train.jsonl").read_text() + (DATA / "extract_eval.jsonl").read_text())
    best = {}
    for _ in range(repeats):
        (old, tokens), wall, cpu = timed(lambda: legacy_load(path, tokenizer))
        best["before"] = min(best.get("before", (1e9, 0)), (wall, cpu))
        (new, stats), wall, cpu = timed(lambda: load_dataset(path, tokenizer, cache=False))
        best["after"] = min(best.get("after", (1e9, 0)), (wall, cpu))
        assert [dict(e) for e in new] == old and stats.tokens == tokens, "the loaders disagree"
    load_dataset(path, tokenizer, cache=work / "cache")
    (_, stats), wall, cpu = timed(lambda: load_dataset(path, tokenizer, cache=work / "cache"))
    assert stats.cached
    best["cache read"] = (wall, cpu)
    _, old_bytes = kept_bytes(lambda: legacy_load(path, tokenizer)[0])
    _, new_bytes = kept_bytes(lambda: load_dataset(path, tokenizer, cache=False)[0])
    report = {"records": 1100, "tokens": tokens, "cores": os.cpu_count(), "load_average": os.getloadavg()[0]}
    for name, (wall, cpu) in best.items():
        report[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "tokens_per_s": round(tokens / wall)}
    report["speedup_wall"] = round(best["before"][0] / best["after"][0], 1)
    report["bytes_per_token"] = {"before": round(old_bytes / tokens, 1), "after": round(new_bytes / tokens, 1)}
    return report


# -- scale ------------------------------------------------------------------------------------------------------------
def generate(path: Path, records: int, seed: int = 0) -> None:
    """Alpaca records of a few kinds of small tasks, with varied numbers and words (about 55 tokens each with
    SmolLM2's template, which adds its system prompt)."""
    rng = random.Random(seed)
    words = ["lamp", "desk", "chair", "monitor", "cable", "phone", "kettle", "book", "shelf", "clock"]
    cities = ["Oslo", "Lisbon", "Seville", "Porto", "Lyon", "Graz", "Turin", "Ghent"]
    with path.open("w") as f:
        for i in range(records):
            kind = i % 3
            if kind == 0:
                a, b = rng.randint(1, 999), rng.randint(1, 999)
                record = {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)}
            elif kind == 1:
                order = f"{rng.choice('ABCDEFGH')}{rng.choice('KLMNOPQR')}-{rng.randint(10000, 99999)}"
                record = {"instruction": "Extract the order number.",
                          "input": f"My {rng.choice(words)} (order {order}) arrived broken in "
                                   f"{rng.choice(cities)}.", "output": order}
            else:
                w = rng.sample(words, 3)
                record = {"instruction": "Reply with the last word.", "input": " ".join(w), "output": w[-1]}
            f.write(json.dumps(record) + "\n")


def child(data: str, cache: str, steps: int) -> None:
    """One run, as a recipe would make it: load the model, the data (timed), train ``steps`` steps."""
    started = float(os.environ["BENCH_STARTED"])
    import lora
    from lora.data import load_dataset

    model, tokenizer = lora.load_model("smollm2-135m")
    t0 = time.perf_counter()
    train, stats = load_dataset(data, tokenizer, max_length=256, cache=Path(cache))
    load_s = time.perf_counter() - t0
    lora.inject(model, lora.LoraConfig(r=8, alpha=16))
    first_step = []

    def on_step(trainer, step, metrics):
        if not first_step:
            first_step.append(time.time() - started)

    cfg = lora.TrainConfig(output_dir=str(Path(cache).parent / f"run-{os.getpid()}"), max_steps=steps, batch_size=1,
                           grad_accum=1, seq_len=256, log_every=1)
    trainer = lora.Trainer(model, cfg, train, callbacks=[on_step])
    trainer.train()
    print(json.dumps({"examples": len(train), "tokens": stats.tokens, "cached": stats.cached,
                      "load_data_s": round(load_s, 2), "tokens_per_s": round(stats.tokens / load_s),
                      "first_step_after_start_s": round(first_step[0], 2),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def run_child(data: Path, cache: Path, steps: int) -> dict:
    env = {**os.environ, "BENCH_STARTED": repr(time.time()), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "child", str(data), str(cache), str(steps)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scale(records: int, work: Path, steps: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    data, small = work / f"alpaca_{records}.jsonl", work / "alpaca_1000.jsonl"
    if not data.exists():
        generate(data, records)
    generate(small, 1000)
    cache = work / "cache"
    report = {"records": records, "file_mib": round(data.stat().st_size / 1024**2), "cores": os.cpu_count()}
    report["baseline (1,000 records)"] = run_child(small, cache, steps)
    for name in ("first run (tokenizes, writes the cache)", "second run (reads the cache)"):
        report[name] = run_child(data, cache, steps)
        report[name]["peak_rss_above_baseline_mib"] = (report[name]["peak_rss_mib"]
                                                       - report["baseline (1,000 records)"]["peak_rss_mib"])
    return report


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        return child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("speed", "scale"), default="speed")
    parser.add_argument("--repeats", type=int, default=3, help="speed: best of this many")
    parser.add_argument("--records", type=int, default=1_000_000, help="scale: records to generate")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-tokenize-scale"), help="scale: a folder")
    parser.add_argument("--steps", type=int, default=3, help="scale: training steps per run")
    args = parser.parse_args()
    report = speed(args.repeats) if args.mode == "speed" else scale(args.records, args.work, args.steps)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
