"""What autograd keeps for the backward pass on the fp32 base and on the NF4 base (issue 25).

    .venv/bin/python bench/nf4_saved.py                    # the embedded 135M, 2 examples of 512 tokens
    .venv/bin/python bench/nf4_saved.py --rows 1 --length 2048

One training forward of the embedded SmolLM2-135M with LoRA r=16 on every linear layer but the head, first on its
fp32 weights, then with the NF4 base (:func:`lora.models.quantize_nf4`). Every tensor saved for the backward pass
is recorded (``torch.autograd.graph.saved_tensors_hooks``) by its storage; storages that are the model's own
parameters are left out, since they exist with or without training. Printed per base: the bytes of the rest (the
activations the backward needs) and how many of them have a weight's shape, which is where a dequantized copy of
a 4-bit weight kept for the backward pass would show.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _storage_key(t) -> tuple[int, int]:
    """``(address, bytes)`` of a tensor's storage; a tensor subclass without one (NF4) by its own inner tensors."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        inner = [getattr(t, n) for n in ("quantized_data", "quantized_scalers", "quantization_factor")
                 if getattr(t, n, None) is not None]
        return id(t), sum(x.untyped_storage().nbytes() for x in inner)


def saved_for_backward(base: str, rows: int, length: int) -> tuple[int, int]:
    """``(bytes saved beyond the parameters, how many of those storages have the shape of a linear weight)``."""
    import torch

    import lora
    from lora.models import quantize_nf4

    model, _ = lora.load_model("smollm2-135m")
    if base == "nf4":
        quantize_nf4(model)
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    lora.inject(model, lora.LoraConfig(r=16, alpha=32, dropout=0.0))
    model.train()
    parameters = {_storage_key(p)[0] for p in model.parameters()}
    saved: dict[int, tuple[int, tuple]] = {}

    def pack(t):
        address, size = _storage_key(t)
        saved[address] = (size, tuple(t.shape))
        return t

    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    extra = {a: v for a, v in saved.items() if a not in parameters}
    return sum(size for size, _ in extra.values()), sum(shape in weight_shapes for _, shape in extra.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args()
    for base in ("fp32", "nf4"):
        size, weights = saved_for_backward(base, args.rows, args.length)
        print(f"{base}: {size / 1e9:.3f} GB saved for backward beyond the parameters, {weights} storages of a "
              f"linear weight's shape among them", flush=True)


if __name__ == "__main__":
    main()
