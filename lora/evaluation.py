"""``lora eval``: a model, with an adapter applied or merged in, measured on a data file (exact match, perplexity)
and on lm-evaluation-harness tasks, run through lm-eval's Python API with this model object.

lm-eval (the ``eval`` extra) is what people compare fine-tunes with; handing it the model object rather than a
folder means the adapter is evaluated as this library applies it (or merges it), with nothing written to disk.
Its tasks come from its own registry or from ``include_path``, a folder of task YAML files (a local JSON/JSONL data
set needs no network: ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_io import load_adapter
from .data import IGNORE, collate, load_dataset, model_inputs, prompts_and_answers
from .generate import exact_match
from .merge import merge_and_unload
from .models import load_model


def load_for_eval(model: str | os.PathLike, adapter: str | os.PathLike | None = None, merge: bool = False,
                  check_base: bool = True) -> tuple[nn.Module, Any]:
    """The model to evaluate and its tokenizer: ``model`` (an embedded name, HF folder or .gguf file) with
    ``adapter`` applied, or merged into the weights (``merge=True``: plain layers, as an exported model runs).

    Raises:
        ValueError: as :func:`lora.load_model` and :func:`lora.load_adapter`; ``merge`` without an adapter.
    """
    if merge and adapter is None:
        raise ValueError("--merge needs --adapter DIR: there is nothing to merge into the base")
    net, tokenizer = load_model(model)
    if adapter is not None:
        load_adapter(net, adapter, check_base=check_base)
        if merge:
            net = merge_and_unload(net)
    return net.eval(), tokenizer


@torch.no_grad()
def perplexity(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int = 4) -> dict[str, float]:
    """Mean loss per target token over tokenized ``examples`` (from :func:`lora.data.load_dataset`: the answers of
    instruction data, every token of plain text) and its exponential, as the trainer's evaluation defines them.

    Returns:
        ``eval_loss``, ``perplexity`` (capped at exp(50)) and ``target_tokens``.
    """
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
        keep = batch["targets"] != IGNORE
        total += float(F.cross_entropy(logits[keep].float(), batch["targets"][keep], reduction="sum"))
        count += int(keep.sum())
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": count}


def data_metrics(model: nn.Module, tokenizer, path: str | os.PathLike, max_length: int = 512,
                 max_new_tokens: int | None = None, batch_size: int = 4) -> dict[str, Any]:
    """Perplexity on a data file, and exact match where it holds prompts with answers (instruction or chat data:
    greedy answers compared with the file's, as the sft recipe measures).

    Raises:
        ValueError: the file cannot be read, or holds classification or preference data (whose measures are the
            classify and dpo recipes').
    """
    examples, stats = load_dataset(path, tokenizer, max_length=max_length)
    if not examples or "targets" not in examples[0]:
        raise ValueError(f"{path} is not instruction, chat or text data; lora eval --data measures perplexity and "
                         f"exact match on those (classification and preference data are measured by the classify "
                         f"and dpo recipes)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result: dict[str, Any] = {"file": str(path), "examples": len(examples),
                              **perplexity(model, examples, pad_id, batch_size)}
    try:
        prompts, answers = prompts_and_answers(path)
    except ValueError as e:  # plain text, or conversations that end without an answer: perplexity only
        result["exact_match"], result["exact_match_skipped"] = None, str(e)
        return result
    result["exact_match"], _ = exact_match(model, tokenizer, prompts, answers, max_new_tokens)
    return result


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("lm-evaluation-harness is not installed; pip install 'lora[eval]' (or pip install "
                         "'lm-eval[hf]') to run --tasks")


def lm_eval_tasks(model: nn.Module, tokenizer, tasks: list[str], include_path: str | os.PathLike | None = None,
                  num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 1,
                  max_length: int | None = None) -> dict[str, Any]:
    """lm-evaluation-harness ``tasks`` on this model object (its ``HFLM`` wrapper around a transformers model).

    Args:
        model: A transformers causal LM, with an adapter applied or merged.
        tokenizer: Its tokenizer.
        tasks: Task (or group) names, from lm-eval's registry or ``include_path``.
        include_path: A folder of task YAML files of your own.
        num_fewshot: Examples in each prompt (default: the task's own).
        limit: Documents per task (a count, or a fraction below 1), for a quick look.
        batch_size: Requests per forward.
        max_length: Longest context (default: the model config's).

    Returns:
        lm-eval's results dict (``results[task]["acc,none"]`` and so on), without its per-sample logs.

    Raises:
        ValueError: lm-eval is missing, a task is unknown, or the model is not a transformers model.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"lm-eval runs transformers models; this is a {type(model).__name__}")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path} is not a folder; give the folder that holds the task YAML "
                         f"files")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {unknown}; pass --include-path DIR for task YAML files of your own "
                         f"(lm-eval's own list: lm_eval ls tasks)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False)
    if results is None:  # lm-eval returns None on processes other than the main one
        return {}
    return results


def task_table(results: dict[str, Any]) -> str:
    """lm-eval's own results table (as its command line prints it)."""
    from lm_eval.utils import make_table

    return make_table(results)


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task -> {metric: value} from lm-eval's results (``"acc,none"`` becomes ``"acc"``; stderrs kept as
    ``"acc_stderr"``), for the JSON file."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        scores[task] = {key.split(",")[0] if key.endswith(",none") else key: value
                        for key, value in metrics.items() if isinstance(value, (int, float)) and "," in key}
    return scores


def data_table(metrics: dict[str, Any]) -> str:
    """The data file's measures as a markdown table, in the style of lm-eval's."""
    em = metrics.get("exact_match")
    rows = [("exact_match", "-" if em is None else f"{em:.4f}"), ("perplexity", f"{metrics['perplexity']:.4f}"),
            ("eval_loss", f"{metrics['eval_loss']:.4f}")]
    lines = ["|File|Examples|Metric|Value|", "|----|-------:|------|----:|"]
    for i, (name, value) in enumerate(rows):
        lines.append(f"|{Path(metrics['file']).name if i == 0 else ''}|{metrics['examples'] if i == 0 else ''}|"
                     f"{name}|{value}|")
    return "\n".join(lines) + "\n"


__all__ = ["load_for_eval", "perplexity", "data_metrics", "lm_eval_tasks", "task_table", "task_scores",
           "data_table", "require_lm_eval"]
