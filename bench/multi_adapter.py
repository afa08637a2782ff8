"""Per-row adapters in one batch (lora.row_adapters) against PEFT's mixed-batch path (``adapter_names=``), and
QLoRA's 4-bit base against fp32, on SmolLM2-135M, CPU.

    .venv/bin/python bench/multi_adapter.py --rounds 2

Per-row: four r=16 adapters on every linear layer but the head (random, as after training), a batch of 16 rows of
128 tokens naming the adapters and the base in turn; the same adapters loaded into PEFT. Both stacks live in one
process (each with its own copy of the base) and their calls alternate, so both see the same load; checked to give
the same logits. Timed: one forward pass over the batch, median of 4 after a warm-up.

QLoRA: the same model loaded with quantize="nf4" or in fp32, LoRA r=16 on every linear layer, 4 training steps
of 2 x 256-token packed rows from the bundled extraction data. Reported: peak RSS of the process, the weights held
by the linear layers, and training tokens per second.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROWS = """
import json, statistics, sys, time, warnings, torch
sys.path.insert(0, {root!r})
import lora
import peft
model, tok = lora.load_model("smollm2-135m")
names = ["a", "b", "c", "d"]
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 49152, (16, 128), generator=g)
rows = [names[i % 5] if i % 5 < 4 else None for i in range(16)]
for name in names:
    lora.inject(model, lora.LoraConfig(r=16, alpha=32), adapter=name)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
for name in names:
    lora.save_adapter(model, "/tmp/bench_rows/" + name, adapter=name)
base, _ = lora.load_model("smollm2-135m")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = peft.PeftModel.from_pretrained(base, "/tmp/bench_rows/a", adapter_name="a")
    for name in names[1:]:
        theirs.load_adapter("/tmp/bench_rows/" + name, adapter_name=name)
theirs.eval(); model.eval()
peft_rows = [r if r is not None else "__base__" for r in rows]

def ours():
    with lora.row_adapters(model, rows):
        return model(input_ids=ids).logits

def peft_mixed():
    return theirs(input_ids=ids, adapter_names=peft_rows).logits

times = {{"ours": [], "peft": []}}
with torch.no_grad():
    torch.testing.assert_close(ours(), peft_mixed(), atol=1e-3, rtol=1e-3)  # the same answer, and a warm-up
    for _ in range(4):  # alternating, so both see the same load on the shared machine
        for stack, run in (("ours", ours), ("peft", peft_mixed)):
            start = time.perf_counter(); run(); times[stack].append(time.perf_counter() - start)
print("RESULT", json.dumps({{k: statistics.median(v) for k, v in times.items()}}))
"""

QLORA = """
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
import lora
from lora.data import load_dataset
from lora.train import Trainer, TrainConfig
model, tok = lora.load_model("smollm2-135m", quantize={quantize!r})
linear_bytes = 0
for m in model.modules():
    if isinstance(m, torch.nn.Linear):
        w = m.weight
        parts = [getattr(w, n) for n in ("quantized_data", "quantized_scalers", "quantization_factor") if hasattr(w, n)]
        linear_bytes += sum(t.numel() * t.element_size() for t in parts) or w.numel() * w.element_size()
examples, _ = load_dataset({data!r}, tok, max_length=256)
lora.inject(model, lora.LoraConfig(r=16, alpha=32))
trainer = Trainer(model, TrainConfig(max_steps=4, batch_size=2, seq_len=256, output_dir="/tmp/bench_qlora"),
                  examples[:200])
result = trainer.train()
print("RESULT", json.dumps({{"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "linear_bytes": linear_bytes, "tokens_per_second": result.tokens_per_second, "loss": result.train_loss}}))
"""


def run(script: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"benchmark process failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data = str(ROOT / "recipes" / "data" / "extract_train.jsonl")
    rows: list[dict] = []
    qlora: dict[str, list[dict]] = {"nf4": [], "fp32": []}
    for round_ in range(args.rounds):
        rows.append(run(ROWS.format(root=str(ROOT))))
        print(f"round {round_ + 1} per-row (median seconds per forward): {rows[-1]}", flush=True)
        for quantize in ("nf4", "fp32"):
            qlora[quantize].append(run(QLORA.format(root=str(ROOT), data=data,
                                                    quantize="nf4" if quantize == "nf4" else None)))
            print(f"round {round_ + 1} qlora {quantize}: {qlora[quantize][-1]}", flush=True)

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    ours, theirs = med(rows, "ours"), med(rows, "peft")
    print(f"\nper-row batch (16 x 128 tokens, 4 adapters + base): ours {16 * 128 / ours:.0f} tokens/s, PEFT "
          f"{16 * 128 / theirs:.0f} tokens/s, ratio {theirs / ours:.2f}x")
    for key, label in (("peak_rss", "peak RSS"), ("linear_bytes", "linear-layer weights")):
        nf4, fp32 = med(qlora["nf4"], key), med(qlora["fp32"], key)
        print(f"QLoRA {label}: nf4 {nf4 / 2**20:.0f} MiB, fp32 {fp32 / 2**20:.0f} MiB, ratio {nf4 / fp32:.2f}x")
    nf4, fp32 = med(qlora["nf4"], "tokens_per_second"), med(qlora["fp32"], "tokens_per_second")
    print(f"QLoRA training: nf4 {nf4:.0f} tokens/s, fp32 {fp32:.0f} tokens/s, ratio {nf4 / fp32:.2f}x")


if __name__ == "__main__":
    main()
