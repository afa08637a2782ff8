"""Preference tuning (DPO) with LoRA: the reference model is the same model with its adapters off.

    lora train dpo                                   # SmolLM2-135M on the bundled preference pairs
    lora train dpo train_file=my.jsonl eval_file=my_eval.jsonl dpo_beta=0.2   # {"prompt", "chosen", "rejected"}
    lora train dpo train_file=prefs.json eval_file=prefs_eval.json  # Alpaca layout: instruction, input, chosen, ...

Measures held-out preference accuracy (the share of pairs whose chosen answer has the higher summed log-probability)
under the base model before and with the adapter after training, saves the adapter and writes metrics.json.
"""

from dataclasses import dataclass

from ..data import load_preferences
from ..inject import inject
from ..models import load_model
from ..recipe import data_card, finish, parse_settings, seed_everything
from ..train import Trainer
from . import DATA


@dataclass(frozen=True)
class DPO:
    """Preference tuning settings (plus every LoraConfig and TrainConfig field)."""

    model: str = "smollm2-135m"
    train_file: str = str(DATA / "prefs_train.jsonl")
    eval_file: str = str(DATA / "prefs_eval.jsonl")
    adapter_dir: str = "adapters/dpo"
    columns: str | None = None  # our field names for your columns: "prompt:question,chosen:good,rejected:bad"

    # 8 pairs per optimizer step (4 x 2 accumulated); DPO wants a smaller learning rate than SFT.
    DEFAULTS = {"r": 16, "alpha": 32, "learning_rate": 5e-4, "epochs": 1.0, "batch_size": 4, "grad_accum": 2,
                "seq_len": 256, "dpo_beta": 0.1, "output_dir": "runs/dpo", "log_every": 1}


def main(argv: list[str]) -> dict:
    settings, lora_cfg, train_cfg = parse_settings(DPO, argv)
    model, tokenizer = load_model(settings.model)
    train, stats = load_preferences(settings.train_file, tokenizer, max_length=train_cfg.seq_len,
                                    columns=settings.columns)
    test, _ = load_preferences(settings.eval_file, tokenizer, max_length=train_cfg.seq_len, columns=settings.columns)
    print(f"train pairs: {stats.describe()}")
    seed_everything(train_cfg.seed)  # A starts random: seeded, the same command gives the same adapter
    inject(model, lora_cfg)  # B = 0: until it trains, the policy is the base model
    trainer = Trainer(model, train_cfg, train, eval_data=test)
    before = trainer.evaluate()
    result = trainer.train()  # after Ctrl-C: interrupted, and no final evaluation
    after = result.eval_metrics
    if after:
        print(f"held-out preference accuracy: before {before['preference_accuracy']:.1%}, after "
              f"{after['preference_accuracy']:.1%} (reward margin {after['reward_margin']:.3f})")
    return finish(trainer, settings.adapter_dir, train_cfg.output_dir, {
        "preference_accuracy_before": before["preference_accuracy"],
        "preference_accuracy_after": after.get("preference_accuracy"),
        "reward_margin_after": after.get("reward_margin"),
        "eval_loss_before": before["eval_loss"], "eval_loss_after": after.get("eval_loss"), "steps": result.steps,
        "train_seconds": result.train_seconds, "tokens_per_second": result.tokens_per_second,
        "peak_memory_bytes": result.peak_memory_bytes, "interrupted": result.interrupted, "model": settings.model},
        data=data_card(settings.train_file, train, settings.eval_file, test, stats))

