"""lora's Trainer against PEFT + transformers.Trainer: one command, same model, data and LoRA settings, alternating.

    .venv/bin/python bench/compare.py                          # stdlib docstrings (varied lengths), 2 rounds
    .venv/bin/python bench/compare.py --task extract --stacks lora --rounds 1   # the bundled task, ours alone
    .venv/bin/python bench/compare.py --task extract --examples 400 --stacks lora --batch-size 2   # as the recipe
    python bench/compare.py --device cuda --model llama-1b       # on a GPU: bf16, a random ~1B Llama (gpu_check.py)

Each stack fine-tunes SmolLM2-135M-Instruct (LoRA r=16, alpha=32, every linear layer but the head, fp32 on CPU,
learning rate 1e-3, one epoch, prompt tokens masked) in its own process; the order alternates round by round, and
the machine's matmul peak (fp32 on CPU, bf16 on a GPU) is measured in a process of its own before every round.
On a GPU (``--device cuda``) both stacks train in bf16 mixed precision, memory is the peak CUDA allocation, and
``--model llama-1b`` is a randomly initialised Llama of about 1B parameters (hidden 2048, 16 layers, GQA 32/8,
SmolLM2's tokenizer): its loss means nothing, but the work per token is that of a real 1B model.

- PEFT + transformers.Trainer: its usual set-up, padded batches of 8 examples (DataCollatorForSeq2Seq).
- lora: the sft recipe's settings (packed 512-token rows), the whole epoch (no early stopping, no validation
  split: both stacks see every example once), with as many examples per optimizer step as PEFT's
  batch of 8: one row per micro-batch (``--batch-size``: more, as the sft recipe's 2), accumulated up to
  ``round(8 x mean example length / 512)`` rows (2 on the docstrings, whose examples average ~120 tokens), so both
  take about the same number of optimizer steps and their held-out losses can be compared.

Data (``--task``):
- ``docstrings`` (default): signature -> docstring pairs read from the Python standard library with ``inspect``,
  20 to 512 tokens each: real text of very different lengths, the case where padding costs most.
- ``extract``: the first ``--examples`` of the bundled extraction task (about 86 tokens each).

Printed per run: real (non-padding) tokens per second over the training loop, peak RSS, the mean token loss on
16 held-out examples after training (the same plain forward for both), and achieved FLOP/s as a share of the
matmul peak. The FLOPs are the work the task needs, the same count for both stacks: per real token 4x the
linear layers' weights (forward, plus the input gradient of the frozen base), the LoRA factors' 6 r (in + out),
causal attention within each example (3 x 2 x 2 x hidden x position: forward and twice that backward), and the
output head on answer tokens only (4 x hidden x vocab). Padding, masked positions and full-vocabulary logits that
a stack computes on top of that count as waste.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True)
R, ALPHA, LR = 16, 32, 1e-3
HELD_OUT = 16
STDLIB = ("argparse", "base64", "bisect", "calendar", "collections", "copy", "csv", "datetime", "difflib",
          "email.utils", "fnmatch", "fractions", "functools", "glob", "gzip", "heapq", "html", "inspect",
          "ipaddress", "json", "logging", "os.path", "pathlib", "pprint", "random", "shlex", "shutil", "statistics",
          "string", "tarfile", "tempfile", "textwrap", "typing", "urllib.parse", "uuid", "zipfile")


# -- data ------------------------------------------------------------------------------------------------------------
def docstring_records() -> list[dict]:
    """Every public function and method of the modules in STDLIB with a docstring of 40+ characters, as
    ``{"instruction", "input", "output"}`` records, in a fixed order."""
    import importlib

    records, seen = [], set()
    for name in STDLIB:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [(attr, obj)]
            if inspect.isclass(obj):
                members += [(f"{attr}.{m}", f) for m, f in sorted(vars(obj).items())
                            if not m.startswith("_") and inspect.isfunction(f)]
            for qualname, fn in members:
                doc = inspect.getdoc(fn) if inspect.isfunction(fn) else None
                if not doc or len(doc) < 40 or id(fn) in seen:
                    continue
                seen.add(id(fn))
                try:
                    signature = str(inspect.signature(fn))
                except (TypeError, ValueError):
                    continue
                records.append({"instruction": "Write the docstring of this Python function.",
                                "input": f"{name}.{qualname}{signature}", "output": doc})
    return records


def write_task(task: str, examples: int, folder: Path, tokenizer) -> tuple[Path, Path]:
    """Write ``train.jsonl`` (``examples`` records) and ``heldout.jsonl`` (HELD_OUT records) for the task."""
    if task == "extract":
        lines = (ROOT / "recipes" / "data" / "extract_train.jsonl").read_text().splitlines()
        train, heldout = lines[:examples], lines[-HELD_OUT:]
    else:
        from lora.data import render_chat, to_messages

        records = docstring_records()
        fits = [r for r in records
                if len(render_chat(tokenizer, to_messages(r, "alpaca"))) <= 512]  # whole examples only
        random.Random(0).shuffle(fits)
        if len(fits) < examples + HELD_OUT:
            raise SystemExit(f"only {len(fits)} stdlib docstrings fit 512 tokens; ask for fewer --examples")
        train = [json.dumps(r) for r in fits[:examples]]
        heldout = [json.dumps(r) for r in fits[examples:examples + HELD_OUT]]
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, lines in zip(paths, (train, heldout)):
        path.write_text("\n".join(lines) + "\n")
    return paths


def useful_flops(model, examples: list[dict], r: int) -> float:
    """The FLOPs training on ``examples`` needs (see the module docstring), whatever a stack wastes on top."""
    from torch import nn

    from lora.data import IGNORE

    cfg = model.config
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    weights = sum(m.in_features * m.out_features for m in linear)
    lora = sum(r * (m.in_features + m.out_features) for m in linear)
    attn_width = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    total = 0.0
    for ex in examples:
        n = len(ex["input_ids"])
        answer = sum(t != IGNORE for t in ex["targets"])
        total += n * (4 * weights + 6 * lora)
        total += cfg.num_hidden_layers * 3 * 2 * attn_width * n * (n + 1)  # QK^T and AV, causal, fwd + 2x bwd
        total += answer * 4 * cfg.hidden_size * cfg.vocab_size
    return total


# -- one stack in one process ----------------------------------------------------------------------------------------
def heldout_loss(model, examples: list[dict]) -> float:
    """Mean cross-entropy per answer token over ``examples``, one plain forward each."""
    import torch
    import torch.nn.functional as F

    from lora.data import IGNORE

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex["input_ids"]], device=device)).logits[0].float()
            targets = torch.tensor(ex["targets"], device=device)
            total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum"))
            count += int((targets != IGNORE).sum())
    return total / count


def load(model_name: str, device: str):
    """The model to fine-tune, on ``device``, and SmolLM2's tokenizer."""
    import torch

    import lora

    # fp32 weights on every device, as gpu_check.py: both trainers then run bf16 autocast over fp32 parameters
    # (load_model's GPU default, bf16 weights, would give PEFT bf16 LoRA weights and AdamW states)
    model, tokenizer = lora.load_model(MODEL, device=device, dtype=torch.float32)
    if model_name == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                             **LLAMA_1B)).to(device)
    return model, tokenizer


