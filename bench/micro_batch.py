"""What one training micro-batch costs, lever by lever (issue 10's per-token cost), on the recipe's defaults.

One micro-batch of two 512-token packed rows of the bundled task (filled as the whole file's rows are on average),
run as the trainer runs it: one row without the padding tails. The embedded SmolLM2 with the sft recipe's adapter
(r=16 on every linear layer), forward and backward through the trainer's own ``BatchLoss``, timed in one process
with the variants alternating each round:

- ``threads``: torch's default thread count against one thread;
- ``branch``: adapters on against adapters off, with the frozen base's input gradients still computed, which
  is what the low-rank branch adds to a micro-batch;
- ``tails``: the two rows as one row without their padding tails (:func:`lora.data.join_rows`) against the
  rows as they are, tails included;
- ``fused-a``: for one layer's q/k/v, the three rank-r A projections of one input against one projection to 3r
  outputs, split (what fusing them would save per layer, forward and backward);
- ``compile`` (only when named: its compilation takes minutes here): every decoder layer compiled by
  ``torch.compile`` (CPU inductor, dynamic shapes; the per-example attention stays eager, where dynamo breaks the
  graph) against the eager layers, timed over the file's first six micro-batches, with the compilation's time.

    python bench/micro_batch.py [--rounds 2] [--levers threads,branch,tails,fused-a,compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora  # noqa: E402
from lora.train.attention import packed_rows, use_packed_attention  # noqa: E402
from lora.data import collate, join_rows, load_dataset, pack  # noqa: E402
from lora.inject import disabled  # noqa: E402
from lora.train.objective import BatchLoss  # noqa: E402


def seconds(fn, reps: int = 2) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def fused_a(rounds: int, tokens: int = 1024, hidden: int = 576, r: int = 16) -> None:
    x = torch.randn(tokens, hidden, requires_grad=True)
    factors = [torch.randn(r, hidden, requires_grad=True) for _ in range(3)]
    grads = [torch.randn(tokens, r) for _ in range(3)]

    def separate():
        torch.autograd.backward([F.linear(x, a) for a in factors], grads)

    def fused():
        torch.autograd.backward(F.linear(x, torch.cat(factors)).split(r, -1), grads)

    for i in range(rounds):
        for name, fn in (("separate", separate), ("fused", fused))[::1 if i % 2 == 0 else -1]:
            print(f"fused-a round {i}: {name} {seconds(fn, 50) * 1e3:.2f} ms per layer", flush=True)


def compiled_layers(model, micro_batch, sample: list[dict], rounds: int) -> None:
    """Eager decoder layers against the same layers compiled, swapped in and out of the model's layer list."""
    layers = model.model.layers
    eager = list(layers)
    compiled = [torch.compile(layer, dynamic=True) for layer in eager]

    def use(chosen: list) -> None:
        for i, layer in enumerate(chosen):
            layers[i] = layer

    def per_micro_batch() -> float:
        start = time.perf_counter()
        for batch in sample:
            micro_batch(batch=batch)
        return (time.perf_counter() - start) / len(sample)

    use(compiled)
    start = time.perf_counter()
    per_micro_batch()  # compiles (dynamic shapes after the first distinct length)
    print(f"compile: {time.perf_counter() - start:.0f} s for the first {len(sample)} micro-batches "
          f"(compilation included)", flush=True)
    for i in range(rounds):
        for name, chosen in (("compiled", compiled), ("eager", eager))[::1 if i % 2 == 0 else -1]:
            use(chosen)
            print(f"compile round {i}: {name:8s} {per_micro_batch():.2f} s per micro-batch", flush=True)
    use(eager)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    known = ("threads", "branch", "tails", "fused-a", "compile")
    parser.add_argument("--levers", default=",".join(known[:-1]), help="which levers, comma-separated")
    args = parser.parse_args()
    levers = args.levers.split(",")
    if set(levers) - set(known):
        parser.error(f"unknown lever(s) {sorted(set(levers) - set(known))}; choose from {', '.join(known)}")

    model, tokenizer = lora.load_model("smollm2-135m")
    torch.manual_seed(0)
    lora.inject(model, lora.LoraConfig(r=16, alpha=32))
    use_packed_attention(model)
    model.enable_input_require_grads()  # with adapters off, the base's input gradients still run
    examples, _ = load_dataset(ROOT / "recipes" / "data" / "extract_train.jsonl", tokenizer, max_length=512)
    rows = pack(examples, 512, 0)
    mean_fill = sum(r["real_tokens"] for r in rows) / len(rows)
    pair = min(zip(rows, rows[1:]), key=lambda p: abs(p[0]["real_tokens"] + p[1]["real_tokens"] - 2 * mean_fill))
    batches = {"joined": collate([join_rows(pair)], 0), "rows": collate(list(pair), 0)}
    print(f"micro-batch: rows of {pair[0]['real_tokens']} and {pair[1]['real_tokens']} real tokens "
          f"(the file's rows average {mean_fill:.0f} of 512)", flush=True)
    objective = BatchLoss(model, "lm", loss_chunk=4096)
    objective.parts = objective.candidate  # the label-only head, as training uses it on this model

    def micro_batch(adapters_on: bool = True, shape: str = "joined", batch: dict | None = None) -> None:
        with packed_rows(True), (torch.enable_grad() if adapters_on else disabled(model)):
            objective(batches[shape] if batch is None else batch).backward()
        model.zero_grad(set_to_none=True)

    default_threads = torch.get_num_threads()
    for i in range(args.rounds if "threads" in levers else 0):
        for threads in (default_threads, 1)[::1 if i % 2 == 0 else -1]:
            torch.set_num_threads(threads)
            print(f"threads round {i}: {threads} thread(s) {seconds(micro_batch):.2f} s per micro-batch", flush=True)
    torch.set_num_threads(default_threads)
    for i in range(args.rounds if "branch" in levers else 0):
        for on in (True, False)[::1 if i % 2 == 0 else -1]:
            print(f"branch round {i}: adapters {'on ' if on else 'off'} {seconds(lambda: micro_batch(on)):.2f} s "
                  f"per micro-batch", flush=True)
    for i in range(args.rounds if "tails" in levers else 0):
        for shape in ("joined", "rows")[::1 if i % 2 == 0 else -1]:
            print(f"tails round {i}: {shape:6s} {seconds(lambda: micro_batch(shape=shape)):.2f} s per micro-batch",
                  flush=True)
    if "fused-a" in levers:
        fused_a(args.rounds)
    if "compile" in levers:
        compiled_layers(model, micro_batch, [collate([join_rows(rows[i:i + 2])], 0) for i in range(0, 12, 2)],
                        args.rounds)


if __name__ == "__main__":
    main()
