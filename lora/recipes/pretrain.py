"""Continued pre-training with LoRA on plain text.

    lora train pretrain                              # SmolLM2-135M on the bundled support-desk notes
    lora train pretrain train_file=my.jsonl eval_file=my_eval.jsonl    # JSONL with a "text" field
    lora train pretrain train_file=book.txt eval_file=chapter.txt       # text: documents cut into seq_len windows

Reports held-out perplexity before and after, saves the adapter and writes metrics.json.
"""

from dataclasses import dataclass

from ..data import load_dataset
from ..inject import inject
from ..models import load_model
from ..recipe import data_card, finish, parse_settings, seed_everything
from ..train import Trainer
from . import DATA


@dataclass(frozen=True)
class Pretrain:
    """Continued pre-training settings (plus every LoraConfig and TrainConfig field)."""

    model: str = "smollm2-135m"
    train_file: str = str(DATA / "notes_train.jsonl")
    eval_file: str = str(DATA / "notes_eval.jsonl")
    adapter_dir: str = "adapters/pretrain"
    columns: str | None = None  # our field names for your columns: "text:body"

    DEFAULTS = {"r": 16, "alpha": 32, "learning_rate": 1e-3, "epochs": 1.0, "batch_size": 4, "seq_len": 256,
                "output_dir": "runs/pretrain", "log_every": 1}


def main(argv: list[str]) -> dict:
    settings, lora_cfg, train_cfg = parse_settings(Pretrain, argv)
    model, tokenizer = load_model(settings.model)
    train, stats = load_dataset(settings.train_file, tokenizer, format="text", max_length=train_cfg.seq_len,
                                overlong=train_cfg.overlong, columns=settings.columns)
    test, _ = load_dataset(settings.eval_file, tokenizer, format="text", max_length=train_cfg.seq_len,
                           columns=settings.columns)
    print(f"train data: {stats.describe()}")
    seed_everything(train_cfg.seed)  # A starts random: seeded, the same command gives the same adapter
    inject(model, lora_cfg)
    trainer = Trainer(model, train_cfg, train, eval_data=test)
    perplexity_before = trainer.evaluate()["perplexity"]
    result = trainer.train()  # after Ctrl-C: interrupted, and no final evaluation (perplexity None)
    if not result.interrupted:
        print(f"held-out perplexity: before {perplexity_before:.2f}, after {result.perplexity:.2f}")
    return finish(trainer, settings.adapter_dir, train_cfg.output_dir, {
        "perplexity_before": perplexity_before, "perplexity_after": result.perplexity,
        "eval_loss": result.eval_loss, "steps": result.steps, "train_seconds": result.train_seconds,
        "tokens_per_second": result.tokens_per_second, "peak_memory_bytes": result.peak_memory_bytes,
        "interrupted": result.interrupted, "model": settings.model},
        data=data_card(settings.train_file, train, settings.eval_file, test, stats))

