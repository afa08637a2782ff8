"""lora's GRPO against TRL's GRPOTrainer with a PEFT adapter, on CPU: same model, task, prompts, group size, LoRA
settings and steps, each stack in its own process.

    .venv/bin/python bench/grpo_vs_trl.py                     # 20 steps on the bundled sums, TRL then lora
    .venv/bin/python bench/grpo_vs_trl.py --steps 30 --rounds 2 --held-out 100
    .venv/bin/python bench/grpo_vs_trl.py --stacks lora --steps 5        # ours alone

TRL comes with the bench extra: ``.venv/bin/python -m pip install -e ".[bench]"`` after ``scripts/bootstrap.sh``.

Both fine-tune SmolLM2-135M-Instruct (the embedded model, fp32) with LoRA r=16, alpha=32 on every linear layer but
the head, dropout 0, AdamW at a constant learning rate, gradient clipping at 1.0. Each optimizer step takes 4 prompts
of ``lora/recipes/data/sums_train.jsonl`` (the same prompts in the same order for both: the order lora's plan draws
for seed 0, given to TRL with ``shuffle_dataset=False``), samples 8 completions of each (at most 12 new tokens, the
same temperature, no top-k/top-p), rewards them with ``number_match`` and takes one update with the token-normalised
clipped objective (TRL's ``loss_type="dapo"``, our ``loss_normalization="token"``) and the same ``beta``.

- TRL: ``GRPOTrainer(peft_config=LoraConfig(...))``, its defaults otherwise, but fp32 (``bf16=False``: bf16 matrix
  products on this CPU are hundreds of times slower); it keeps its default gradient checkpointing unless
  ``--trl-no-checkpointing``. With beta > 0 its reference is the adapter-off model, as ours.
  ``--lora-checkpointing`` turns ours on too (then each completion runs joined to its prompt: a recomputed layer
  cannot share the prompt's KV cache).
- lora: :class:`lora.train.GRPOTrainer` with the recipe's defaults for everything this script does not set.

Printed per run: seconds per optimizer step (generation, scoring and update together; set-up excluded), peak RSS
of the process, the mean sampled reward of every step (the reward curve), and the held-out accuracy after training
(``--held-out`` prompts of ``sums_eval.jsonl``, greedy, the same code for both).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "lora" / "recipes" / "data"
R, ALPHA, PROMPTS_PER_STEP, GROUP, MAX_NEW = 16, 32, 4, 8, 12


def step_order(n_prompts: int, steps: int, seed: int = 0) -> list[int]:
    """The prompts lora's RolloutPlan takes for the first ``steps`` steps on one process (its first epoch)."""
    import torch

    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed)).tolist()
    if steps * PROMPTS_PER_STEP > n_prompts:
        raise SystemExit("more steps than one epoch of prompts; ask for fewer --steps")
    return order[:steps * PROMPTS_PER_STEP]


def held_out_accuracy(model, tokenizer, prompts: list[dict]) -> float:
    """Greedy answers to ``prompts`` (lora's sampler, on any Hugging Face model), scored by number_match."""
    import torch

    from lora.generate import pad_left, sample_tokens
    from lora.train.rewards import number_match
    from lora.train.rollouts import completion_lengths

    texts = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        for i in range(0, len(prompts), 32):
            chunk = prompts[i:i + 32]
            ids, mask = pad_left([p["input_ids"] for p in chunk], pad)
            tokens = sample_tokens(model, ids, mask, MAX_NEW, temperature=0, eos_token_id=tokenizer.eos_token_id)
            lengths = completion_lengths(tokens, tokenizer.eos_token_id)
            texts += tokenizer.batch_decode([t[:n].tolist() for t, n in zip(tokens, lengths)],
                                            skip_special_tokens=True)
    scores = number_match(None, texts, [p["columns"]["answer"] for p in prompts])
    return sum(scores) / len(scores)


def run_stack(stack: str, steps: int, out: str, held_out: int, beta: float, temperature: float, lr: float,
              trl_checkpointing: bool, lora_checkpointing: bool = False) -> dict:
    import torch

    import lora
    from lora.data import load_prompts

    model, tokenizer = lora.load_model("smollm2-135m")
    prompts, _ = load_prompts(DATA / "sums_train.jsonl", tokenizer)
    heldout = load_prompts(DATA / "sums_eval.jsonl", tokenizer)[0][:held_out]
    if stack == "lora":
        from lora.train import GRPOConfig, GRPOTrainer, TrainConfig

        torch.manual_seed(0)
        lora.inject(model, lora.LoraConfig(r=R, alpha=ALPHA, dropout=0.0))
        trainer = GRPOTrainer(model, TrainConfig(output_dir=out, max_steps=steps, learning_rate=lr,
                                                 batch_size=PROMPTS_PER_STEP, seq_len=256, warmup_ratio=0.0,
                                                 schedule="constant", log_every=1000, seed=0,
                                                 gradient_checkpointing=lora_checkpointing),
                              GRPOConfig(group_size=GROUP, max_new_tokens=MAX_NEW, temperature=temperature, beta=beta,
                                         loss_normalization="token"),
                              prompts, ["number_match"], tokenizer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        rewards = [h["reward"] for h in trainer.history]
        done = trainer.step
    else:
        import peft
        from datasets import Dataset
        try:
            from trl import GRPOConfig, GRPOTrainer
        except ImportError as e:
            raise SystemExit(f'TRL is not installed ({e}): .venv/bin/python -m pip install -e ".[bench]"') from e

        from lora.train.rewards import number_match

        order = step_order(len(prompts), steps)
        rows = [{"prompt": [{"role": "user", "content": prompts[i]["prompt"]}],
                 "answer": prompts[i]["columns"]["answer"]} for i in order]

        def number_reward(prompts, completions, answer, **_):
            return number_match(prompts, [c[0]["content"] for c in completions], answer)

        args = GRPOConfig(output_dir=out, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
                          warmup_steps=0, per_device_train_batch_size=PROMPTS_PER_STEP * GROUP,
                          gradient_accumulation_steps=1, num_generations=GROUP, max_completion_length=MAX_NEW,
                          temperature=temperature, top_p=1.0, top_k=0, beta=beta, loss_type="dapo",
                          scale_rewards="group", num_iterations=1, max_grad_norm=1.0, shuffle_dataset=False,
                          use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=trl_checkpointing,
                          logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
                          remove_unused_columns=False, disable_tqdm=True)
        torch.manual_seed(0)
        trainer = GRPOTrainer(model=model, reward_funcs=[number_reward], args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                          target_modules="all-linear"))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        done = trainer.state.global_step
        model = trainer.model
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # training's peak (evaluation is lighter)
    accuracy = held_out_accuracy(model.eval(), tokenizer, heldout) if heldout else None
    return {"seconds_per_step": seconds / max(done, 1), "steps": done, "peak_rss": peak, "rewards": rewards,
            "held_out_accuracy": accuracy}


