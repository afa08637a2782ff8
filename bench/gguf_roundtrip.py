"""Does a trained adapter survive GGUF export? Greedy held-out answers: merged in memory vs. GGUF read back.

    .venv/bin/python recipes/sft.py                       # trains adapters/sft (the default recipe)
    .venv/bin/python bench/gguf_roundtrip.py --adapter adapters/sft --dtypes f32 f16 q8_0

For each dtype: export the merged model to GGUF, load it with transformers' GGUF loader (its own tokenizer too),
answer the held-out prompts greedily and count answers identical to the in-memory merged model's and correct.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora
from lora.export import export_gguf
from lora.data import prompts_and_answers
from lora.generate import exact_match

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", default=str(ROOT / "adapters" / "sft"))
    parser.add_argument("--eval-file", default=str(ROOT / "recipes" / "data" / "extract_eval.jsonl"))
    parser.add_argument("--dtypes", nargs="+", default=["f32", "f16", "q8_0"])
    args = parser.parse_args()

    prompts, answers = prompts_and_answers(args.eval_file)
    model, tokenizer = lora.load_model(args.model)
    lora.load_adapter(model, args.adapter)
    merged_accuracy, reference = exact_match(lora.merge_and_unload(model), tokenizer, prompts, answers)
    print(f"merged in memory: exact match {merged_accuracy:.1%} on {len(prompts)} held-out prompts")
    print("| GGUF dtype | file size | same answer as merged | exact match | export s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            start = time.perf_counter()
            path = export_gguf(args.model, Path(tmp) / f"model-{dtype}.gguf", args.adapter, dtype=dtype)
            seconds = time.perf_counter() - start
            loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32)
            gguf_tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
            accuracy, got = exact_match(loaded, gguf_tokenizer, prompts, answers)
            same = sum(g == r for g, r in zip(got, reference))
            print(f"| {dtype} | {path.stat().st_size / 1e6:.0f} MB | {same}/{len(prompts)} | {accuracy:.1%} | "
                  f"{seconds:.1f} |")
            path.unlink()


if __name__ == "__main__":
    main()
