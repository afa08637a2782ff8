"""Checking an export: the written artifact's logits against the adapter model's, on a few fixed prompts.

The reference is the base loaded in float32 with the adapter applied by :func:`lora.load_adapter`: the model the
adapter was trained as. The artifact (a merged Hugging Face folder, or a GGUF file read back and dequantized by
:func:`lora.export.read_gguf_model`: through transformers' GGUF loader, or for the architectures it does not read,
OLMo 2 and Granite, by our own reader, which builds the model from the base's config with every setting llama.cpp
takes from the file taken from it) is run on the same prompts, and the largest logit difference is reported.

Both readers put the file's weights back as llama.cpp's converter lays them out (Q/K rows interleaved for the
architectures with llama.cpp's "normal" rope, Gemma's norms offset by 1), from their own tables: transformers' for
its loader, :mod:`.gguf_arch`'s for ours, the same tables the writer follows. So for OLMo 2 and Granite the check
catches what the writer gets wrong against those tables (a scale, a permutation left out, a key not written, a
tensor under the wrong name), while whether the tables say what llama.cpp does is for tests/test_llama_cpp.py, which
runs the files in llama.cpp itself.

An artifact stored in f16, bf16 or q8_0 differs from the reference by its rounding, and q8_0's rounding moves
logits by a few percent, as much as a lightly trained adapter does (see :data:`TOLERANCES`): no fixed tolerance
on that figure both passes every right q8_0 export and refuses one with the adapter's scale doubled. So the
decision compares the artifact with the reference *rounded as the artifact stores its weights*: how each weight
was stored is read off the artifact's own values (exactly f16, exactly bf16, or q8_0's blocks of 32 integer
multiples of one scale), the reference's weights are rounded the same way (q8_0 with gguf's own quantizer), and
a right export then matches it to float32 rounding, while a wrong scale, a missing Q/K permutation or a tensor
under the wrong name stays far off.

Memory: the check loads the model twice, one copy after the other, each in float32 (4 bytes per parameter whatever
the artifact's dtype): about as much memory as a float32 copy of the model, twice that while transformers reads a
GGUF file (it holds the file's dequantized tensors and the model at once; our own reader holds one tensor at a
time). Measured on smollm2-135m (540 MB in
float32), peak memory without and with the check: 458 and 1193 MiB for ``lora merge``, 544 and 1400 MiB for a q8_0
GGUF. ``verify=False`` / ``--no-verify`` in the exporters skips it.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

# A handful of short texts of different kinds; each is run on its own (no padding), truncated to MAX_TOKENS.
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def area(r):\n    return 3.14159 * r * r",
    "Order AB-12345 shipped from Lisbon on 2024-03-07.",
    "Q: What is the capital of France?\nA:",
)
MAX_TOKENS = 24

# The largest max |dlogit| accepted between the artifact and the reference rounded as the artifact stores its
# weights, as a fraction of the reference's largest |logit| (rounding errors grow with the activations, so a
# fraction carries over between models), by the artifact's least precise dtype.
#
# Measured max |dlogit| / largest |logit| on smollm2-135m (largest |logit| 38; an r=8 adapter trained 3 steps, which
# moves logits by up to 7.5% of that) and, after "|", the worst of the tests' tiny Llamas (hidden size 32, largest
# |logit| 4.6-4.8, adapters moving logits by 2% to 160%; bf16/f16 folders: a base saved in that dtype):
#                        right export, against the       right export, against   wrong export, rounded as stored:
#                        adapter model                   it rounded as stored    scale x2           Q/K not permuted
#   f32 folder or GGUF   2.2e-6 | 2.4e-6                 (the same)              6.1e-2 | 2.3e-2    5.2e-1 | 1.3
#   f16 GGUF             1.6e-3 | 2.9e-3                 0 | 0                   6.2e-2 | 2.3e-2    5.2e-1 | 1.3
#   q8_0 GGUF            3.2e-2 | 7.6e-2                 0 | 0                   7.6e-2 | 5.5e-2   5.2e-1 | 1.3
#   q8_0 + adapter GGUF  3.4e-2 | 7.0e-2                 3.3e-6 | 2.5e-6         6.3e-2 | 2.3e-2    1.2e-2 | 1.0e-2
#   bf16 / f16 folder    - | 1.4e-2 / 1.2e-3             - | 0 / 0               - | 6.3e-2         -
# Against the plain adapter model, q8_0's own rounding (up to 7.6% on the tiny models) is as large as what a doubled
# scale adds on smollm2 (7.3%): no tolerance on that figure both passes every right export and refuses that one.
# Against the rounded reference a right export is exact (one merge computes exactly what the other does) or within
# float32 rounding (an adapter GGUF added at run time): 1e-4 leaves a 40x margin above that for f32, and 1e-3 also
# room for weights that round the other way for a rounded dtype; the least wrong export measured, 1.0e-2 (an
# adapter GGUF without its Q/K permutation on a tiny model whose adapter moves logits by 2%), is still 10x above it.
TOLERANCES = {"f32": 1e-4, "f16": 1e-3, "bf16": 1e-3, "q8_0": 1e-3}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_ORDER = ("f32", "f16", "bf16", "q8_0")  # least to most rounding per weight


@dataclass(frozen=True)
class Check:
    """The outcome of :func:`verify_export`.

    Attributes:
        artifact: What was checked (its final name when written under a temporary one).
        dtype: The artifact's least precise weight dtype, which sets the tolerance (``f32``, ``f16``, ...).
        max_dlogit: Largest |artifact logit - reference logit| over every position of :data:`PROMPTS`, the
            reference being the adapter model (or the base, see ``compared_with``).
        rounded_dlogit: The same against the reference with its weights rounded as the artifact stores them: the
            figure held to ``tolerance`` (equal to ``max_dlogit`` for an all-f32 artifact).
        tolerance: The largest ``rounded_dlogit`` accepted.
        largest_logit: Largest |logit| of the reference (the tolerance is a fraction of it).
        adapter_effect: Largest |adapter model logit - base logit| (None without an adapter): an adapter whose
            effect is below the tolerance cannot be told from a missing one.
        compared_with: What the artifact was compared with, in words.
        note: Anything the user should know about what was and was not checked.
    """

    artifact: str
    dtype: str
    max_dlogit: float
    rounded_dlogit: float
    tolerance: float
    largest_logit: float
    adapter_effect: float | None
    compared_with: str
    note: str = ""

    def __str__(self) -> str:
        text = f"checked {self.artifact}: max |dlogit| {self.max_dlogit:.3g} against {self.compared_with}"
        if self.rounded_dlogit != self.max_dlogit:
            text += f", {self.rounded_dlogit:.3g} against it rounded as stored"
        text += f" (tolerance {self.tolerance:.3g} for {self.dtype})"
        return text + (f"; {self.note}" if self.note else "")


# -- how the artifact stores its weights --------------------------------------------------------------------------
def _q8_0_blocks(weight: torch.Tensor) -> bool:
    """Whether every run of 32 values along the last dim is integers times one scale, the largest being 127 times
    it: q8_0 as ggml (and gguf's quantizer) writes it, dequantized."""
    blocks = weight.reshape(-1, 32)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    steps = blocks / torch.where(scale > 0, scale, 1.0)
    return bool(((steps - steps.round()).abs() <= 1e-3).all())


def stored_as(weight: torch.Tensor) -> str:
    """How a weight read back in float32 was stored, told from its values.

    ``"bf16"`` or ``"f16"`` when every value is exactly one of that type (bf16 first: its values are mostly f16
    values too), ``"q8_0"`` for q8_0 blocks along the last dim, ``"q8_0_t"`` along the first (a matrix stored
    transposed, as GPT-2's Conv1D weights are in GGUF), else ``"f32"``. Telling a type whose values happen to be
    exact in a coarser one for that one is harmless: rounding the same values to it changes nothing.
    """
    weight = weight.detach()
    if torch.equal(weight.to(torch.bfloat16).float(), weight):
        return "bf16"
    if torch.equal(weight.half().float(), weight):
        return "f16"
    if weight.ndim == 2 and weight.shape[-1] % 32 == 0 and _q8_0_blocks(weight):
        return "q8_0"
    if weight.ndim == 2 and weight.shape[0] % 32 == 0 and _q8_0_blocks(weight.T):
        return "q8_0_t"
    return "f32"


def round_as(weight: torch.Tensor, how: str) -> torch.Tensor:
    """``weight`` (float32) rounded as :func:`stored_as` says, and back to float32."""
    if how == "bf16":
        return weight.to(torch.bfloat16).float()
    if how == "f16":
        return weight.half().float()
    if how in ("q8_0", "q8_0_t"):
        from ..models import require_gguf

        gguf = require_gguf()
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        rows = (weight.T if how == "q8_0_t" else weight).detach().contiguous().numpy()
        rounded = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, q8_0), q8_0).reshape(rows.shape))
        return rounded.T if how == "q8_0_t" else rounded
    return weight


