"""How the cost grows with model size and context length: lora against PEFT + transformers.Trainer, cell by cell.

    .venv/bin/python bench/scaling.py                                    # every cell of both tables (hours on CPU)
    .venv/bin/python bench/scaling.py --tables length --sizes 135m --lengths 512,2048 --steps 2
    .venv/bin/python bench/scaling.py --tables size --sizes 1.7b --lengths 2048 --checkpointing on --bases nf4
    .venv/bin/python bench/scaling.py --report runs/scaling.jsonl        # the tables from earlier runs, nothing run
    python bench/scaling.py --device cuda                                # on a GPU: bf16 autocast, 24 GB cap

The cells (``--tables``; ``--sizes``, ``--lengths``, ``--checkpointing``, ``--bases`` keep only the cells they
name):
- ``size``: the embedded SmolLM2-135M and random-weight models of the same family's real shapes, SmolLM2-360M
  (hidden 960, 32 layers, 15/5 heads, MLP 2560) and SmolLM2-1.7B (hidden 2048, 24 layers, 32/32 heads, MLP 8192),
  built from a config (nothing downloaded), at 512 tokens per example; the 1.7B shape also with the NF4 base, and
  at 2,048 tokens with gradient checkpointing (fp32 and NF4 bases).
- ``length``: 512, 2,048 and 8,192 tokens per example on the 135M and 360M shapes, with and without gradient
  checkpointing.

In every cell both stacks train ``--steps`` optimizer steps of LoRA r=16, alpha=32 on every linear layer but the
head (lr 1e-3, fp32 on CPU) on the same examples: real text (the Python standard library's source, SmolLM2's
tokenizer) cut into examples of exactly the cell's length, every position a target (long-document training, where
the output head costs most), ``max(1, --tokens-per-step / length)`` examples per step and micro-batch. Equal
lengths leave nothing to pad or pack: the cells measure the cost per token itself (bench/compare.py measures what
padding costs on varied lengths). PEFT + Trainer runs its usual set-up (batches of those examples; with
checkpointing, ``gradient_checkpointing=True``, non-reentrant); ours runs ``lora.Trainer`` with
``TrainConfig(gradient_checkpointing=...)``. The NF4 base is :func:`lora.models.quantize_nf4` (torchao's NF4) for both:
PEFT wraps the same 4-bit linear layers (bitsandbytes, PEFT's usual QLoRA route, has no CPU kernels).

Every run is a process of its own, so its peak RSS is its own, and one that runs out of memory ends only itself:
the child caps its address space (``RLIMIT_AS``: what it had mapped after its imports plus ``--memory-limit``) and
the parent kills it if its RSS passes the limit; either way the cell reads "does not fit" with the RSS it reached.
On a GPU ``--memory-limit`` caps the CUDA allocator (default 24 GB: a 24 GB card on any larger one).

Printed per run: real tokens per second over the timed steps (all steps after the first, which warms up; the first
alone with ``--steps 1``), peak RSS (the whole process: building the model, set-up and training), the peak before
training started, and the share of the matmul peak (bench/compare.py's FLOP count and measurement); then per cell
the ratios ours / PEFT. ``--results FILE`` appends every run to a JSON-lines file; ``--report FILE`` prints the
tables from such a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from compare import ALPHA, LR, MODEL, R, useful_flops  # noqa: E402  (the same LoRA settings and FLOP count)

GB = 1e9
# The real SmolLM2 shapes (their config.json files); everything else is the embedded 135M's config.
SHAPES = {
    "135m": None,
    "360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                 intermediate_size=2560, head_dim=64),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=8192, head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 130000.0}),
}


@dataclasses.dataclass(frozen=True)
class Cell:
    table: str
    size: str
    length: int
    checkpointing: bool
    base: str  # "fp32" (the model's dtype) or "nf4"

    @property
    def key(self) -> str:
        return f"{self.size}/{self.length}/{'ckpt' if self.checkpointing else 'no-ckpt'}/{self.base}"


def all_cells() -> list[Cell]:
    size = [Cell("size", s, 512, False, "fp32") for s in SHAPES] + [Cell("size", "1.7b", 512, False, "nf4")]
    size += [Cell("size", "1.7b", 2048, True, base) for base in ("fp32", "nf4")]
    length = [Cell("length", s, n, ckpt, "fp32") for s in ("135m", "360m") for n in (512, 2048, 8192)
              for ckpt in (False, True)]
    return size + length


# -- one run in one process ------------------------------------------------------------------------------------------
def real_tokens(tokenizer, count: int) -> list[int]:
    """``count`` tokens of real text: the standard library's source files in name order, tokenized one by one."""
    import inspect

    stream: list[int] = []
    for path in sorted(Path(inspect.__file__).parent.glob("*.py")):
        stream += tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(stream) >= count:
            return stream[:count]
    raise SystemExit(f"the standard library holds fewer than {count} tokens")


