"""Sequence classification with LoRA and a trainable head (e.g. SMS spam detection).

    lora train classify                              # SmolLM2-135M on the bundled spam/ham set
    lora train classify train_file=my.jsonl eval_file=my_eval.jsonl     # JSONL with "text" and "label"

The LoRA-adapted body feeds a new linear `score` head (trained in full, saved with the adapter via
modules_to_save). Reports held-out accuracy before and after, and the majority-class baseline.
"""

from collections import Counter
from dataclasses import dataclass

from ..data import load_dataset
from ..inject import inject, parameter_count
from ..models import load_model
from ..recipe import data_card, finish, parse_settings, seed_everything
from ..train import Trainer
from . import DATA


@dataclass(frozen=True)
class Classify:
    """Classification settings (plus every LoraConfig and TrainConfig field)."""

    model: str = "smollm2-135m"
    train_file: str = str(DATA / "spam_train.jsonl")
    eval_file: str = str(DATA / "spam_eval.jsonl")
    adapter_dir: str = "adapters/classify"
    columns: str | None = None  # our field names for your columns: "text:sms,label:class"

    DEFAULTS = {"r": 8, "alpha": 16, "modules_to_save": ["score"], "learning_rate": 1e-3, "epochs": 1.0,
                "batch_size": 16, "seq_len": 128, "packing": False, "output_dir": "runs/classify", "log_every": 1}


def main(argv: list[str]) -> dict:
    settings, lora_cfg, train_cfg = parse_settings(Classify, argv)
    _, tokenizer = load_model(settings.model)  # only for the tokenizer; the classifier is loaded below
    train, stats = load_dataset(settings.train_file, tokenizer, format="classification",
                                max_length=train_cfg.seq_len, overlong=train_cfg.overlong, columns=settings.columns)
    test, _ = load_dataset(settings.eval_file, tokenizer, format="classification", label_names=stats.labels,
                           max_length=train_cfg.seq_len, columns=settings.columns)
    print(f"train data: {stats.describe()}; classes: {stats.labels}")
    seed_everything(train_cfg.seed)  # the new score head and A start random: seeded, the same command repeats
    model, _ = load_model(settings.model, num_labels=len(stats.labels))
    inject(model, lora_cfg)
    print("trainable parameters: {trainable:,} of {total:,} ({percent:.2f}%)".format(**parameter_count(model)))

    trainer = Trainer(model, train_cfg, train, eval_data=test, pad_id=tokenizer.pad_token_id)
    accuracy_before = trainer.evaluate()["accuracy"]
    majority = Counter(e["label"] for e in test).most_common(1)[0][1] / len(test)
    result = trainer.train()
    accuracy_after = None if result.interrupted else trainer.evaluate()["accuracy"]  # Ctrl-C: no final evaluation
    if accuracy_after is not None:
        print(f"held-out accuracy: before {accuracy_before:.1%}, after {accuracy_after:.1%} "
              f"(majority-class baseline {majority:.1%})")
    return finish(trainer, settings.adapter_dir, train_cfg.output_dir, {  # the adapter includes the score head
        "accuracy_before": accuracy_before, "accuracy_after": accuracy_after, "majority_baseline": majority,
        "labels": stats.labels, "eval_loss": result.eval_loss, "steps": result.steps,
        "train_seconds": result.train_seconds, "tokens_per_second": result.tokens_per_second,
        "peak_memory_bytes": result.peak_memory_bytes, "interrupted": result.interrupted, "model": settings.model},
        data=data_card(settings.train_file, train, settings.eval_file, test, stats))

