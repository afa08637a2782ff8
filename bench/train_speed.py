"""Training throughput and peak memory: lora's Trainer vs. PEFT + transformers.Trainer, same run settings.

    .venv/bin/python bench/train_speed.py --examples 160

Both fine-tune SmolLM2-135M-Instruct with LoRA r=16/alpha=32 on every linear layer except the head, fp32 on CPU,
on the first N bundled extraction examples (prompt tokens masked), one epoch, about 8 examples per optimizer step,
learning rate 1e-3. PEFT + Trainer gets the usual set-up: padded batches of 8 examples (DataCollatorForSeq2Seq).
lora packs the examples into 704-token rows (about 8 of these ~86-token examples each), one row per step. Each
stack runs in its own process; "real tokens" excludes padding. Reported: real tokens per second over the training
loop, and the process's peak RSS.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = """
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
import lora
from lora.data import load_dataset
model, tok = lora.load_model("smollm2-135m")
examples, stats = load_dataset({data!r}, tok, max_length=512)
examples = examples[:{n}]
real_tokens = sum(len(e["input_ids"]) for e in examples)
"""

OURS = COMMON + """
from lora.trainer import Trainer, TrainConfig
lora.inject(model, lora.LoraConfig(r=16, alpha=32))
cfg = TrainConfig(epochs=1, batch_size=1, seq_len=704, learning_rate=1e-3, output_dir={out!r}, save_every=0)
trainer = Trainer(model, cfg, examples)
start = time.perf_counter()
result = trainer.train()
seconds = time.perf_counter() - start
print("RESULT", json.dumps({{"tokens_per_second": real_tokens / seconds, "seconds": seconds,
      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "steps": result.steps}}))
"""

PEFT = COMMON + """
import peft
from transformers import Trainer, TrainingArguments, DataCollatorForSeq2Seq
model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
rows = []
for e in examples:  # transformers' convention: unshifted labels, the model shifts them
    labels = [-100] + e["targets"][:-1]
    rows.append({{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": labels}})
args = TrainingArguments(output_dir={out!r}, per_device_train_batch_size=8, num_train_epochs=1,
                         learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=5,
                         save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=rows,
                  data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start
print("RESULT", json.dumps({{"tokens_per_second": real_tokens / seconds, "seconds": seconds,
      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "steps": trainer.state.global_step}}))
"""


def run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.rsplit("RESULT", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--out", default="/tmp/lora-bench")
    args = parser.parse_args()
    settings = {"root": str(ROOT), "data": str(ROOT / "recipes" / "data" / "extract_train.jsonl"),
                "n": args.examples}
    results = {"PEFT + transformers.Trainer": run(PEFT.format(out=f"{args.out}/peft", **settings)),
               "lora": run(OURS.format(out=f"{args.out}/lora", **settings))}
    base = results["PEFT + transformers.Trainer"]
    print(f"{args.examples} examples, SmolLM2-135M, LoRA r=16 all-linear, fp32 CPU")
    print("| stack | real tokens/s | peak RSS | steps | speed ratio | memory ratio |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_second']:.0f} | {r['peak_rss'] / 1e9:.2f} GB | {r['steps']} | "
              f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x | {r['peak_rss'] / base['peak_rss']:.2f}x |")


if __name__ == "__main__":
    main()
