"""LoRALinear: a frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus named low-rank updates ``scale * B @ A``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoraConfig


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is stored ``in x out``."""
    # Checked by name so that importing transformers is never required for plain PyTorch models.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


class LoRALinear(nn.Module):
    """Wraps a linear layer: ``y = base(x) + sum over active adapters of scale * B(A(dropout(x)))``.

    The base layer is kept as ``base_layer`` (PEFT's name) and never trained. Each adapter has its own
    ``lora_A[name]`` (``r x in``), ``lora_B[name]`` (``out x r``), dropout and scale, and optionally a DoRA
    magnitude vector. All weight math lives in :meth:`delta_weight`; merging adds it to the base weight in fp32
    and casts back once.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_linear_like(base_layer):
            raise ValueError(f"LoRALinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        out_features, in_features = self._base_weight_view().shape
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA: one magnitude per output feature
        self.scaling: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.disabled = False
        # DoRA's merged weight is m / ||W + dW|| * (W + dW); unmerging needs that norm as it was at merge time.
        self._dora_merge_norms: dict[str, torch.Tensor] = {}

    # -- adapters -----------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        """Add adapter ``name`` with a fresh A (Kaiming-uniform or Gaussian) and a zero B, so outputs are unchanged."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        device = self.base_layer.weight.device
        # LoRA weights are always fp32: they are small, and bf16 updates would lose most of a small learning rate.
        A = nn.Linear(self.in_features, cfg.r, bias=False, device=device, dtype=torch.float32)
        B = nn.Linear(cfg.r, self.out_features, bias=False, device=device, dtype=torch.float32)
        if cfg.init == "kaiming":
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # nn.Linear's own init, as in the LoRA paper's code
        else:
            nn.init.normal_(A.weight, std=1.0 / cfg.r)
        nn.init.zeros_(B.weight)
        self.lora_A[name] = A
        self.lora_B[name] = B
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scale
        if cfg.dora:
            # With B = 0, ||W + dW|| = ||W||: the magnitude starts at the base weight's row norms (DoRA, eq. 2).
            self.lora_magnitude_vector[name] = nn.Parameter(self._base_weight_view().float().norm(dim=1))
        self.active_adapters = self.active_adapters + (name,)

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active_adapters = tuple(n for n in names if n in self.lora_A)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.lora_A.keys())

    # -- weights --------------------------------------------------------------------------------------------------
    def _base_weight_view(self) -> torch.Tensor:
        """The base weight as ``out x in`` (a transposed view for Conv1D), in its own dtype."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def _lora_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in fp32, ``out x in``."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def delta_weight(self, name: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """What adapter ``name`` adds to the base weight, ``out x in``, in fp32.

        Plain LoRA: ``scale * B @ A``. DoRA: ``m / ||W + scale B A||_row * (W + scale B A) - W`` for the given
        (default: current) base weight ``W``.
        """
        delta = self._lora_weight(name)  # (out, in)
        if name in self.lora_magnitude_vector:
            W = (self._base_weight_view() if base_weight is None else base_weight).float()
            combined = W + delta
            norm = combined.norm(dim=1, keepdim=True)  # (out, 1)
            delta = self.lora_magnitude_vector[name].float().unsqueeze(1) / norm * combined - W
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add every active, not yet merged adapter into the base weight (fp32 math, one cast back). Idempotent."""
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            weight = self.base_layer.weight
            W = self._base_weight_view().float()
            if name in self.lora_magnitude_vector:
                self._dora_merge_norms[name] = (W + self._lora_weight(name)).norm(dim=1)  # (out,)
            merged = W + self.delta_weight(name, W)
            weight.copy_((merged.T if self.fan_in_fan_out else merged).to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters again, last merged first. Idempotent."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_layer.weight
            W = self._base_weight_view().float()
            if name in self.lora_magnitude_vector:
                norm = self._dora_merge_norms.pop(name)
                W = W * (norm / self.lora_magnitude_vector[name].float()).unsqueeze(1)  # undo m / ||W + dW||
            restored = W - self._lora_weight(name)
            weight.copy_((restored.T if self.fan_in_fan_out else restored).to(weight.dtype))

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.disabled:
            return result
        base_result = result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            dropout = self.lora_dropout[name]
            x_lora = dropout(x)
            # .to() is a no-op when dtypes agree (fp32 training, or autocast handling the matmuls).
            lora_out = B(A(x_lora.to(A.weight.dtype)))  # (..., r) -> (..., out)
            if name in self.lora_magnitude_vector:
                result = result + self._dora_extra(name, x_lora, base_result, lora_out, isinstance(dropout, nn.Identity))
            else:
                result = result + (lora_out * self.scaling[name]).to(result.dtype)
        return result

    def _dora_extra(self, name: str, x_lora: torch.Tensor, base_result: torch.Tensor, lora_out: torch.Tensor,
                    no_dropout: bool) -> torch.Tensor:
        """DoRA's addition to the base output: ``(m/||W+dW|| - 1) * W x + m/||W+dW|| * scale * B A x``."""
        W = self._base_weight_view()
        lora_weight = self.lora_B[name].weight @ self.lora_A[name].weight  # (out, in)
        # DoRA, section 4.3: the norm is treated as a constant (detached) to save memory; PEFT does the same.
        norm = (W.to(lora_weight.dtype) + self.scaling[name] * lora_weight.detach()).norm(dim=1).detach()  # (out,)
        mag_scale = self.lora_magnitude_vector[name] / norm  # (out,)
        if no_dropout:
            bias = self.base_layer.bias
            base_no_bias = base_result if bias is None else base_result - bias
        else:
            base_no_bias = F.linear(x_lora.to(W.dtype), W)
        extra = (mag_scale - 1) * base_no_bias.to(mag_scale.dtype) + mag_scale * lora_out * self.scaling[name]
        return extra.to(base_result.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters={list(self.adapters)}, "
                f"active={list(self.active_adapters)}, merged={self.merged_adapters}")


__all__ = ["LoRALinear", "is_conv1d", "is_linear_like"]