def build_model(size: str, base: str, device: str):
    """The cell's model in fp32 on ``device`` (random weights for the built shapes), NF4 base if asked, and the
    tokenizer."""
    import torch

    import lora

    if SHAPES[size] is None:
        model, tokenizer = lora.load_model(MODEL, device=device, dtype=torch.float32)
    else:
        from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

        from lora.models import converted_folder

        folder = converted_folder(MODEL)  # the embedded model's config and tokenizer: the family's
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
        for key, value in SHAPES[size].items():
            setattr(config, key, value)
        config.dtype = torch.float32
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        model.eval()
    if base == "nf4":
        from lora.models import quantize_nf4

        quantize_nf4(model)
    return model, tokenizer


def run(stack: str, cell: Cell, steps: int, tokens_per_step: int, device: str, out: str, limit: float,
        threads: int | None = None) -> dict:
    import torch

    cuda = device == "cuda"
    if threads:
        torch.set_num_threads(threads)
    if cuda and limit:
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / torch.cuda.get_device_properties(0).total_memory))
    elif limit:
        # the address space mapped now (libraries, the interpreter) plus the limit: an allocation past it fails
        # here, in this process, as an out-of-memory error, before the machine runs short
        import psutil

        mapped = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (int(mapped + limit), resource.RLIM_INFINITY))

    def peak() -> int:
        if cuda:
            return int(torch.cuda.max_memory_allocated())
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    result = {"stack": stack, "cell": dataclasses.asdict(cell), "steps": steps, "device": device}
    try:
        model, tokenizer = build_model(cell.size, cell.base, device)
        per_step = max(1, tokens_per_step // cell.length)
        stream = real_tokens(tokenizer, steps * per_step * cell.length + 1)
        examples = [{"input_ids": stream[i:i + cell.length], "targets": stream[i + 1:i + cell.length + 1]}
                    for i in range(0, steps * per_step * cell.length, cell.length)]
        flops_per_step = useful_flops(model, examples[:per_step], R)
        stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time) at the end of every step

        def clock() -> tuple[float, float]:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter(), time.process_time()

        if stack == "lora":
            import lora
            from lora.train import TrainConfig, Trainer

            torch.manual_seed(0)
            lora.inject(model, lora.LoraConfig(r=R, alpha=ALPHA))
            cfg = TrainConfig(learning_rate=LR, batch_size=per_step, max_steps=steps, seq_len=cell.length,
                              gradient_checkpointing=cell.checkpointing, output_dir=out, log_every=1000)
            trainer = Trainer(model, cfg, examples, callbacks=[lambda *_: stamps.append(clock())])
            result["setup_peak"] = peak()
            start = clock()
            trainer.train()
        else:
            import peft
            from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

            class Stamps(TrainerCallback):
                def on_step_end(self, *args, **kwargs):
                    stamps.append(clock())

            torch.manual_seed(0)
            model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
            rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * cell.length, "labels": e["input_ids"]}
                    for e in examples]  # transformers shifts the labels itself
            args = TrainingArguments(output_dir=out, per_device_train_batch_size=per_step, max_steps=steps,
                                     learning_rate=LR, lr_scheduler_type="cosine", logging_steps=1000,
                                     save_strategy="no", report_to=[], use_cpu=not cuda, bf16=cuda,
                                     dataloader_num_workers=0, gradient_checkpointing=cell.checkpointing,
                                     gradient_checkpointing_kwargs={"use_reentrant": False})
            trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Stamps()],
                              data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
            result["setup_peak"] = peak()
            start = clock()
            trainer.train()
        first = stamps[0] if len(stamps) >= 2 else start
        timed = len(stamps) - 1 if len(stamps) >= 2 else 1
        seconds, cpu_seconds = stamps[-1][0] - first[0], stamps[-1][1] - first[1]
        tokens = timed * per_step * cell.length
        result.update(fits=True, tokens_per_second=tokens / seconds, seconds=seconds, timed_steps=timed,
                      tokens_per_cpu_second=tokens / cpu_seconds, threads=torch.get_num_threads(),
                      flops_per_second=timed * flops_per_step / seconds, peak=peak(),
                      tokens_per_step=per_step * cell.length)
    except (MemoryError, RuntimeError) as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
        text = str(error)
        if not isinstance(error, MemoryError) and "memory" not in text.lower():
            raise
        result.update(fits=False, peak=peak(), error=text.splitlines()[0][:200])
    return result


