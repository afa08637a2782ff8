"""Per-example attention for packed rows (lora/train/attention.py): the same numbers as the model's own masked SDPA."""

import pytest
import torch

from conftest import make_bpe_tokenizer
from families import FAMILIES, make_family
from lora.train.attention import NAME, packed_rows, use_packed_attention

# row 0 packs three examples (10, 25 and 5 tokens), row 1 is one example
POSITIONS = torch.tensor([list(range(10)) + list(range(25)) + list(range(5)), list(range(40))])
SPANS = [(0, 10), (10, 35), (35, 40)]


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer()


def forward(model, ids):
    return model(input_ids=ids, position_ids=POSITIONS, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_give_each_example_its_own_logits_and_gradients(family, tokenizer):
    model = make_family(family, tokenizer)
    ids = torch.randint(3, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = torch.cat([torch.cat([model(input_ids=ids[:1, s:e]).logits for s, e in SPANS], 1),
                           model(input_ids=ids[1:]).logits])
    masked = forward(model, ids)
    masked.square().sum().backward()
    masked_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    switched = use_packed_attention(model)
    # the switch is made where the model runs SDPA (Gemma 2's soft-capping runs eager, Bloom's ALiBi has no
    # attention interface); those models keep theirs
    assert switched == (family not in ("gemma2", "bloom"))
    assert (model.config._attn_implementation == NAME) == switched
    with packed_rows():
        packed = forward(model, ids)
        packed.square().sum().backward()
    if family != "bloom":  # Bloom mixes packed examples (ALiBi): the trainer's probe turns packing off for it
        torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed, masked.detach(), atol=1e-4, rtol=1e-4)
    for n, p in model.named_parameters():  # relative to the largest entry: these gradients run into the thousands
        gap = (p.grad - masked_grads[n]).abs().max() / masked_grads[n].abs().max().clamp_min(1e-12)
        assert gap < 1e-5, (n, float(gap))
    with torch.no_grad():  # outside packed_rows the model computes exactly what SDPA did before the switch
        assert torch.equal(forward(model, ids), masked.detach())


def test_calls_the_per_example_route_does_not_model_go_to_sdpa(tokenizer, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    model = make_family("mistral", tokenizer)
    model.config.sliding_window = 8  # shorter than the 25-token example: the window matters
    ids = torch.randint(3, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = forward(model, ids)
        use_packed_attention(model)
        calls = []
        real = sdpa.sdpa_attention_forward
        monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
        with packed_rows():
            packed = forward(model, ids)
    assert calls  # handed over, with the model's own sliding-window mask
    torch.testing.assert_close(packed, masked)
