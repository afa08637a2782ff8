"""What the recipe scripts share: config files + ``key=value`` overrides, exact-match evaluation, metrics.json.

A recipe's settings are the fields of its own dataclass plus those of :class:`LoraConfig` and
:class:`TrainConfig`, in one flat namespace: ``python recipes/sft.py r=16 learning_rate=5e-4 train_file=my.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from .adapter_io import check_adapter_folder
from .atomic import atomic_file
from .config import LoraConfig
from .errors import USER_ERRORS, one_line
from .train import TrainConfig

# A comma-separated list of plain module names (q_proj,v_proj): on the command line a list, not a regex.
_NAME_LIST = re.compile(r"\s*[A-Za-z0-9_.]+\s*(,\s*[A-Za-z0-9_.]+\s*)*,?\s*")


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Turn a command-line string into the field's type (YAML files already carry types)."""
    if not isinstance(value, str):
        return value
    if value == "":
        raise ValueError(f"{key}= has no value; write {key}=VALUE ({annotation})")
    if value.lower() in ("none", "null") and "None" in annotation:
        return None
    try:
        if re.fullmatch(r"(bool)( \| None)?", annotation):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if re.fullmatch(r"(int)( \| None)?", annotation):
            return int(value)
        if re.fullmatch(r"(float)( \| None)?", annotation):
            return float(value)
        if "tuple" in annotation or "list" in annotation:
            if value.startswith("["):
                return yaml.safe_load(value)
            if annotation.startswith("str") and not _NAME_LIST.fullmatch(value):
                return value  # "all-linear", or a regex such as .*\.(q|v)_proj (issue 9)
            items = [v.strip() for v in value.split(",") if v.strip()]
            if "[float" in annotation:  # reward_weights=1,0.5
                return [float(v) for v in items]
            return [int(v) for v in items] if "[int" in annotation else items  # layers=0,1
    except (ValueError, yaml.YAMLError):
        raise ValueError(f"{key}={value!r}: expected {annotation}") from None
    return value


def _fields(cls) -> dict[str, str]:
    """Field name -> annotation as text ("int", "float | None"), whether or not annotations are postponed."""
    return {f.name: f.type.__name__ if isinstance(f.type, type) else str(f.type) for f in dataclasses.fields(cls)}


def parse_settings(recipe_cls, argv: list[str]) -> tuple[Any, LoraConfig, TrainConfig]:
    """Read ``--config FILE.yaml`` and ``key=value`` arguments into (recipe settings, LoraConfig, TrainConfig).

    The recipe's dataclass defaults may override LoraConfig/TrainConfig defaults through its ``DEFAULTS`` dict.
    ``validation_split=0`` given without ``early_stopping_patience`` also turns off the recipe's early stopping
    (nothing is left to judge it by), rather than failing on the default patience.

    Raises:
        ValueError: an unknown key (the message lists the valid ones), a malformed argument or a bad value.
    """
    schema = {**_fields(LoraConfig), **_fields(TrainConfig), **_fields(recipe_cls)}
    values: dict[str, Any] = dict(getattr(recipe_cls, "DEFAULTS", {}))
    loaded: dict[str, Any] = {}
    args = list(argv)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ValueError("--config needs a YAML file: --config recipes/configs/sft.yaml")
        path = Path(args[i + 1])
        del args[i:i + 2]
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise ValueError(f"config file {path} {what}; pass a YAML file of settings, e.g. --config "
                             f"recipes/configs/sft.yaml")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML ({one_line(e)}); fix the file") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must be a YAML mapping of settings, found {type(loaded).__name__}")
        _check_keys(loaded, schema, str(path))
        values.update(loaded)
    overrides = {}
    for arg in args:
        if arg in ("-h", "--help"):
            print(_help(recipe_cls, schema, values))
            raise SystemExit(0)
        if "=" not in arg or arg.startswith("-"):
            raise ValueError(f"unexpected argument {arg!r}: settings are key=value (e.g. learning_rate=5e-4), and "
                             f"--config FILE.yaml reads a file")
        key, _, value = arg.partition("=")
        overrides[key] = value
    _check_keys(overrides, schema, "the command line")
    values.update(overrides)
    for key, value in values.items():  # command-line strings, and YAML strings such as 1e-3 (YAML 1.1: a str)
        if isinstance(value, str) and schema[key] != "str":
            values[key] = _coerce(value, schema[key], key)
    given = {**loaded, **overrides}
    if "validation_split" in given and "early_stopping_patience" not in given and not values["validation_split"]:
        values["early_stopping_patience"] = 0

    def part(cls):
        return cls(**{k: v for k, v in values.items() if k in _fields(cls)})

    settings, train_cfg = part(recipe_cls), part(TrainConfig)
    if getattr(settings, "adapter_dir", None):
        _check_adapter_dir(Path(settings.adapter_dir), Path(train_cfg.output_dir))
    return settings, part(LoraConfig), train_cfg