def _file_storage(folder: Path) -> dict[str, str]:
    """The f16 and bf16 tensors of a safetensors folder, by name, as :func:`stored_as` would name them."""
    from safetensors import safe_open

    kinds, storage = {"F16": "f16", "BF16": "bf16"}, {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if f.get_slice(key).get_dtype() in kinds:
                    storage[key] = kinds[f.get_slice(key).get_dtype()]
    return storage


def _round_model(model: nn.Module, storage: dict[str, str]) -> bool:
    """Round ``model``'s weights in place as ``storage`` (parameter name -> :func:`stored_as`) says; under LoRA
    wrappers the base weights are rounded and the adapter's factors are left as they are. Returns whether any
    weight changed."""
    changed = False
    with torch.no_grad():
        for name, param in model.named_parameters():
            how = storage.get(name.replace(".base_layer.", "."), "f32")
            if ".lora_" in name or how == "f32":
                continue
            rounded = round_as(param.float(), how)
            changed = changed or not torch.equal(rounded, param)
            param.copy_(rounded)
    return changed


# -- the two sides ------------------------------------------------------------------------------------------------
def prompt_ids(folder: Path) -> list[torch.Tensor]:
    """Token ids of :data:`PROMPTS` under the base's own tokenizer (any vocabulary), each ``(1, T)``.

    A base folder without a tokenizer (a bare ``save_pretrained`` of a model) gets fixed ids spread over its
    vocabulary instead.
    """
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        ids = [tokenizer(text)["input_ids"][:MAX_TOKENS] for text in PROMPTS]
    else:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(folder, local_files_only=True).get_text_config().vocab_size
        ids = [[(7919 * (i + 1) + 104_729 * j) % vocab for j in range(MAX_TOKENS)] for i in range(len(PROMPTS))]
    return [torch.tensor([row]) for row in ids]


@torch.no_grad()
def _logits(model: nn.Module, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=row).logits[0].float() for row in ids]  # each (T, vocab)


