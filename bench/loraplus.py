"""LoRA+ against plain LoRA: training-loss curves on the bundled extraction task, same steps and data.

    .venv/bin/python bench/loraplus.py --steps 12 --ratio 16

Both fine-tune SmolLM2-135M with the sft recipe's settings (r=16, alpha=32, lr 1e-3, 2 x 4 packed 512-token rows
per step), seed 0, one process each; only TrainConfig.loraplus_lr_ratio differs (1.0 is plain LoRA). Prints the
loss at every step and the mean over the last third, and the held-out loss at the end.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, sys
sys.path.insert(0, {root!r})
import lora
from lora.data import load_dataset
from lora.recipe import seed_everything
model, tok = lora.load_model("smollm2-135m")
train, _ = load_dataset({train!r}, tok, max_length=512)
test, _ = load_dataset({test!r}, tok, max_length=512)
seed_everything(0)
lora.inject(model, lora.LoraConfig(r=16, alpha=32))
cfg = lora.TrainConfig(max_steps={steps}, batch_size=2, grad_accum=4, seq_len=512, learning_rate=1e-3,
                       loraplus_lr_ratio={ratio}, output_dir="/tmp/bench_loraplus_{ratio}", log_every=1)
trainer = lora.Trainer(model, cfg, train, eval_data=test[:40])
result = trainer.train()
print("RESULT", json.dumps({{"losses": [h["loss"] for h in trainer.history], "eval_loss": result.eval_loss}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ratio", type=float, default=16.0)
    args = parser.parse_args()
    data = ROOT / "recipes" / "data"
    curves = {}
    for ratio in (1.0, args.ratio):
        script = RUN.format(root=str(ROOT), train=str(data / "extract_train.jsonl"),
                            test=str(data / "extract_eval.jsonl"), steps=args.steps, ratio=ratio)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"run with loraplus_lr_ratio={ratio} failed:\n{proc.stderr[-3000:]}")
        curves[ratio] = json.loads(lines[-1][len("RESULT "):])
        print(f"loraplus_lr_ratio={ratio}: {curves[ratio]}", flush=True)
    print("\nstep | " + " | ".join(f"ratio {r:g}" for r in curves))
    for step in range(args.steps):
        print(f"{step + 1} | " + " | ".join(f"{c['losses'][step]:.4f}" for c in curves.values()))
    tail = max(1, args.steps // 3)
    for ratio, c in curves.items():
        print(f"ratio {ratio:g}: mean loss over the last {tail} steps {sum(c['losses'][-tail:]) / tail:.4f}, "
              f"held-out loss {c['eval_loss']:.4f}")


if __name__ == "__main__":
    main()
