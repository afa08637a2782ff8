"""Instruction tuning (SFT) with LoRA.

    lora train sft                                   # SmolLM2-135M on the bundled extraction task
    lora train sft train_file=my.jsonl eval_file=my_eval.jsonl output_dir=runs/mine
    lora train sft train_file=data/train.parquet eval_file=data/test.parquet columns=prompt:question,completion:answer
    lora train sft --config recipes/configs/sft.yaml r=32 learning_rate=5e-4

Measures held-out exact-match accuracy before and after training, saves the adapter and writes metrics.json.
"""

from dataclasses import dataclass

from ..data import load_dataset, prompts_and_answers
from ..generate import exact_match
from ..inject import inject, parameter_count
from ..models import load_model
from ..recipe import data_card, finish, parse_settings, seed_everything
from ..train import Trainer
from . import DATA


@dataclass(frozen=True)
class SFT:
    """Instruction tuning settings (plus every LoraConfig and TrainConfig field)."""

    model: str = "smollm2-135m"
    train_file: str = str(DATA / "extract_train.jsonl")
    eval_file: str = str(DATA / "extract_eval.jsonl")
    adapter_dir: str = "adapters/sft"
    columns: str | None = None  # our field names for your columns: "prompt:question,completion:answer"
    eval_max_new_tokens: int | None = None  # None: the longest held-out answer plus 4 tokens

    # Recipe defaults for LoraConfig/TrainConfig fields, chosen for small instruction sets on a CPU.
    # 8 packed rows per optimizer step, as 2 rows x 4 accumulated micro-batches: the same step as 8 at once (the
    # loss is normalised over the window's tokens) with a quarter of the activation memory.
    # The budget, the validation slice and the stopping rule fit the data (lora/train/budget.py,
    # lora/train/early_stopping.py; issue 20, measured on bench/suite.py's tasks, bench/RESULTS.md): at least 16
    # optimizer steps however small the set (more passes over it); 5% of the examples held out, at least 48 (none
    # for a set that cannot spare them), judged by exact match where answers are short, ~12 times a run; a stop
    # after 2 validations in a row without progress (one more answer right, or as many at a loss 2% lower), never
    # before half of the steps, keeping the best weights. early_stopping_patience=0 validation_split=0 min_steps=0
    # trains exactly `epochs` (1) passes.
    DEFAULTS = {"r": 16, "alpha": 32, "learning_rate": 1e-3, "epochs": 1.0, "batch_size": 2, "grad_accum": 4,
                "seq_len": 512, "output_dir": "runs/sft", "log_every": 1, "min_steps": 16, "validation_split": 0.05,
                "validate_every": 0, "early_stopping_patience": 2, "early_stopping_min_delta": 0.02}


def main(argv: list[str]) -> dict:
    settings, lora_cfg, train_cfg = parse_settings(SFT, argv)
    model, tokenizer = load_model(settings.model)
    train, stats = load_dataset(settings.train_file, tokenizer, max_length=train_cfg.seq_len,
                                overlong=train_cfg.overlong, columns=settings.columns)
    print(f"train data: {stats.describe()}")
    prompts, answers = prompts_and_answers(settings.eval_file, columns=settings.columns)
    eval_examples, _ = load_dataset(settings.eval_file, tokenizer, max_length=train_cfg.seq_len,
                                    columns=settings.columns)

    accuracy_before, _ = exact_match(model, tokenizer, prompts, answers, settings.eval_max_new_tokens)
    print(f"held-out exact match before training: {accuracy_before:.1%}")

    seed_everything(train_cfg.seed)  # A starts random: seeded, the same command gives the same adapter
    inject(model, lora_cfg)
    print("trainable parameters: {trainable:,} of {total:,} ({percent:.2f}%)".format(**parameter_count(model)))
    trainer = Trainer(model, train_cfg, train, eval_data=eval_examples, exact_match_data=(prompts, answers),
                      tokenizer=tokenizer, exact_match_max_new_tokens=settings.eval_max_new_tokens)
    result = trainer.train()

    accuracy_after = result.exact_match  # None after Ctrl-C: an interrupted run skips the final evaluation
    if not result.interrupted:
        print(f"held-out exact match after training: {accuracy_after:.1%}")
        _, shown = trainer.run_whole(lambda: exact_match(model, tokenizer, prompts[:3], answers[:3],
                                                         settings.eval_max_new_tokens))
        for prompt, answer, got in zip(prompts, answers, shown):
            print(f"  {prompt[-1]['content'].splitlines()[-1][:70]!r} -> {got!r} (expected {answer!r})")
    metrics = finish(trainer, settings.adapter_dir, train_cfg.output_dir, {
        "accuracy_before": accuracy_before, "accuracy_after": accuracy_after, "eval_loss": result.eval_loss,
        "perplexity": result.perplexity, "train_loss": result.train_loss, "steps": result.steps,
        "train_seconds": result.train_seconds, "tokens_per_second": result.tokens_per_second,
        "peak_memory_bytes": result.peak_memory_bytes, "interrupted": result.interrupted, "model": settings.model,
        "stopped_early": result.stopped_early, "best_step": result.best_step,
        "validation_loss": result.validation_loss, "validation_exact_match": result.validation_exact_match},
        data=data_card(settings.train_file, train, settings.eval_file, eval_examples, stats))
    if not metrics:  # not the main process
        return metrics
    print(f"try it:     lora generate --model {settings.model} --adapter {metrics['adapter']} --prompt '...' "
          f"--temperature 0\nexport it:  lora export gguf --model {settings.model} --adapter {metrics['adapter']} "
          f"--out exports/model.gguf   (or: lora merge ... --out exports/merged)")
    return metrics

