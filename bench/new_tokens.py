"""A new special token, end to end, on the embedded model (issue 24): add it, train it, merge, export, answer with it.

    .venv/bin/python bench/new_tokens.py --train 160 --eval 40 --steps 16

SmolLM2-135M answers the headline-topic task (bench/tasks/topic.py) as ``<|topic|>`` followed by the topic word;
``<|topic|>`` is new to its tokenizer (``lora.add_tokens``: a row of the embedding, tied to the head, starting as the
mean row). LoRA on all linear layers plus ``trainable_tokens`` (that one row, in full) train together. Held-out
accuracy (the greedy answer, special tokens kept, equal to ``<|topic|>word``) is measured before training, after it,
on the merged folder ``lora merge`` writes (transformers) and on the GGUF exported from that folder (llama.cpp
through llama-cpp-python, if installed). Prints one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora  # noqa: E402
from bench.tasks import topic  # noqa: E402
from lora.data import render_chat  # noqa: E402
from lora.export import export_gguf, export_merged  # noqa: E402
from lora.generate import pad_left, sample_tokens  # noqa: E402

TOKEN = "<|topic|>"


def examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ex = topic.example(rng)
        out.append({"prompt": ex["prompt"], "completion": TOKEN + ex["completion"]})
    return out


@torch.no_grad()
def answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 6) -> list[list[int]]:
    """Greedy answer ids to each prompt, formatted as in training, up to the end-of-turn token."""
    model.eval()
    out = []
    for i in range(0, len(prompts), 16):
        rows = [render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
                for p in prompts[i:i + 16]]
        ids, mask = pad_left(rows, tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = sample_tokens(model, ids, mask, max_new_tokens, 0.0, 0, 1.0, None, tokenizer.eos_token_id)
        for row in new.tolist():
            out.append(row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return out


def score(answer_ids: list[list[int]], tokenizer, data: list[dict], token_id: int) -> dict[str, float]:
    texts = [tokenizer.decode(a, skip_special_tokens=False).strip() for a in answer_ids]
    return {"exact": sum(t == d["completion"] for t, d in zip(texts, data)) / len(data),
            "starts_with_new_token": sum(bool(a) and a[0] == token_id for a in answer_ids) / len(data),
            "example": texts[0]}


def llama_cpp_answers(path: Path, tokenizer, prompts: list[str], max_new_tokens: int = 6) -> list[list[int]] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=512, logits_all=False, verbose=False, seed=0)
    out = []
    for p in prompts:
        ids = render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token == tokenizer.eos_token_id or len(got) == max_new_tokens:
                break
            got.append(token)
        out.append(got)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--eval", type=int, default=40)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2, help="packed 512-token rows per step")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--out", default=None, help="keep the adapter, merged folder and GGUF here")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="lora-new-tokens-"))
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = examples(args.train, seed=1), examples(args.eval, seed=2)
    train_prompts = {d["prompt"] for d in train}
    held_out = [d for d in held_out if d["prompt"] not in train_prompts]
    (work / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in train))
    prompts = [d["prompt"] for d in held_out]
    figures: dict = {"train_examples": len(train), "held_out": len(held_out)}

    model, tokenizer = lora.load_model("smollm2-135m")
    rows_before = model.get_input_embeddings().num_embeddings
    [token_id] = lora.add_tokens(model, tokenizer, [TOKEN])
    figures.update(token_id=token_id, vocabulary_rows=[rows_before, model.get_input_embeddings().num_embeddings],
                   tied=model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    figures["before"] = score(answers(model, tokenizer, prompts), tokenizer, held_out, token_id)

    lora.inject(model, lora.LoraConfig(r=16, alpha=32, trainable_tokens=[token_id]))
    data, _ = lora.data.load_dataset(work / "train.jsonl", tokenizer)
    # A new row starts as the mean row, far from where it must end (here ~0.5 in norm for the new token to win
    # the argmax): at LoRA's usual 1e-3-2e-3 Adam moves it too slowly for a short run, so the rate is higher.
    cfg = lora.TrainConfig(output_dir=str(work / "run"), max_steps=args.steps, batch_size=args.batch_size,
                           learning_rate=args.lr, warmup_ratio=0.0, log_every=4, seq_len=512)
    start = time.perf_counter()
    result = lora.Trainer(model, cfg, data).train()
    figures.update(train_seconds=round(time.perf_counter() - start, 1), train_loss=round(result.train_loss, 4),
                   tokens_per_second=round(result.tokens_per_second, 1))
    figures["after"] = score(answers(model, tokenizer, prompts), tokenizer, held_out, token_id)
    lora.save_adapter(model, work / "adapter")

    export_merged("smollm2-135m", work / "adapter", work / "merged")  # checked: prints its max |dlogit|
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32)
    merged_tokenizer = AutoTokenizer.from_pretrained(work / "merged")
    figures["merged"] = score(answers(merged, merged_tokenizer, prompts), merged_tokenizer, held_out, token_id)
    figures["merged"]["vocab_size"] = merged.config.vocab_size
    figures["merged"]["token_id_in_tokenizer"] = merged_tokenizer.convert_tokens_to_ids(TOKEN)

    gguf = export_gguf(work / "merged", work / "model.gguf", dtype="f16")  # checked through transformers' reader
    got = llama_cpp_answers(gguf, merged_tokenizer, prompts)
    if got is not None:
        figures["gguf_llama_cpp"] = score(got, merged_tokenizer, held_out, token_id)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