@contextlib.contextmanager
def _no_progress_bars():
    """Without transformers' loading bars: the check's two loads are not what the user asked to watch."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _free(model: nn.Module) -> None:
    """Let go of a model's weights before the next model is loaded, so only one is in memory at a time.

    Moving them to the meta device frees them now, even if a reference cycle keeps the module object alive until
    the garbage collector runs (a full collection costs about half a second in a large process).
    """
    model.to("meta")


def reference_logits(folder: Path, adapter: str | os.PathLike | None, ids: list[torch.Tensor],
                     storage: dict[str, str], adapter_on_top: bool = False
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor]]:
    """The adapter model's logits, the base's (None without an adapter), and the adapter model's with its weights
    rounded as ``storage`` says: merged (and cast back to the base's dtype, as a merge does) then rounded, or with
    ``adapter_on_top`` the base rounded and the adapter applied to it unmerged (a base GGUF with an adapter GGUF,
    as llama.cpp runs them). The base is read in float32.
    """
    from transformers import AutoModelForCausalLM

    from ..adapter_io import load_adapter
    from ..inject import disabled
    from ..merge import merge_and_unload
    from ..tokens import add_tokens_like, read_added_tokens

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    base = None
    if adapter is not None:
        record = read_added_tokens(adapter)
        if record:  # trained after tokens were added to the base: this copy of the base grows the same way first
            from transformers import AutoTokenizer

            add_tokens_like(model, AutoTokenizer.from_pretrained(folder, local_files_only=True), record)
        # the exporter has checked that the adapter belongs to this base (or was told not to): apply it as it is
        load_adapter(model, adapter, check_base=False)
        with disabled(model):
            base = _logits(model, ids)
    logits = _logits(model, ids)
    changed = False
    if adapter is not None and not adapter_on_top:
        model = merge_and_unload(model)
        # the exporters merge in float32 and cast back once to the dtype the base is stored in; this copy of the
        # base is float32, so that cast happens here
        changed = _round_model(model, _file_storage(folder))
    changed = _round_model(model, storage) or changed
    rounded = _logits(model, ids) if changed else logits
    _free(model)
    return logits, base, rounded


def _as_read(B: torch.Tensor, stored: torch.Tensor, read: torch.Tensor, config) -> torch.Tensor | None:
    """``B``'s rows in the order the GGUF reader gave the base weight they update (None: no known order).

    Decided from the weights themselves: the reader (transformers' or ours) either kept a stored base weight's rows
    as they are, or put llama.cpp's interleaved rotary rows back into halves per head (Q with the query heads, K
    with the key heads).
    """
    from .gguf_arch import unpermute_from_llama_cpp

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=0)

    if same(stored, read):
        return B
    for n_head in dict.fromkeys((config.num_attention_heads, getattr(config, "num_key_value_heads", None))):
        if n_head and stored.shape[0] % (2 * n_head) == 0 and same(unpermute_from_llama_cpp(stored, n_head), read):
            return unpermute_from_llama_cpp(B, n_head)
    return None


def apply_adapter_gguf(model: nn.Module, base_gguf: Path, adapter_gguf: Path) -> str | None:
    """Add a llama.cpp LoRA GGUF's updates into a model read back from ``base_gguf``, as llama.cpp would.

    llama.cpp adds ``alpha / r * B A`` to each named weight (a factor of 1 when the file's alpha is 0). The rows of
    ``B`` are put in the order in which the reader gave that weight (see :func:`_as_read`).

    Returns:
        None when every update found its layer; otherwise why the adapter could not be applied (the model is then
        partly changed: use it no further).
    """
    from ..models import require_gguf

    gguf = require_gguf()
    reader = gguf.GGUFReader(str(adapter_gguf))
    arch_name = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    alpha = reader.get_field(gguf.Keys.Adapter.LORA_ALPHA)
    if arch is None or alpha is None:
        return f"{adapter_gguf.name} has no known architecture or no {gguf.Keys.Adapter.LORA_ALPHA}"
    alpha = float(alpha.contents())
    factors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    stored = {t.name: t for t in gguf.GGUFReader(str(base_gguf)).tensors}
    names = gguf.get_tensor_name_map(arch, model.config.get_text_config().num_hidden_layers)
    pending = {name[: -len(".lora_a")] for name in factors if name.endswith(".lora_a")}
    with torch.no_grad():
        for module_path, module in model.named_modules():
            conv1d = type(module).__name__ == "Conv1D"  # GPT-2's layers keep their weight as (in, out)
            if not isinstance(module, nn.Linear) and not conv1d:
                continue
            gguf_name = names.get_name(module_path + ".weight", try_suffixes=(".weight",))
            if gguf_name not in pending or gguf_name not in stored:
                continue
            A, B = factors[f"{gguf_name}.lora_a"], factors[f"{gguf_name}.lora_b"]  # (r, in), (out, r)
            if conv1d:  # GPT-2 has no rotary row order to undo: the delta is B A, transposed to (in, out)
                if (A.shape[1], B.shape[0]) != tuple(module.weight.shape):
                    return f"{gguf_name}'s adapter is {B.shape[0]}x{A.shape[1]}, its layer {tuple(module.weight.shape)}"
                module.weight += ((alpha / A.shape[0] if alpha else 1.0) * B @ A).T
                pending.discard(gguf_name)
                continue
            base = stored[gguf_name]
            base = torch.from_numpy(gguf.quants.dequantize(np.asarray(base.data), base.tensor_type).copy())
            B = _as_read(B, base.reshape(module.weight.shape) if base.numel() == module.weight.numel() else base,
                         module.weight, model.config.get_text_config())
            if B is None or (B.shape[0], A.shape[1]) != tuple(module.weight.shape):
                return f"{gguf_name} was read back in a layout this check cannot match the adapter to"
            module.weight += (alpha / A.shape[0] if alpha else 1.0) * B @ A  # (out, in)
            pending.discard(gguf_name)
    if pending:
        return f"no layer of the model read back from the base GGUF is {sorted(pending)[:4]}"
    return None


def read_artifact(artifact: Path, ids: list[torch.Tensor], adapter_gguf: Path | None = None,
                  base: Path | None = None) -> tuple[list[torch.Tensor], dict[str, str]]:
    """The logits of a merged folder or a GGUF file read back in float32 (with ``adapter_gguf`` applied), and how
    each weight was stored (:func:`stored_as`, before the adapter GGUF is added).

    A GGUF file of an architecture transformers' GGUF loader does not read is read by our own reader, which builds
    the model from the config of ``base`` (the folder the file was written from).

    Raises:
        ValueError: the artifact could not be read back, or the adapter GGUF could not be applied.
    """
    from transformers import AutoModelForCausalLM

    from .gguf_reader import read_gguf_model  # transformers' GGUF loader with what it misses, or our own reader

    try:
        if artifact.is_dir():
            model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32, local_files_only=True)
        else:
            model = read_gguf_model(artifact, dtype=torch.float32, base=base)
    except ValueError as e:
        raise ValueError(f"what was written could not be read back: {e}") from e
    except (RuntimeError, OSError, KeyError) as e:
        raise ValueError(f"what was written could not be read back ({type(e).__name__}: "
                         f"{' '.join(str(e).split())})") from e
    storage = {name: stored_as(param) for name, param in model.named_parameters()}
    why = apply_adapter_gguf(model, artifact, adapter_gguf) if adapter_gguf is not None else None
    if why is not None:  # a check that passed without the adapter would bless whatever the adapter holds
        _free(model)
        raise ValueError(f"the adapter GGUF could not be applied to the base GGUF as llama.cpp would ({why})")
    logits = _logits(model.eval(), ids)
    _free(model)
    return logits, storage


def artifact_dtype(artifact: Path) -> str:
    """The least precise dtype among the artifact's matrices, from its file headers (1-D norms and biases are f32
    in our GGUF files).

    Raises:
        ValueError: a dtype this check has no tolerance for.
    """
    found = set()
    if artifact.is_dir():
        from safetensors import safe_open

        names = {"F64": "f32", "F32": "f32", "F16": "f16", "BF16": "bf16"}
        for file in sorted(artifact.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    if len(piece.get_shape()) >= 2 and piece.get_dtype() in names:
                        found.add(names[piece.get_dtype()])
    else:
        from ..models import require_gguf

        for tensor in require_gguf().GGUFReader(str(artifact)).tensors:
            if len(tensor.shape) >= 2:
                found.add(tensor.tensor_type.name.lower())
    unknown = found - set(_ORDER)
    if unknown:
        raise ValueError(f"{artifact} holds {sorted(unknown)} weights; the export check knows the tolerances of "
                         f"{list(_ORDER)} only. Skip it with verify=False (--no-verify)")
    return max(found, key=_ORDER.index, default="f32")


# -- the check ------------------------------------------------------------------------------------------------------
def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor], artifact: str) -> float:
    if [x.shape for x in a] != [x.shape for x in b]:
        raise ValueError(f"{artifact} gives logits of shapes {[list(x.shape) for x in a]} where the reference "
                         f"gives {[list(x.shape) for x in b]}: its vocabulary or head differs from the base's")
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def verify_export(model: str | os.PathLike, adapter: str | os.PathLike | None, artifact: str | os.PathLike,
                  adapter_gguf: str | os.PathLike | None = None, name: str | None = None) -> Check:
    """Compare an exported artifact's logits with the adapter model's on :data:`PROMPTS`; refuse a wrong one.

    The artifact is read back (a merged folder with ``from_pretrained``, a GGUF file by
    :func:`lora.export.read_gguf_model`, which dequantizes), run, and let go; then the base is loaded in float32
    with the adapter applied by :func:`lora.load_adapter`, run, rounded as the artifact stores its weights, and run
    again (see the module's docstring). Memory: the model is loaded twice, one copy after the other, each in
    float32; ``verify=False`` in the exporters skips this.

    Args:
        model: The base: an embedded name or an HF folder.
        adapter: The adapter folder the artifact should hold (None: the base alone).
        artifact: A merged HF folder, or a GGUF file (any name: the exporters check it under its temporary one).
        adapter_gguf: A llama.cpp LoRA GGUF written for ``artifact`` (a base GGUF without the adapter): it is added
            into the base read back, as llama.cpp would; one that cannot be is refused.
        name: The final name of an artifact checked under a temporary one, for messages (the exporters pass it;
            an error then says that the artifact was not kept).

    Returns:
        The :class:`Check`; ``str()`` of it is the line to show the user.

    Raises:
        ValueError: max |dlogit| against the rounded reference above the tolerance for the artifact's dtype (the
            message names the artifact, the figures, the tolerance and what to do), logits of another shape, or an
            artifact that cannot be read back.
    """
    from .base import resolve_base_folder

    folder, artifact = resolve_base_folder(model), Path(artifact)
    kept_out, name = name is not None, str(name if name is not None else artifact)
    dtype = artifact_dtype(artifact)
    ids = prompt_ids(folder)
    with _no_progress_bars():
        try:
            got, storage = read_artifact(artifact, ids, Path(adapter_gguf) if adapter_gguf else None, folder)
        except ValueError as e:
            raise ValueError(f"export check of {name}: {e}. Nothing was replaced. If the reader is at fault "
                             f"(transformers' GGUF loader lags llama.cpp for some models), export with verify=False "
                             f"(--no-verify)") from e
        note = ""
        reference, base, rounded = reference_logits(folder, adapter, ids, storage, adapter_on_top=bool(adapter_gguf))
    compared_with = "the adapter model" if adapter is not None else "the base model"
    largest = max(float(x.abs().max()) for x in reference)
    tolerance = TOLERANCES[dtype] * largest
    error, error_rounded = _max_abs_diff(got, reference, name), _max_abs_diff(got, rounded, name)
    effect = _max_abs_diff(reference, base, name) if base is not None else None
    if not math.isfinite(error_rounded) or error_rounded > tolerance:
        moved = f"; the adapter itself moves them by up to {effect:.4g}" if effect is not None else ""
        once_rounded = f", {error_rounded:.4g} once that model's weights are rounded as stored" \
            if rounded is not reference else ""
        raise ValueError(
            f"export check failed: {name} ({dtype}) gives logits up to {error:.4g} away from {compared_with}'s on "
            f"{len(PROMPTS)} fixed prompts{once_rounded} (max |dlogit| {error_rounded:.4g} > tolerance "
            f"{tolerance:.4g}, which is "
            f"{TOLERANCES[dtype]:g} x the largest |logit| {largest:.4g}{moved}). "
            + ("It was not kept: an earlier output under that name is untouched. " if kept_out else "")
            + "Please report this with the base, the adapter and this message; verify=False (--no-verify) writes "
            "it unchecked")
    if effect is not None and effect <= tolerance:
        note = (f"{note}; " if note else "") + (
            f"the adapter moves logits by only {effect:.3g}, within the tolerance, so this check could not tell it "
            f"from a missing one")
    return Check(name, dtype, error, error_rounded, tolerance, largest, effect, compared_with, note)


__all__ = ["verify_export", "Check", "TOLERANCES", "PROMPTS", "artifact_dtype", "stored_as", "round_as",
           "apply_adapter_gguf"]
