"""LoraConfig: what to adapt and how, and its mapping to PEFT's ``adapter_config.json``."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

ALL_LINEAR = "all-linear"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

INITS = ("kaiming", "gaussian", "pissa", "olora")
RESIDUAL_INITS = ("pissa", "olora")  # start from the base weight's principal part, leaving a residual base
BIASES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class LoraConfig:
    """How LoRA adapters are shaped and where they go.

    Args:
        r: Rank of the update ``B @ A`` (``A`` is ``r x in``, ``B`` is ``out x r``).
        alpha: Scaling numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: Dropout probability on the LoRA branch's input only; the base path never sees it.
        targets: ``"all-linear"`` (every Linear/Conv1D except the output head), a list of module-name suffixes
            such as ``["q_proj", "v_proj"]``, or a regex string matched against the full module path.
        exclude: Module-name suffixes (or full paths) never to wrap, even when ``targets`` matches them.
        layers: Only wrap modules inside these block indices (the first integer in the module path).
        rslora: Rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        init: ``"kaiming"`` (A Kaiming-uniform, as nn.Linear) or ``"gaussian"`` (A ~ N(0, 1/r)), B zero either way;
            or ``"pissa"`` (A, B from the top-r singular vectors of W; Meng et al. 2024) / ``"olora"`` (from W's QR
            decomposition; Büyükakyüz 2024), where the base keeps the residual ``W - scale B A``. Such adapters are
            saved as a plain delta for the original base (rank 2r), as PEFT converts them.
        dora: Weight-decomposed LoRA (Liu et al. 2024): a trainable per-output magnitude vector.
        bias: ``"none"``, ``"all"`` (train every bias in the model) or ``"lora_only"`` (biases of wrapped layers).
        modules_to_save: Module-name suffixes trained in full and saved with the adapter (e.g. a classifier head).
        target_parameters: Parameters to adapt directly, as PEFT's ``target_parameters`` (peft#2638): names such as
            ``["experts.gate_up_proj", "experts.down_proj"]`` (suffixes of ``<module path>.<parameter>``), for
            weights that are not ``nn.Linear`` layers, above all the 3-D expert stacks of mixture-of-experts models
            (``(experts, out, in)``; gpt-oss's ``(experts, in, out)``), which get one low-rank update per expert.
            ``"all-linear"`` leaves them out and says so. The update is folded into the weight before the module
            runs, so ``dropout`` must be 0, and DoRA/PiSSA/OLoRA do not apply to them.
        trainable_tokens: Train these rows of the vocabulary in full and nothing else of it (PEFT's
            ``trainable_token_indices``): a list of token ids (e.g. what :func:`lora.add_tokens` returned) trains
            those rows of the input embedding and of the output head (one matrix when they are tied); a mapping
            ``{module-name suffix: ids}`` picks the modules. Only the rows are saved, not the matrices.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ALL_LINEAR
    exclude: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    rslora: bool = False
    init: str = "kaiming"
    dora: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    target_parameters: tuple[str, ...] = ()
    trainable_tokens: tuple[int, ...] | tuple[tuple[str, tuple[int, ...]], ...] | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples so the config stays hashable and frozen.
        for name in ("exclude", "modules_to_save", "target_parameters"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"LoraConfig.{name} must be a list of module names, got the string {value!r}; "
                                 f"write [{value!r}]")
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"LoraConfig.{name} must be a list of module names (strings), got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.targets, (list, tuple)):
            object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "trainable_tokens", _token_rows(self.trainable_tokens))
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(_is_int(i) for i in self.layers):
                raise ValueError(f"LoraConfig.layers must be None or a list of block indices (integers >= 0), "
                                 f"got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))

        if not _is_int(self.r) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("rslora", "dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoraConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        if self.init in RESIDUAL_INITS and self.dora:
            raise ValueError(f"LoraConfig(init={self.init!r}) cannot be combined with dora=True; choose one")
        if self.bias not in BIASES:
            raise ValueError(f"LoraConfig.bias must be one of {BIASES}, got {self.bias!r}")
        if isinstance(self.targets, str):
            if self.targets != ALL_LINEAR:
                try:
                    re.compile(self.targets)
                except re.error as e:
                    raise ValueError(f"LoraConfig.targets {self.targets!r} is neither 'all-linear' nor a valid "
                                     f"regex ({e}); pass a list of module-name suffixes instead") from None
        elif not isinstance(self.targets, tuple) or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoraConfig.targets must be 'all-linear', a regex string or a non-empty list of "
                             f"module names, got {self.targets!r}")
        elif not self.targets and not self.target_parameters:
            # an empty list is allowed only beside parameters: PEFT needs target_modules or target_parameters
            raise ValueError("LoraConfig.targets must be 'all-linear', a regex string or a non-empty list of module "
                             "names (an empty list only beside target_parameters), got []")
        if self.target_parameters:
            problem = ("dropout" if self.dropout else "dora=True" if self.dora
                       else f"init={self.init!r}" if self.init in RESIDUAL_INITS else None)
            if problem:
                # the update is folded into the weight (W + scale B A) before the module runs: there is no LoRA
                # input to drop out, and no single weight whose norm or principal part DoRA/PiSSA could start from
                raise ValueError(f"LoraConfig.target_parameters {list(self.target_parameters)} cannot be combined "
                                 f"with {problem}: a parameter's update is folded into the weight before its "
                                 f"module runs. Set {'dropout=0.0' if problem == 'dropout' else 'the default'} or "
                                 f"adapt the parameters in an adapter of their own")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"LoraConfig.layers must be None or a non-empty list of block indices >= 0, "
                             f"got {self.layers!r}")

    @property
    def scale(self) -> float:
        """The factor applied to ``B @ A``."""
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some fields changed (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)

    def to_peft(self, target_paths: list[str], base_model_name_or_path: str | None = None,
                task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` content.

        ``target_modules`` is written as the exact list of wrapped module paths (what PEFT itself writes for
        ``"all-linear"``), so PEFT and vLLM re-create exactly our layers whatever ``exclude``/``layers`` said.
        ``task_type`` picks PEFT's wrapper class (``"CAUSAL_LM"``, ``"SEQ_CLS"``, or None for a plain module).
        """
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(target_paths) or None,
            "fan_in_fan_out": False,  # set per model by adapter_io when the wrapped layers are GPT-2 Conv1D
            "use_rslora": self.rslora,
            "use_dora": self.dora,
            "init_lora_weights": {"kaiming": True}.get(self.init, self.init),
            "bias": self.bias,
            "modules_to_save": list(self.modules_to_save) or None,
            "layers_to_transform": None,
            "target_parameters": list(self.target_parameters) or None,
            "trainable_token_indices": _peft_token_rows(self.trainable_tokens),
            "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path,
        }

    @classmethod
    def from_peft(cls, cfg: dict[str, Any]) -> "LoraConfig":
        """Build a config from a PEFT ``adapter_config.json`` dict (ours or PEFT's).

        Raises:
            ValueError: the file is not a LoRA config, or uses PEFT features this library does not implement.
        """
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json has peft_type={cfg.get('peft_type')!r}; only 'LORA' adapters "
                             f"can be loaded")
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key):
                raise ValueError(f"adapter_config.json uses PEFT's {key!r} (per-layer ranks/alphas), which this "
                                 f"library does not support; re-train with one r and lora_alpha")
        if cfg.get("lora_bias"):
            raise ValueError("adapter_config.json sets lora_bias=true (a bias on lora_B), which this library does "
                             "not support")
        if "r" not in cfg or ("target_modules" not in cfg and not cfg.get("target_parameters")):
            raise ValueError(f"adapter_config.json lacks {'r' if 'r' not in cfg else 'target_modules'!r}; it is "
                             f"not a LoRA adapter config")
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith(RESIDUAL_INITS):
            raise ValueError(f"adapter_config.json has init_lora_weights={init!r}: its weights are relative to a "
                             f"residual base that only exists after PiSSA/OLoRA initialisation, not to the original "
                             f"model. Re-save it converted to a plain delta (PEFT: save_pretrained(..., "
                             f"path_initial_model_for_weight_conversion=...); lora.save_adapter does this itself)")
        layers = cfg.get("layers_to_transform")
        if _is_int(layers):
            layers = [layers]
        exclude = cfg.get("exclude_modules") or ()
        if isinstance(exclude, str):
            raise ValueError("adapter_config.json gives exclude_modules as a regex, which this library does not "
                             "support; use a list of module names")
        try:  # the values as written: LoraConfig checks each one (no int() that would truncate r=2.7 to 2)
            return cls(r=cfg["r"], alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout", 0.0),
                       targets=cfg.get("target_modules") or (), exclude=exclude, layers=layers,
                       rslora=cfg.get("use_rslora", False), init="gaussian" if init == "gaussian" else "kaiming",
                       dora=cfg.get("use_dora", False), bias=cfg.get("bias", "none"),
                       modules_to_save=cfg.get("modules_to_save") or (),
                       target_parameters=cfg.get("target_parameters") or (),
                       trainable_tokens=cfg.get("trainable_token_indices") or None)
        except ValueError as e:
            names = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
                     "target_parameters": "target_parameters", "trainable_tokens": "trainable_token_indices",
                     "exclude": "exclude_modules", "layers": "layers_to_transform", "rslora": "use_rslora",
                     "dora": "use_dora", "modules_to_save": "modules_to_save", "bias": "bias"}
            message = re.sub(r"LoraConfig\.(\w+)", lambda m: f"'{names.get(m.group(1), m.group(1))}'", str(e))
            raise ValueError(f"adapter_config.json: {message}. The file is damaged or was not written for a LoRA "
                             f"adapter; re-save the adapter") from None


def _token_ids(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value \
            or not all(_is_int(i) and i >= 0 for i in value):
        raise ValueError(f"LoraConfig.trainable_tokens{where} must be a non-empty list of token ids (integers >= 0, "
                         f"e.g. what lora.add_tokens returned), got {value!r}")
    return tuple(dict.fromkeys(value))  # in order, each once


def _token_rows(value: Any) -> tuple | None:
    """``trainable_tokens`` as stored: None, a tuple of ids, or ``((module suffix, ids), ...)`` for a mapping."""
    if value is None:
        return None
    if isinstance(value, dict) or (isinstance(value, tuple) and value and all(
            isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value)):
        pairs = value.items() if isinstance(value, dict) else value
        if not pairs:
            raise ValueError("LoraConfig.trainable_tokens is an empty mapping; give {module name: [token ids]}")
        out = []
        for name, ids in pairs:
            if not isinstance(name, str) or not name:
                raise ValueError(f"LoraConfig.trainable_tokens maps module names to token ids; {name!r} is not a "
                                 f"module name")
            out.append((name, _token_ids(list(ids) if isinstance(ids, tuple) else ids, f"[{name!r}]")))
        return tuple(out)
    return _token_ids(value, "")


def _peft_token_rows(rows: tuple | None) -> list[int] | dict[str, list[int]] | None:
    """PEFT's ``trainable_token_indices`` for the stored form (adapter_io replaces it by what was wrapped)."""
    if rows is None:
        return None
    if rows and isinstance(rows[0], tuple):
        return {name: list(ids) for name, ids in rows}
    return list(rows)


__all__ = ["LoraConfig", "ALL_LINEAR", "RESIDUAL_INITS"]
