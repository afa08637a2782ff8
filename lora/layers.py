"""LoRALinear: a frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus named low-rank updates ``scale * B @ A``; and what
adapts the weights that are not linear layers: parameters (mixture-of-experts stacks), embeddings, vocabulary rows."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import RESIDUAL_INITS, LoraConfig


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is stored ``in x out``."""
    # Checked by name so that importing transformers is never required for plain PyTorch models.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def principal_init_problem(layer: nn.Module, cfg) -> str | None:
    """Why adapter config ``cfg`` (PiSSA/OLoRA) cannot start from the principal part of ``layer`` (a linear layer,
    or one already wrapped), or None; :func:`lora.inject` asks every target before it wraps any."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    if isinstance(layer, LoRALinear) and (layer.initial_factors or layer.merged_adapters):
        return (f"init={cfg.init!r} rewrites the base weight into a residual; a layer can hold one such adapter, "
                f"with nothing merged (remove or unmerge the others first)")
    if hasattr(base.weight, "get_original_weight"):
        return (f"init={cfg.init!r} rewrites the base weight into a residual, which a 4-bit base (quantize='nf4') "
                f"cannot hold; use init='kaiming' or 'gaussian' with quantize='nf4'")
    smaller = min(base.weight.shape)  # (out, in), or (in, out) for Conv1D
    if cfg.r > smaller:
        return f"init={cfg.init!r} needs r <= min(in, out) = {smaller}, got r={cfg.r}"
    return None


class RowGroups:
    """Which batch rows each adapter serves under :func:`lora.row_adapters`, worked out once for the whole model.

    Rows of one adapter are a slice where they are contiguous (a view: no copy in, an in-place add out), else an
    index tensor; either way each adapter runs once over its rows, and the output is written in place.
    """

    def __init__(self, names: tuple[str | None, ...]):
        self.names = tuple(names)
        self._rows: dict[str | None, slice | torch.Tensor] = {}
        for name in dict.fromkeys(self.names):
            indices = [i for i, n in enumerate(self.names) if n == name]
            contiguous = indices == list(range(indices[0], indices[-1] + 1))
            self._rows[name] = slice(indices[0], indices[-1] + 1) if contiguous else torch.tensor(indices)

    def __iter__(self):
        return iter(self._rows)

    def check(self, batch: int) -> None:
        if len(self.names) != batch:
            raise ValueError(f"row_adapters names {len(self.names)} adapters for a batch of {batch} rows; give one "
                             f"name (or None for the base model) per row")

    def _index(self, name: str | None, device: torch.device) -> slice | torch.Tensor:
        rows = self._rows[name]
        if isinstance(rows, torch.Tensor) and rows.device != device:
            rows = self._rows[name] = rows.to(device)  # moved once, then reused by every layer
        return rows

    def take(self, x: torch.Tensor, name: str | None) -> torch.Tensor:
        """The rows of ``x`` that adapter ``name`` serves."""
        return x[self._index(name, x.device)]  # a view for a slice; a gather (faster on CPU than index_select)

    def add_(self, result: torch.Tensor, name: str | None, update: torch.Tensor) -> None:
        """Add ``update`` into the rows of ``result`` that adapter ``name`` serves, in place."""
        rows = self._index(name, result.device)
        if isinstance(rows, slice):
            result[rows] += update.to(result.dtype)
        else:  # index_put_ rather than index_add_: several times faster along dim 0 on CPU
            result.index_put_((rows,), update.to(result.dtype), accumulate=True)

    def put_(self, result: torch.Tensor, name: str | None, values: torch.Tensor) -> None:
        """Write ``values`` into the rows of ``result`` that adapter ``name`` serves, in place."""
        result[self._index(name, result.device)] = values.to(result.dtype)


# -- the weight math: the one place every path (live layers, the state-dict merge, export) computes it ----------------
def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B @ A`` in fp32, ``out x in``, from ``A`` (``r x in``) and ``B`` (``out x r``)."""
    return (B.float() @ A.float()) * scale


def merged_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """The merged weight in fp32, ``out x in``: ``W + scale B A``, or with DoRA's magnitude ``m``
    ``m / ||W + scale B A||_row * (W + scale B A)`` (Liu et al. 2024, eq. 5)."""
    combined = W.float() + lora_delta(A, B, scale)
    if magnitude is None:
        return combined
    return magnitude.float().unsqueeze(1) / combined.norm(dim=1, keepdim=True) * combined