def child(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.rsplit("RESULT", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--stacks", default="trl,lora", help="comma-separated: trl, lora (the order of round 1)")
    parser.add_argument("--held-out", type=int, default=100, help="held-out prompts scored after training (0: none)")
    parser.add_argument("--beta", type=float, default=None, help="KL weight (default: the recipe's)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--trl-no-checkpointing", action="store_true",
                        help="turn off TRL's default gradient checkpointing")
    parser.add_argument("--lora-checkpointing", action="store_true",
                        help="turn on our gradient checkpointing (TrainConfig.gradient_checkpointing), as TRL has it")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stack, steps, out, held_out, beta, temperature, lr, ckpt, ours_ckpt = args.child
        print("RESULT", json.dumps(run_stack(stack, int(steps), out, int(held_out), float(beta), float(temperature),
                                             float(lr), ckpt == "1", ours_ckpt == "1")))
        return

    import lora
    from lora.recipes.grpo import GRPO

    defaults = {**{f: getattr(GRPO(), f) for f in ("beta", "temperature")}, **GRPO.DEFAULTS}  # the recipe's own
    beta = defaults["beta"] if args.beta is None else args.beta
    temperature = defaults["temperature"] if args.temperature is None else args.temperature
    lr = GRPO.DEFAULTS["learning_rate"] if args.lr is None else args.lr
    lora.load_model("smollm2-135m")  # converts the embedded model once, before any timing
    stacks = args.stacks.split(",")
    folder = Path(tempfile.mkdtemp(prefix="lora-grpo-trl-"))
    runs: dict[str, list[dict]] = {s: [] for s in stacks}
    for round_ in range(args.rounds):
        for stack in stacks if round_ % 2 == 0 else stacks[::-1]:
            r = child("--child", stack, str(args.steps), str(folder / f"{stack}-{round_}"), str(args.held_out),
                      str(beta), str(temperature), str(lr), "0" if args.trl_no_checkpointing else "1",
                      "1" if args.lora_checkpointing else "0")
            runs[stack].append(r)
            acc = "" if r["held_out_accuracy"] is None else f", held-out accuracy {r['held_out_accuracy']:.0%}"
            print(f"round {round_ + 1} {stack}: {r['seconds_per_step']:.1f} s/step, peak RSS "
                  f"{r['peak_rss'] / 1e9:.2f} GB, mean reward {statistics.mean(r['rewards']):.3f}{acc}", flush=True)
            print(f"  reward per step: {' '.join(f'{x:.2f}' for x in r['rewards'])}", flush=True)
    print(f"\nsums, {args.steps} steps x {PROMPTS_PER_STEP} prompts x {GROUP} completions, beta={beta}, temperature="
          f"{temperature}, lr={lr}, LoRA r={R}, fp32 on {os.cpu_count()} CPU cores, TRL gradient checkpointing "
          f"{'off' if args.trl_no_checkpointing else 'on (its default)'}, ours "
          f"{'on' if args.lora_checkpointing else 'off'}")
    print("| stack | s/step | peak RSS | mean reward, all steps | mean reward, last 5 | held-out accuracy after |")
    print("|---|---|---|---|---|---|")
    for stack, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("seconds_per_step", "peak_rss")}
        mean = statistics.mean(x for r in rs for x in r["rewards"])
        last = statistics.mean(x for r in rs for x in r["rewards"][-5:])
        accs = [r["held_out_accuracy"] for r in rs if r["held_out_accuracy"] is not None]
        accuracy = f"{statistics.mean(accs):.0%}" if accs else "-"
        print(f"| {stack} | {med['seconds_per_step']:.1f} | {med['peak_rss'] / 1e9:.2f} GB | {mean:.3f} | {last:.3f} | "
              f"{accuracy} |")
    if {"trl", "lora"} <= set(stacks):
        for i in range(args.rounds):
            ours, theirs = runs["lora"][i], runs["trl"][i]
            print(f"round {i + 1}: speed {theirs['seconds_per_step'] / ours['seconds_per_step']:.2f}x TRL's, memory "
                  f"{ours['peak_rss'] / theirs['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
