"""GPU paths that CI (CPU only) cannot run: mixed precision, device placement, memory. Run it on a GPU machine.

    .venv/bin/python bench/gpu_check.py            # needs CUDA; exits with an error otherwise

Checks, on SmolLM2-135M with LoRA on the bundled extraction task:
1. precision="auto" picks bf16 (or fp16 + grad scaler on GPUs without bf16) and keeps LoRA weights in fp32;
2. 20 steps in auto precision track an fp32 run: final loss within 10% and both well below the start;
3. a bf16-autocast forward of the merged model matches the unmerged one (greedy answers on 16 prompts);
and prints tokens/s and peak GPU memory for each precision;
4. the comparison with PEFT + transformers.Trainer in bf16 (``bench/compare.py --device cuda``): SmolLM2 on
   varied-length stdlib docstrings, then a random ~1B Llama on the same data, with the share of the measured bf16
   matmul peak (MFU) for each stack.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import lora
from lora.data import load_dataset, prompts_and_answers
from lora.generate import exact_match
from lora.train import TrainConfig, Trainer
from lora.train.setup import mixed_precision


def run(precision: str, examples, out: str) -> tuple[float, float, object]:
    model, _ = lora.load_model("smollm2-135m", device="cuda", dtype=torch.float32)
    torch.manual_seed(0)
    lora.inject(model, lora.LoraConfig(r=16, alpha=32))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model, TrainConfig(max_steps=20, batch_size=8, seq_len=512, precision=precision,
                                         output_dir=out, log_every=5), examples)
    first = trainer.evaluate(examples[:64])["eval_loss"]
    result = trainer.train()
    last = trainer.evaluate(examples[:64])["eval_loss"]
    print(f"{precision}: loss {first:.3f} -> {last:.3f}, {result.tokens_per_second:.0f} tokens/s, "
          f"peak {result.peak_memory_bytes / 1e9:.2f} GB")
    return first, last, model


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine")
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert mixed_precision("auto") == expected, mixed_precision("auto")
    print(f"auto precision on {torch.cuda.get_device_name()}: {expected}")
    _, tokenizer = lora.load_model("smollm2-135m")
    examples, _ = load_dataset("lora/recipes/data/extract_train.jsonl", tokenizer, max_length=512)
    with tempfile.TemporaryDirectory() as tmp:
        start32, end32, _ = run("fp32", examples, f"{tmp}/fp32")
        start_mp, end_mp, model = run("auto", examples, f"{tmp}/auto")
    assert end32 < 0.5 * start32 and end_mp < 0.5 * start_mp, "training did not learn"
    assert abs(end_mp - end32) <= 0.1 * max(end32, 1e-3) + 0.02, (end32, end_mp)
    prompts, answers = prompts_and_answers("lora/recipes/data/extract_eval.jsonl")
    with torch.autocast("cuda", dtype=torch.bfloat16 if expected == "bf16" else torch.float16):
        _, unmerged = exact_match(model, tokenizer, prompts[:16], answers[:16])
        lora.merge(model)
        _, merged = exact_match(model, tokenizer, prompts[:16], answers[:16])
    same = sum(a == b for a, b in zip(unmerged, merged))
    print(f"merged vs unmerged greedy answers under autocast: {same}/16 identical")
    assert same >= 15
    print("GPU checks passed")
    compare = Path(__file__).with_name("compare.py")
    for model in ("smollm2-135m", "llama-1b"):
        subprocess.run([sys.executable, str(compare), "--device", "cuda", "--model", model], check=True)


if __name__ == "__main__":
    main()