def run_stack(stack: str, train_file: str, heldout_file: str, out: str, model_name: str, device: str,
              batch_size: str = "1") -> dict:
    import resource

    import torch

    import lora
    from lora.data import load_dataset

    model, tokenizer = load(model_name, device)
    examples, _ = load_dataset(train_file, tokenizer, max_length=512)
    heldout, _ = load_dataset(heldout_file, tokenizer, max_length=512)
    real_tokens = sum(len(e["input_ids"]) for e in examples)
    flops = useful_flops(model, examples, R)
    if stack == "lora":
        from recipes.sft import SFT

        from lora.recipe import parse_settings

        rows_per_step = max(1, round(8 * real_tokens / len(examples) / 512))  # ~8 examples, as PEFT's batch
        grad_accum = max(1, round(rows_per_step / int(batch_size)))
        _, lora_cfg, train_cfg = parse_settings(SFT, [f"r={R}", f"alpha={ALPHA}", f"learning_rate={LR}",
                                                      f"output_dir={out}", "log_every=1000",
                                                      f"batch_size={batch_size}", f"grad_accum={grad_accum}",
                                                      "validation_split=0",
                                                      "early_stopping_patience=0"])  # the whole epoch, as PEFT
        torch.manual_seed(0)  # A starts random: seeded, so a round's held-out loss repeats
        lora.inject(model, lora_cfg)
        trainer = lora.Trainer(model, train_cfg, examples)
        start = time.perf_counter()  # set-up (probes included) above, as PEFT's is outside its timing
        result = trainer.train()
        seconds, steps = time.perf_counter() - start, result.steps
    else:
        import peft
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
        rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
                 "labels": [-100] + e["targets"][:-1]}  # transformers' convention: the model shifts the labels
                for e in examples]
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, num_train_epochs=1, learning_rate=LR,
                                 lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=1000,
                                 save_strategy="no", report_to=[], use_cpu=device == "cpu", bf16=device == "cuda",
                                 dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        start = time.perf_counter()
        trainer.train()
        seconds, steps = time.perf_counter() - start, trainer.state.global_step
    # training's peak (the held-out loss below is lighter)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_second": real_tokens / seconds, "seconds": seconds, "peak_rss": peak, "steps": steps,
            "flops_per_second": flops / seconds, "heldout_loss": heldout_loss(model, heldout)}