def _check_adapter_dir(adapter_dir: Path, output_dir: Path) -> None:
    """Before any training: saving the adapter replaces its folder, so it must not hold the run's outputs."""
    adapter, output = adapter_dir.resolve(), output_dir.resolve()
    if adapter == output or adapter in output.parents:
        raise ValueError(f"adapter_dir={str(adapter_dir)!r} holds output_dir={str(output_dir)!r}; saving the "
                         f"adapter replaces that folder, which would delete the run's checkpoints. Give them "
                         f"separate folders, e.g. adapter_dir={str(output_dir / 'adapter')!r}")
    check_adapter_folder(adapter_dir)


def _check_keys(given: dict, schema: dict[str, str], where: str) -> None:
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} in {where}. Valid settings: {', '.join(sorted(schema))}")


def _help(recipe_cls, schema: dict[str, str], values: dict) -> str:
    lines = [(recipe_cls.__doc__ or "").strip(), "", "settings (key=value):"]
    defaults = {f.name: f.default for cls in (LoraConfig, TrainConfig, recipe_cls) for f in dataclasses.fields(cls)}
    defaults.update(values)
    lines += [f"  {k} ({schema[k]}) = {defaults.get(k)!r}" for k in sorted(schema)]
    return "\n".join(lines)


def seed_everything(seed: int) -> None:
    """Seed torch (every device) and Python's ``random``: call it before :func:`lora.inject`, whose ``A`` is
    random, so that the same command gives the same adapter (issue 9)."""
    torch.manual_seed(seed)
    random.seed(seed)


def finish(trainer, adapter_dir: str, output_dir: str, metrics: dict, data: dict | None = None) -> dict:
    """Save the trainer's adapter and write ``metrics.json`` (with the adapter's path) into ``output_dir``.

    The adapter folder's model card (README.md) gets ``metrics`` and ``data`` (the files and their counts).

    Every process calls it: under FSDP or ZeRO-3 the adapter is gathered from all of them. The main process writes
    and returns the metrics; the others return ``{}``. A run stopped by Ctrl-C (``metrics["interrupted"]``) is
    saved all the same, with a note on how to resume it.
    """
    adapter = trainer.save_adapter(adapter_dir, card={"data": data or {}, "metrics": metrics})
    if not trainer.accelerator.is_main_process:  # under `accelerate launch`, one process writes the outputs
        return {}
    metrics = {**metrics, "adapter": str(adapter)}
    write_json_atomically(Path(output_dir) / "metrics.json", metrics)
    print(f"adapter saved to {adapter}; metrics in {output_dir}/metrics.json")
    if metrics.get("interrupted"):
        print(f"training was interrupted after step {metrics.get('steps')}; the adapter holds that state. Run the "
              f"same command with resume=true to finish it (the checkpoint is in {output_dir}/checkpoints)")
    return metrics


def data_card(train_file: str, train: list, eval_file: str | None = None, eval_rows: list | None = None,
              stats: Any = None) -> dict:
    """The model card's data section: the files as given, and how many examples (or pairs) each gave."""
    card = {"train_file": str(train_file), "train_examples": len(train)}
    if stats is not None and getattr(stats, "tokens", None):
        card["train_tokens"] = stats.tokens
    if eval_file is not None:
        card.update(eval_file=str(eval_file), eval_examples=len(eval_rows or []))
    return card


def run(main: Callable[[list[str]], dict], argv: list[str] | None = None) -> None:
    """Run a recipe's ``main`` on ``argv`` (default: the command line's): errors the user can act on (bad settings or
    data, a file that cannot be read or written, a NaN stop, Ctrl-C outside training) become one line on stderr and
    exit status 1. ``python recipes/sft.py ...`` and ``lora train sft ...`` both run through here.
    """
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (*USER_ERRORS, yaml.YAMLError) as e:
        sys.exit(f"error: {one_line(e)}")


def write_json_atomically(path: str | Path, data: dict) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


__all__ = ["parse_settings", "seed_everything", "finish", "data_card", "run", "write_json_atomically"]