# -- the driver ------------------------------------------------------------------------------------------------------
def watch(args: list[str], limit: float) -> tuple[int, str, str, int]:
    """Run a child; kill it if its RSS passes ``limit`` bytes (CPU). Returns (returncode, stdout, stderr, highest
    RSS seen)."""
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=out, stderr=err, text=True)
        watched, highest = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                highest = max(highest, watched.memory_info().rss)
            except psutil.Error:
                pass
            if limit and highest > limit:
                proc.kill()
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), highest


def child(stack: str, cell: Cell, steps: int, tokens_per_step: int, device: str, out: Path, limit: float,
          threads: int | None) -> dict:
    spec = json.dumps({"stack": stack, "cell": dataclasses.asdict(cell), "steps": steps, "threads": threads,
                       "tokens_per_step": tokens_per_step, "device": device, "out": str(out), "limit": limit})
    code, stdout, stderr, highest = watch(["--child", spec], limit if device == "cpu" else 0)
    if "RESULT" in stdout:
        return json.loads(stdout.rsplit("RESULT", 1)[1])
    if code in (-9, 137):  # killed: by the watchdog above, or by the kernel's OOM killer
        return {"stack": stack, "cell": dataclasses.asdict(cell), "steps": steps, "device": device, "fits": False,
                "peak": highest, "error": f"killed at {highest / GB:.1f} GB RSS (limit {limit / GB:.1f} GB)"}
    raise SystemExit(f"{stack} {cell.key} failed (exit {code}):\n{stderr[-3000:]}")


def fmt_memory(r: dict) -> str:
    return f"{r['peak'] / GB:.2f} GB" if r["fits"] else f"does not fit (>{r['peak'] / GB:.1f} GB)"