def matmul_peak(device: str) -> float:
    """The best FLOP/s of large square matrix products on this machine, now: fp32 on the CPU (torch's default
    threads), bf16 on a GPU."""
    import torch

    cuda = device == "cuda"
    best = 0.0
    for n in (4096, 8192) if cuda else (1024, 2048, 3072):
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16 if cuda else torch.float32) for _ in "ab")
        a @ b  # warm-up
        reps = max(2, int((2e13 if cuda else 3e10) / (2 * n ** 3)))
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


# -- the driver ------------------------------------------------------------------------------------------------------
def child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.rsplit("RESULT", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("docstrings", "extract"), default="docstrings")
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stacks", default="peft,lora", help="comma-separated: peft, lora")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=(MODEL, "llama-1b"), default=MODEL)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="ours: packed rows per micro-batch (the sft recipe uses 2); accumulation keeps about 8 "
                             "examples per optimizer step")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        result = {"peak": matmul_peak(*rest)} if what == "peak" else run_stack(what, *rest)
        print("RESULT", json.dumps(result))
        return

    import torch

    import lora

    stacks = args.stacks.split(",")
    folder = Path(tempfile.mkdtemp(prefix="lora-compare-"))
    _, tokenizer = lora.load_model(MODEL)  # converts the embedded model once, before any timing
    train_file, heldout_file = write_task(args.task, args.examples, folder, tokenizer)
    runs: dict[str, list[dict]] = {s: [] for s in stacks}
    peaks = []
    for round_ in range(args.rounds):
        peaks.append(child("--child", "peak", args.device)["peak"])
        for stack in stacks if round_ % 2 == 0 else stacks[::-1]:
            r = child("--child", stack, str(train_file), str(heldout_file), str(folder / f"{stack}-{round_}"),
                      args.model, args.device, str(args.batch_size))
            r["mfu"] = r["flops_per_second"] / peaks[-1]
            runs[stack].append(r)
            print(f"round {round_ + 1} {stack}: {r['tokens_per_second']:.1f} real tokens/s, "
                  f"{r['peak_rss'] / 1e9:.2f} GB, held-out loss {r['heldout_loss']:.4f}, {r['steps']} steps, "
                  f"{r['mfu']:.0%} of the {peaks[-1] / 1e9:.0f} GFLOP/s matmul peak", flush=True)

    precision = "bf16 on " + torch.cuda.get_device_name() if args.device == "cuda" else f"fp32 on {os.cpu_count()} CPU cores"
    print(f"\n{args.task}: {args.examples} examples, {args.model}, LoRA r={R} all-linear, {precision}, "
          f"{args.rounds} round(s), matmul peak {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s")
    memory = "CUDA memory" if args.device == "cuda" else "RSS"
    print(f"| stack | real tokens/s | peak {memory} | held-out loss | steps | share of matmul peak |")
    print("|---|---|---|---|---|---|")
    for stack, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_second", "peak_rss", "heldout_loss", "mfu")}
        print(f"| {stack} | {med['tokens_per_second']:.1f} | {med['peak_rss'] / 1e9:.2f} GB | "
              f"{med['heldout_loss']:.3f} | {rs[0]['steps']} | {med['mfu']:.0%} |")
    if {"peft", "lora"} <= set(stacks):
        for i in range(args.rounds):
            ours, theirs = runs["lora"][i], runs["peft"][i]
            print(f"round {i + 1}: speed {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x, memory "
                  f"{ours['peak_rss'] / theirs['peak_rss']:.2f}x, held-out loss {ours['heldout_loss']:.3f} vs "
                  f"{theirs['heldout_loss']:.3f}")


if __name__ == "__main__":
    main()