def unmerged_weight(merged: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                    magnitude: torch.Tensor | None = None, merge_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`merged_weight` in fp32. DoRA needs ``merge_norm``, the row norms of ``W + scale B A`` at
    merge time (the merged weight alone no longer holds them)."""
    W = merged.float()
    if magnitude is not None:
        W = W * (merge_norm / magnitude.float()).unsqueeze(1)  # undo m / ||W + dW||
    return W - lora_delta(A, B, scale)


def expert_delta(A: torch.Tensor, B: torch.Tensor, scale: float, num_experts: int) -> torch.Tensor:
    """``scale * B_e @ A_e`` for every expert ``e``, fp32, ``(experts, out, in)``, from PEFT's layout for a parameter
    adapter (its ``ParamWrapper``): ``A`` is ``(experts * r) x in`` with expert ``e``'s rows at ``e*r .. e*r + r-1``,
    ``B`` is ``out x (r * experts)`` with expert ``e``'s columns at ``e, e + experts, e + 2 experts, ...``."""
    A_e = A.float().reshape(num_experts, -1, A.shape[-1])  # (E, r, in)
    B_e = B.float().reshape(B.shape[0], -1, num_experts).permute(2, 0, 1)  # (E, out, r)
    return torch.bmm(B_e, A_e) * scale  # (E, out, in)


def parameter_delta(A: torch.Tensor, B: torch.Tensor, scale: float, shape: torch.Size | tuple[int, ...],
                    transposed: bool = False) -> torch.Tensor:
    """What a parameter adapter adds to a parameter of ``shape``, fp32, in the parameter's own layout: ``(out, in)``
    for a 2-D weight, ``(experts, out, in)`` for an expert stack, ``(experts, in, out)`` where the experts module
    says its stacks are transposed (gpt-oss)."""
    if len(shape) == 2:
        return lora_delta(A, B, scale)
    delta = expert_delta(A, B, scale, shape[0])
    return delta.transpose(1, 2) if transposed else delta


def embedding_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """What an embedding adapter adds to the embedding matrix, fp32, ``(num_embeddings, dim)``, from PEFT's
    ``lora_embedding_A`` (``r x num_embeddings``) and ``lora_embedding_B`` (``dim x r``)."""
    return lora_delta(A, B, scale).T


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
        self.row_adapters: RowGroups | None = None  # one adapter (or None) per batch row: lora.row_adapters()
        # DoRA's merged weight is m / ||W + dW|| * (W + dW); unmerging needs that norm as it was at merge time.
        self._dora_merge_norms: dict[str, torch.Tensor] = {}
        # PiSSA/OLoRA: the (A0, B0) an adapter started from. Meanwhile the base layer holds the residual
        # W - scale B0 A0, and wherever that adapter is not in effect its initial part is added back, so the
        # base model every other path sees is still W.
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- adapters -----------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        """Add adapter ``name`` with a fresh A (Kaiming-uniform or Gaussian) and a zero B, so outputs are unchanged;
        or, for PiSSA/OLoRA, A and B from the base weight's principal part, the base keeping the residual."""
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
        if cfg.init in RESIDUAL_INITS:
            self._start_from_principal_part(name, cfg)
        if cfg.dora:
            # With B = 0, ||W + dW|| = ||W||: the magnitude starts at the base weight's row norms (DoRA, eq. 2).
            self.lora_magnitude_vector[name] = nn.Parameter(self._base_weight_view().float().norm(dim=1))
        self.active_adapters = self.active_adapters + (name,)
        self.train(self.training)  # the new modules take the layer's mode: in eval mode, no dropout

    @torch.no_grad()
    def _start_from_principal_part(self, name: str, cfg: LoraConfig) -> None:
        """PiSSA: ``scale B0 A0`` = the top-r singular part of W. OLoRA: ``B0 = Q[:, :r]``, ``A0 = R[:r]`` of W = QR.
        The base layer then holds ``W - scale B0 A0``, so the output is unchanged (up to rounding)."""
        problem = principal_init_problem(self, cfg)
        if problem:
            raise ValueError(problem)
        W = self._base_weight_view().float()  # (out, in)
        if cfg.init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            root = (S[:cfg.r] / cfg.scale).sqrt()  # (r,)
            A0, B0 = root[:, None] * Vh[:cfg.r], U[:, :cfg.r] * root  # (r, in), (out, r)
        else:
            Q, R = torch.linalg.qr(W)
            A0, B0 = R[:cfg.r], Q[:, :cfg.r]
        self.lora_A[name].weight.copy_(A0)
        self.lora_B[name].weight.copy_(B0)
        self.initial_factors[name] = (A0.clone(), B0.clone())
        self._write_base(W - lora_delta(A0, B0, cfg.scale))

    def remove_adapter(self, name: str) -> None:
        """Delete adapter ``name`` (not merged); a PiSSA/OLoRA adapter gives the base its full weight back."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; call lora.unmerge(model) first")
        if name in self.initial_factors:
            A0, B0 = self.initial_factors.pop(name)
            with torch.no_grad():
                self._write_base(self._base_weight_view().float() + lora_delta(A0, B0, self.scaling[name]))
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.scaling.pop(name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active_adapters = tuple(n for n in names if n in self.lora_A)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.lora_A.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s own trained tensors by their key under this layer's path (PEFT's names)."""
        out = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return out

    @property
    def base_parameter(self) -> nn.Parameter:
        """The base weight as the model stores it (what a base fingerprint samples, and its dtype)."""
        return self.base_layer.weight

    # -- weights --------------------------------------------------------------------------------------------------
    def _base_weight_view(self) -> torch.Tensor:
        """The base weight as ``out x in`` (a transposed view for Conv1D), in its own dtype; a 4-bit NF4 base
        (QLoRA) as its dequantized values."""
        w = self.base_layer.weight
        if hasattr(w, "get_original_weight"):
            w = w.get_original_weight()
        return w.T if self.fan_in_fan_out else w

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """``(A, B, scale, DoRA magnitude or None)`` of adapter ``name``: the arguments of the weight math."""
        return (self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                self.lora_magnitude_vector[name] if name in self.lora_magnitude_vector else None)

    def base_weight(self) -> torch.Tensor:
        """The base weight without any adapter, ``out x in``, in fp32 (the layer is left as it is): merged adapters
        subtracted, PiSSA/OLoRA initial parts added back."""
        W = self._base_weight_view().float()
        for name in reversed(self.merged_adapters):
            W = unmerged_weight(W, *self._factors(name), merge_norm=self._dora_merge_norms.get(name))
        for name, (A0, B0) in self.initial_factors.items():
            W = W + lora_delta(A0, B0, self.scaling[name])
        return W

    def delta_weight(self, name: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """What adapter ``name`` adds to the base weight, ``out x in``, in fp32.

        Plain LoRA: ``scale * B @ A``. DoRA: ``m / ||W + scale B A||_row * (W + scale B A) - W`` for the given
        (default: current) base weight ``W``.
        """
        A, B, scale, magnitude = self._factors(name)
        if magnitude is None:
            return lora_delta(A, B, scale)
        W = (self._base_weight_view() if base_weight is None else base_weight).float()
        return merged_weight(W, A, B, scale, magnitude) - W

    def _write_base(self, W: torch.Tensor) -> None:
        """Store an ``out x in`` fp32 weight into the base layer, in its layout and dtype (one cast)."""
        if hasattr(self.base_layer, "full_precision_sample"):
            raise ValueError("this base weight is 4-bit (quantize='nf4'), for training only: writing a merge into it "
                             "would round the adapter away. Merge into the full-precision base instead: lora merge "
                             "--model <base> --adapter <folder>, or lora.merge_state_dict(base_state_dict, folder)")
        weight = self.base_layer.weight
        weight.copy_((W.T if self.fan_in_fan_out else W).to(weight.dtype))

    def check_mergeable(self) -> None:
        """Refuse to merge two DoRA adapters in one step: each one's update is relative to the base weight under it
        (the forward's), and merged one after the other the second would be relative to the first's merge."""
        dora = [n for n in self.active_adapters if n not in self.merged_adapters and n in self.lora_magnitude_vector]
        if len(dora) > 1:
            raise ValueError(f"DoRA adapters {dora} would be merged in one step, but each one's update depends on "
                             f"the base weight under it; merge them one at a time (lora.set_active(model, "
                             f"{dora[0]!r}), lora.merge(model), then lora.set_active(model, {dora}) and merge again)")

    @torch.no_grad()
    def merge(self) -> None:
        """Add every active, not yet merged adapter into the base weight (fp32 math, one cast back). Idempotent.

        A DoRA adapter goes first: the forward computes its update against the base weight without the other
        adapters of this step, and plain updates do not depend on the base."""
        self.check_mergeable()
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        for name in sorted(pending, key=lambda n: n not in self.lora_magnitude_vector):  # stable: DoRA first
            W = self._base_weight_view().float()
            A, B, scale, magnitude = self._factors(name)
            if magnitude is not None:
                self._dora_merge_norms[name] = (W + lora_delta(A, B, scale)).norm(dim=1)  # (out,)
            self._write_base(merged_weight(W, A, B, scale, magnitude))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters again, last merged first. Idempotent."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            W = self._base_weight_view().float()
            merge_norm = self._dora_merge_norms.pop(name, None)
            self._write_base(unmerged_weight(W, *self._factors(name), merge_norm=merge_norm))

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        for name in self.initial_factors:
            if self.disabled or name not in self.active_adapters or self.row_adapters is not None:
                result = self._add_initial_part(name, x, result, self.row_adapters)
        if self.disabled:
            return result
        if self.row_adapters is not None:
            return self._add_row_updates(x, result)
        base_result = result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            dropout = self.lora_dropout[name]
            x_lora = dropout(x)
            # .to() is a no-op when dtypes agree (fp32 training, or autocast handling the matmuls).
            if name in self.lora_magnitude_vector:
                lora_out = B(A(x_lora.to(A.weight.dtype)))  # (..., r) -> (..., out)
                no_dropout = isinstance(dropout, nn.Identity)
                result = result + self._dora_extra(name, x_lora, base_result, lora_out, no_dropout)
            else:
                # scaled at rank r, not at the output width: the same product with a far smaller multiply
                result = result + B(A(x_lora.to(A.weight.dtype)) * self.scaling[name]).to(result.dtype)
        return result

    def _add_initial_part(self, name: str, x: torch.Tensor, result: torch.Tensor,
                          groups: RowGroups | None) -> torch.Tensor:
        """Add back ``scale B0 A0 x``, the part of W a PiSSA/OLoRA adapter took over, where it is not in effect
        (with per-row adapters: on the rows of other adapters)."""
        A0, B0 = (t.to(x.device) for t in self.initial_factors[name])
        if groups is None:
            return result + (F.linear(F.linear(x.to(A0.dtype), A0), B0) * self.scaling[name]).to(result.dtype)
        for other in groups:
            if other != name:
                part = F.linear(F.linear(groups.take(x, other).to(A0.dtype), A0), B0) * self.scaling[name]
                groups.add_(result, other, part)
        return result

    def _add_row_updates(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each batch row gets the update of its own adapter (``row_adapters[i]``; None or an adapter that does not
        wrap this layer: the base alone). One A/B pass per adapter over its rows, not one per row."""
        groups = self.row_adapters
        groups.check(x.shape[0])
        for name in groups:
            if name not in self.lora_A:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            x_rows = self.lora_dropout[name](groups.take(x, name))  # (rows, T, in)
            groups.add_(result, name, B(A(x_rows.to(A.weight.dtype))) * self.scaling[name])  # (rows, T, out)
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


class _LowRankBase(nn.Module):
    """What :class:`LoRAParameter` and :class:`LoRAEmbedding` share: the adapter bookkeeping of :class:`LoRALinear`
    (named adapters, active and merged ones, ``disabled``), and merging by adding :meth:`delta_weight` to one base
    tensor in fp32 with one cast back. Subclasses say where that tensor is and how the update is computed."""

    fan_in_fan_out = False

    def __init__(self):
        super().__init__()
        self.scaling: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: RowGroups | None = None
        # what the code that handles every wrapper asks of LoRALinear: these adapters have neither
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lora_magnitude_vector = nn.ParameterDict()

    @property
    def base_parameter(self) -> nn.Parameter:
        raise NotImplementedError

    def delta_weight(self, name: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active_adapters = tuple(n for n in names if n in self.adapters)

    def check_mergeable(self) -> None:
        """Every adapter here is a plain low-rank delta: any set of them merges in one step."""

    def _pending(self) -> list[str]:
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def _with(self, W: torch.Tensor, names: list[str], sign: float = 1.0) -> torch.Tensor:
        """``W`` plus (``sign`` -1: minus) the updates of ``names``, fp32."""
        out = W.float()
        for name in names:
            out = out + sign * self.delta_weight(name)
        return out

    def base_weight(self) -> torch.Tensor:
        """The base tensor without any adapter, in its own layout, fp32 (the module is left as it is)."""
        return self._with(self.base_parameter, self.merged_adapters, -1.0)

    def adapted_weight(self) -> torch.Tensor | None:
        """The base tensor with the active, unmerged adapters added (fp32 math, one cast to its dtype): exactly what
        :meth:`merge` writes. None when nothing is to be added."""
        pending = [] if self.disabled else self._pending()
        if not pending:
            return None
        W = self.base_parameter
        return self._with(W, pending).to(W.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add every active, not yet merged adapter into the base tensor (fp32 math, one cast back). Idempotent."""
        pending = self._pending()
        if pending:
            W = self.base_parameter
            W.copy_(self._with(W, pending).to(W.dtype))  # the tensor adapted_weight() gives the forward
            self.merged_adapters.extend(pending)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapters again. Idempotent."""
        if self.merged_adapters:
            W = self.base_parameter
            W.copy_(self._with(W, self.merged_adapters, -1.0).to(W.dtype))
            self.merged_adapters.clear()

    def extra_repr(self) -> str:
        return (f"adapters={list(self.adapters)}, active={list(self.active_adapters)}, "
                f"merged={self.merged_adapters}")


def _init_a(weight: torch.Tensor, cfg: LoraConfig) -> None:
    if cfg.init == "gaussian":
        nn.init.normal_(weight, std=1.0 / cfg.r)
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's own init, as LoRALinear's A


class LoRAParameter(_LowRankBase):
    """Adapts one parameter of a module directly (PEFT's ``target_parameters``, its ``ParamWrapper``): a 2-D weight
    ``(out, in)``, or a stack of experts ``(experts, out, in)`` with a rank-``r`` update per expert.

    transformers 5 keeps a mixture-of-experts layer's experts as such stacks (``experts.gate_up_proj``,
    ``experts.down_proj``), not as ``nn.Linear`` layers. The experts' own forward (whichever kernel transformers
    picks) runs on ``W + scale * B_e A_e``, computed before the call in fp32 and cast once: the very tensor
    :meth:`merge` writes, so merged and unmerged models compute the same. That costs one copy of the adapted stack
    per call while adapters are unmerged (as in PEFT).

    One wrapper adapts one parameter; a second parameter of the same module gets a second wrapper around the first
    (``experts.base_layer`` is then the inner one), as PEFT nests them, so the module paths, and the adapter keys
    with them, are PEFT's. The LoRA tensors keep PEFT's layout: ``lora_A`` ``(experts * r) x in``, ``lora_B``
    ``out x (r * experts)`` (see :func:`expert_delta`).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        param = self.owner._parameters.get(parameter_name)
        if not isinstance(param, nn.Parameter) or param.dim() not in (2, 3) or not param.is_floating_point():
            raise ValueError(f"target_parameters: {type(self.owner).__name__}.{parameter_name} is not a 2-D or 3-D "
                             f"floating-point parameter of its module, so it cannot take a low-rank update")
        # transformers' experts modules say how their stacks are laid out; (experts, out, in) unless transposed
        self.transposed = param.dim() == 3 and bool(getattr(self.owner, "is_transposed", False))
        self.num_experts = param.shape[0] if param.dim() == 3 else 1
        rows, cols = param.shape[-2:]
        self.out_features, self.in_features = (cols, rows) if self.transposed else (rows, cols)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def owner(self) -> nn.Module:
        """The module that holds the parameter (under any other parameter wrappers)."""
        module = self.base_layer
        while isinstance(module, LoRAParameter):
            module = module.base_layer
        return module

    @property
    def base_parameter(self) -> nn.Parameter:
        return self.owner._parameters[self.parameter_name]

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.lora_A.keys())

    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        """Add adapter ``name``: A as LoRALinear's, B zero, one rank-``r`` pair per expert; outputs are unchanged."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this parameter")
        device = self.base_parameter.device
        rank = cfg.r * self.num_experts
        A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        _init_a(A.weight, cfg)
        nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.scaling[name] = cfg.scale
        self.active_adapters = self.active_adapters + (name,)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; call lora.unmerge(model) first")
        del self.lora_A[name], self.lora_B[name]
        self.scaling.pop(name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def delta_weight(self, name: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """What adapter ``name`` adds to the parameter, fp32, in the parameter's layout."""
        return parameter_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                               self.base_parameter.shape, self.transposed)

    def forward(self, *args, **kwargs):
        # Every parameter wrapper around the module contributes its adapted tensor; the module then runs once on all
        # of them (functional_call swaps them in for this call only).
        weights: dict[str, torch.Tensor] = {}
        layer: nn.Module = self
        while isinstance(layer, LoRAParameter):
            if layer.row_adapters is not None and any(n in layer.adapters for n in layer.row_adapters):
                raise ValueError("row_adapters cannot give rows different parameter adapters (target_parameters): "
                                 "the update is folded into the whole weight; run such adapters in batches of "
                                 "their own with lora.set_active")
            adapted = layer.adapted_weight()
            if adapted is not None:
                weights[layer.parameter_name] = adapted
            layer = layer.base_layer
        if not weights:
            return layer(*args, **kwargs)
        return torch.func.functional_call(layer, weights, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        shape = tuple(self.base_parameter.shape)
        return f"parameter={self.parameter_name!r}, shape={shape}, experts={self.num_experts}, " + super().extra_repr()


class LoRAEmbedding(_LowRankBase):
    """Wraps an ``nn.Embedding``: ``y = base(ids) + scale * embed(ids, A^T) @ B^T`` (PEFT's LoRA ``Embedding``).

    ``lora_embedding_A[name]`` is ``r x num_embeddings`` and ``lora_embedding_B[name]`` is ``dim x r``, PEFT's names
    and shapes; the merged matrix is ``W + scale * (B @ A)^T`` (:func:`embedding_delta`). A is zero and B Gaussian
    when fresh, as PEFT initialises them, so a fresh adapter changes nothing. An embedding that scales its output
    (Gemma's ``embed_scale``) scales the update too. Dropout does not apply: the input is token ids.
    """

    def __init__(self, base_layer: nn.Embedding):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise ValueError(f"LoRAEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @property
    def base_parameter(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.lora_embedding_A.keys())

    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        if name in self.lora_embedding_A:
            raise ValueError(f"adapter {name!r} already exists on this embedding")
        device = self.base_layer.weight.device
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(cfg.r, self.in_features, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, cfg.r, device=device))
        self.scaling[name] = cfg.scale
        self.active_adapters = self.active_adapters + (name,)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; call lora.unmerge(model) first")
        del self.lora_embedding_A[name], self.lora_embedding_B[name]
        self.scaling.pop(name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def delta_weight(self, name: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return embedding_delta(self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name])

    def _update(self, name: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``scale * embed(ids, A^T) @ B^T`` (times the embedding's own output scale), ``(..., dim)``."""
        base = self.base_layer
        after_a = F.embedding(ids, self.lora_embedding_A[name].T, padding_idx=base.padding_idx,
                              max_norm=base.max_norm, norm_type=base.norm_type,
                              scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)  # (..., r)
        update = (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]  # (..., dim)
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is not None:
            update = update * embed_scale.to(update.dtype)
        return update.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)  # (..., dim)
        if self.disabled:
            return result
        if self.row_adapters is not None:
            groups = self.row_adapters
            groups.check(ids.shape[0])
            for name in groups:
                if name in self.lora_embedding_A:
                    groups.add_(result, name, self._update(name, groups.take(ids, name), result.dtype))
            return result
        for name in self._pending():
            result = result + self._update(name, ids, result.dtype)
        return result

    def __getattr__(self, name: str):
        # model code reads an embedding's attributes (num_embeddings, embedding_dim, padding_idx, embed_scale)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class TrainableTokens(nn.Module):
    """Rows of a vocabulary matrix trained in full, the rest frozen (PEFT's trainable tokens): the rows of an input
    embedding that the given token ids look up, or the rows of an output head that give those tokens' logits.

    Adapter ``name`` trains ``trainable_tokens_delta[name]``, ``(tokens, dim)`` fp32, which holds the rows' new
    values (not a difference; PEFT's name and meaning): merging writes them into the matrix, so what the rows held
    before, e.g. the mean that :func:`lora.add_tokens` gave new tokens, does not matter to a trained adapter. Only
    the given positions or logits are replaced; nothing of the size of the matrix is copied per call.

    A head tied to the embedding (one matrix) gets a wrapper ``tied_to`` the embedding's: it trains and saves
    nothing of its own and reads the embedding's rows, so both ends of the model see the same new rows.
    """

    def __init__(self, base_layer: nn.Module, tied_to: "TrainableTokens | None" = None):
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ValueError(f"trainable_tokens wraps an nn.Embedding or an output head (nn.Linear), got "
                             f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        self.is_head = isinstance(base_layer, nn.Linear)
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a submodule, saved once, by its owner
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: RowGroups | None = None
        self._rows_before_merge: dict[str, torch.Tensor] = {}
        self._lookup: dict[str, torch.Tensor] = {}  # per adapter: (vocab,) slot of each id in its rows, or -1

    @property
    def tied_to(self) -> "TrainableTokens | None":
        return self._tied[0] if self._tied else None

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.token_indices)

    @property
    def base_parameter(self) -> nn.Parameter:
        return self.base_layer.weight

    def rows(self, name: str) -> nn.Parameter:
        """Adapter ``name``'s trained rows, ``(tokens, dim)`` (the embedding's, for a tied head)."""
        return (self.tied_to or self).trainable_tokens_delta[name]

    def add_adapter(self, name: str, token_ids: list[int] | tuple[int, ...]) -> None:
        """Add adapter ``name`` training the rows ``token_ids``, starting from their current values (unchanged)."""
        if name in self.token_indices:
            raise ValueError(f"adapter {name!r} already exists on this module")
        W = self.base_layer.weight
        ids = list(token_ids)
        if max(ids) >= W.shape[0]:
            raise ValueError(f"trainable_tokens has token id {max(ids)}, but this matrix has {W.shape[0]} rows; "
                             f"add the tokens first (lora.add_tokens(model, tokenizer, [...]))")
        self.token_indices[name] = ids
        if self.tied_to is None:
            self.trainable_tokens_delta[name] = nn.Parameter(W.detach()[ids].float().clone())  # (tokens, dim)
        self.active_adapters = self.active_adapters + (name,)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; call lora.unmerge(model) first")
        self.token_indices.pop(name)
        if name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[name]
        self._lookup.pop(name, None)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active_adapters = tuple(n for n in names if n in self.token_indices)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if self.tied_to is not None:
            return {}  # the embedding's rows; PEFT saves them once, under the embedding
        return {"token_adapter.trainable_tokens_delta": self.trainable_tokens_delta[name]}

    def _pending(self) -> list[str]:
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        seen: set[int] = set()
        for name in pending + self.merged_adapters:
            overlap = seen & set(self.token_indices[name])
            if overlap:
                raise ValueError(f"two active adapters train the rows of token ids {sorted(overlap)[:5]}; only one "
                                 f"adapter can give a row its values (lora.set_active one of them)")
            seen |= set(self.token_indices[name])
        return pending

    def check_mergeable(self) -> None:
        self._pending()

    def _slots(self, name: str, device: torch.device) -> torch.Tensor:
        table = self._lookup.get(name)
        if table is None or table.device != device:
            table = torch.full((self.base_layer.weight.shape[0],), -1, dtype=torch.long, device=device)
            table[torch.tensor(self.token_indices[name], device=device)] = torch.arange(
                len(self.token_indices[name]), device=device)
            self._lookup[name] = table
        return table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        if self.row_adapters is not None and any(n in self.token_indices for n in self.row_adapters):
            raise ValueError("row_adapters cannot give rows different trainable_tokens adapters; run them in "
                             "batches of their own with lora.set_active")
        for name in self._pending():
            rows = self.rows(name)
            if self.is_head:  # (..., vocab) logits: the trained tokens' columns come from the trained rows
                index = torch.tensor(self.token_indices[name], device=x.device)
                W = self.base_layer.weight
                # added as the change from the rows' current values, so an untrained adapter adds exactly zero
                change = F.linear(x, (rows - W[index].to(rows.dtype)).to(x.dtype))  # (..., tokens)
                result = result.index_add(-1, index, change.to(result.dtype))
            else:  # (..., dim) vectors: positions holding a trained token take its trained row
                slot = self._slots(name, x.device)[x]  # (...,)
                looked_up = rows[slot.clamp_min(0)]  # (..., dim)
                embed_scale = getattr(self.base_layer, "embed_scale", None)
                if embed_scale is not None:
                    looked_up = looked_up * embed_scale.to(looked_up.dtype)
                result = torch.where((slot >= 0).unsqueeze(-1), looked_up.to(result.dtype), result)
        return result

    @torch.no_grad()
    def merge(self) -> None:
        """Write the active adapters' rows into the matrix (a tied head's matrix is the embedding's, written once by
        the embedding's wrapper). Idempotent."""
        for name in self._pending():
            if self.tied_to is None:
                W = self.base_layer.weight
                index = torch.tensor(self.token_indices[name], device=W.device)
                self._rows_before_merge[name] = W[index].clone()
                W.index_copy_(0, index, self.rows(name).to(W.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give the rows back the values they had before the merge. Idempotent."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self.tied_to is None:
                W = self.base_layer.weight
                W.index_copy_(0, torch.tensor(self.token_indices[name], device=W.device),
                              self._rows_before_merge.pop(name))

    def __getattr__(self, name: str):
        # model code reads the wrapped matrix's attributes (weight, num_embeddings, embed_scale, out_features)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        tied = ", tied to the input embedding" if self.tied_to is not None else ""
        return f"tokens={ {n: len(i) for n, i in self.token_indices.items()} }{tied}, merged={self.merged_adapters}"


class SavedModule(nn.Module):
    """A module trained in full (``modules_to_save``, e.g. a classifier head), one trained copy per adapter.

    The original stays frozen as ``original_module``; adapter ``name`` trains ``modules_to_save[name]`` (PEFT's
    names). The forward runs the active adapter's copy, or the original when adapters are disabled or none with a
    copy is active, so ``lora.disabled`` gives the base model's module and two adapters never share a head.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()
        self.disabled = False
        self.row_adapters: RowGroups | None = None  # one adapter (or None) per batch row: lora.row_adapters()

    def add_adapter(self, name: str) -> None:
        """Add adapter ``name`` with a copy of the original: at first it computes exactly what the original does."""
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already exists on this module")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.active_adapters = self.active_adapters + (name,)

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def active_among(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The adapters of ``names`` that have a copy here.

        Raises:
            ValueError: more than one: each would replace the module with its own copy.
        """
        active = tuple(n for n in names if n in self.modules_to_save)
        if len(active) > 1:
            raise ValueError(f"adapters {list(active)} each train their own copy of a saved module "
                             f"(modules_to_save); only one of them can be active at a time")
        return active

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active_adapters = self.active_among(names)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.modules_to_save.keys())

    def current(self) -> nn.Module:
        """The module the forward runs: the active adapter's copy, else the original."""
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, *args, **kwargs):
        if self.row_adapters is None or self.disabled:
            return self.current()(*args, **kwargs)
        # Per-row adapters: each group of rows runs its adapter's copy (or the original) on its part of the batch.
        x, rest = args[0], args[1:]
        groups = self.row_adapters
        groups.check(x.shape[0])
        result = None
        for name in groups:
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            out = module(groups.take(x, name), *rest, **kwargs)
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            groups.put_(result, name, out)
        return result

    def __getattr__(self, name: str):
        # Model code reads attributes of the wrapped module (a head's .weight, an embedding's .num_embeddings).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)


__all__ = ["LoRALinear", "LoRAParameter", "LoRAEmbedding", "TrainableTokens", "SavedModule", "RowGroups", "is_conv1d",
           "is_linear_like", "lora_delta", "expert_delta", "parameter_delta", "embedding_delta", "merged_weight",
           "unmerged_weight"]