def report(results: list[dict]) -> str:
    """The two tables, ours against PEFT per cell (the newest run of each stack and cell)."""
    by_cell: dict[Cell, dict[str, dict]] = {}
    for r in results:
        by_cell.setdefault(Cell(**r["cell"]), {})[r["stack"]] = r
    lines = []
    for table in ("size", "length"):
        rows = sorted((c for c in by_cell if c.table == table),
                      key=lambda c: (list(SHAPES).index(c.size), c.length, c.base, c.checkpointing))
        if not rows:
            continue
        lines += [f"\n{table} table",
                  "| model | tokens/example | checkpointing | base | PEFT tokens/s (per CPU s) "
                  "| ours tokens/s (per CPU s) | speed (CPU time) | PEFT peak RSS | ours peak RSS | memory | share of matmul peak PEFT / ours |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for cell in rows:
            peft, ours = by_cell[cell].get("peft"), by_cell[cell].get("lora")

            def speed(r: dict | None) -> str:
                if r is None:
                    return "-"
                return f"{r['tokens_per_second']:.1f} ({r['tokens_per_cpu_second']:.1f})" if r["fits"] else "OOM"

            both = bool(peft and ours and peft["fits"] and ours["fits"])
            ratio = (f"{ours['tokens_per_second'] / peft['tokens_per_second']:.2f}x "
                     f"({ours['tokens_per_cpu_second'] / peft['tokens_per_cpu_second']:.2f}x)") if both else "-"
            memory = (f"{ours['peak'] / peft['peak']:.2f}x" if both else
                      f"< {ours['peak'] / peft['peak']:.2f}x" if peft and ours and ours["fits"] else "-")
            mfu = " / ".join(f"{r['mfu']:.0%}" if r and r["fits"] and "mfu" in r else "-" for r in (peft, ours))
            lines.append(f"| {cell.size} | {cell.length} | {'on' if cell.checkpointing else 'off'} | {cell.base} | "
                         f"{speed(peft)} | {speed(ours)} | {ratio} | {fmt_memory(peft) if peft else '-'} | "
                         f"{fmt_memory(ours) if ours else '-'} | {memory} | {mfu} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="size,length")
    parser.add_argument("--sizes", help="comma-separated, of: " + ", ".join(SHAPES))
    parser.add_argument("--lengths", help="comma-separated tokens per example, of: 512, 2048, 8192")
    parser.add_argument("--checkpointing", help="comma-separated: off, on")
    parser.add_argument("--bases", help="comma-separated: fp32, nf4")
    parser.add_argument("--stacks", default="peft,lora", help="comma-separated: peft, lora")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--tokens-per-step", type=int, default=2048,
                        help="real tokens per optimizer step (and micro-batch): max(1, this / length) examples")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's own)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="GB per run (default: CPU 22 or what the machine has free less 1.5; GPU 24)")
    parser.add_argument("--results", help="append every run to this JSON-lines file")
    parser.add_argument("--report", help="print the tables of a --results file and stop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        result = run(spec["stack"], Cell(**spec["cell"]), spec["steps"], spec["tokens_per_step"], spec["device"],
                     spec["out"], spec["limit"], spec["threads"])
        print("RESULT", json.dumps(result))
        return
    if args.report:
        print(report([json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]))
        return

    import psutil

    def chosen(value: str | None, parse=str) -> set | None:
        return None if value is None else {parse(v) for v in value.split(",")}

    sizes, lengths = chosen(args.sizes), chosen(args.lengths, int)
    ckpts = chosen(args.checkpointing, lambda v: {"on": True, "off": False}[v])
    bases, tables = chosen(args.bases), set(args.tables.split(","))
    cells = [c for c in all_cells() if c.table in tables and (sizes is None or c.size in sizes)
             and (lengths is None or c.length in lengths) and (ckpts is None or c.checkpointing in ckpts)
             and (bases is None or c.base in bases)]
    if not cells:
        raise SystemExit("no cell matches those filters; see --help for the cells of each table")
    if args.memory_limit is not None:
        limit = args.memory_limit * GB
    elif args.device == "cuda":
        limit = 24 * GB
    else:
        limit = min(22 * GB, psutil.virtual_memory().available - 1.5 * GB)
    import lora
    from compare import child as compare_child

    lora.load_model(MODEL)  # converts the embedded model once, before any run
    matmul = compare_child("--child", "peak", args.device)["peak"]
    print(f"{len(cells)} cell(s) x {args.stacks}, {args.steps} steps each, limit {limit / GB:.1f} GB per run, "
          f"matmul peak {matmul / 1e9:.0f} GFLOP/s", flush=True)
    stacks = args.stacks.split(",")
    folder = Path(tempfile.mkdtemp(prefix="lora-scaling-"))
    results, done = [], {}
    for i, cell in enumerate(cells):
        for stack in stacks if i % 2 == 0 else stacks[::-1]:  # alternate which stack runs first
            if (stack, cell.key) in done:  # a cell both tables hold (e.g. 135m at 512) runs once
                r = dict(done[stack, cell.key], cell=dataclasses.asdict(cell))
            else:
                r = done[stack, cell.key] = child(stack, cell, args.steps, args.tokens_per_step, args.device,
                                                  folder / f"{stack}-{i}", limit, args.threads)
                if r["fits"]:
                    r["mfu"] = r["flops_per_second"] / matmul
                    print(f"{cell.key} {stack}: {r['tokens_per_second']:.1f} real tokens/s "
                          f"({r['tokens_per_cpu_second']:.1f} per CPU second), peak {r['peak'] / GB:.2f} GB "
                          f"(before training {r['setup_peak'] / GB:.2f} GB), {r['mfu']:.0%} of the matmul peak",
                          flush=True)
                else:
                    print(f"{cell.key} {stack}: does not fit: {r['error']}", flush=True)
                r["load"] = os.getloadavg()[0]
            results.append(r)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
