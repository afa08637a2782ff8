"""The LoRA math on one layer and on whole tiny models: identity at init, merge/unmerge, scaling, DoRA, compile."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora
from lora.layers import LoRALinear
from conftest import make_gpt2, make_llama, randomize_adapters
from tiny_gpt import TinyGPT

MODELS = {"llama": make_llama, "gpt2": make_gpt2, "tiny_gpt": lambda: TinyGPT().eval()}


def logits(model, tokens):
    out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dora", [False, True])
def test_fresh_adapter_leaves_output_bit_identical(name, dora, tokens):
    model = MODELS[name]()
    before = logits(model, tokens)
    lora.inject(model, lora.LoraConfig(r=4, dora=dora))
    assert torch.equal(logits(model, tokens), before)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dora", [False, True])
def test_merged_equals_unmerged_and_unmerge_restores(name, dora, tokens):
    model = MODELS[name]()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, dora=dora))
    randomize_adapters(model)
    unmerged = logits(model, tokens)
    assert not torch.allclose(unmerged, logits_of_base(model, tokens), atol=1e-3)  # the adapter really acts

    lora.merge(model)
    merged_once = {k: v.clone() for k, v in model.state_dict().items()}
    torch.testing.assert_close(logits(model, tokens), unmerged, atol=1e-5, rtol=0)
    lora.merge(model)  # idempotent
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged_once[k]), k

    lora.unmerge(model)
    lora.unmerge(model)
    for k, v in model.state_dict().items():
        key = k.replace(".base_layer", "")
        if key in base_weights:
            torch.testing.assert_close(v, base_weights[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, tokens), unmerged, atol=1e-5, rtol=0)


def logits_of_base(model, tokens):
    with lora.disabled(model):
        return logits(model, tokens)


def test_conv1d_delta_matches_a_linear_with_the_transposed_weight():
    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs; weight stored (in, out)
    lin = nn.Linear(8, 12)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    cfg = lora.LoraConfig(r=2)
    a, b = LoRALinear(conv), LoRALinear(lin)
    assert (a.in_features, a.out_features) == (8, 12) and a.fan_in_fan_out and not b.fan_in_fan_out
    a.add_adapter("x", cfg)
    b.add_adapter("x", cfg)
    with torch.no_grad():
        b.lora_A["x"].weight.copy_(a.lora_A["x"].weight)
        a.lora_B["x"].weight.normal_()
        b.lora_B["x"].weight.copy_(a.lora_B["x"].weight)
    x = torch.randn(3, 8)
    torch.testing.assert_close(a(x), b(x))
    a.merge()
    assert a.base_layer.weight.shape == (8, 12)
    torch.testing.assert_close(a.base_layer(x), b(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_is_alpha_over_r_or_sqrt_r(rslora):
    layer = LoRALinear(nn.Linear(8, 8))
    layer.add_adapter("default", lora.LoraConfig(r=4, alpha=6, rslora=rslora))
    assert layer.scaling["default"] == pytest.approx(6 / (math.sqrt(4) if rslora else 4))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    expected = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(layer.delta_weight("default"), expected)


def test_gaussian_init_has_std_one_over_r_and_zero_b():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(4096, 8))
    layer.add_adapter("default", lora.LoraConfig(r=4, init="gaussian"))
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(0.25, rel=0.05)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_dropout_applies_to_the_lora_branch_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = LoRALinear(base)
    layer.add_adapter("default", lora.LoraConfig(r=4, dropout=0.5))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    layer.train()
    x = torch.randn(64, 16)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = base(x) + layer.scaling["default"] * layer.lora_B["default"](layer.lora_A["default"](dropped))
    torch.testing.assert_close(y, expected)
    layer.eval()  # no dropout at eval
    merged_weight = base.weight + layer.delta_weight("default")
    torch.testing.assert_close(layer(x), x @ merged_weight.T + base.bias, atol=1e-5, rtol=0)


def test_dora_forward_matches_its_merged_weight_definition():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LoRALinear(base)
    layer.add_adapter("default", lora.LoraConfig(r=2, dora=True))
    m = layer.lora_magnitude_vector["default"]
    torch.testing.assert_close(m, base.weight.norm(dim=1))  # m starts at ||W||_row
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        m.mul_(1.5)
    W = base.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    W_dora = m.unsqueeze(1) * W / W.norm(dim=1, keepdim=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), x @ W_dora.T + base.bias, atol=1e-5, rtol=0)


def test_multiple_adapters_in_one_layer_sum_when_both_active():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8))
    layer.add_adapter("a", lora.LoraConfig(r=2))
    layer.add_adapter("b", lora.LoraConfig(r=3, alpha=3))
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
        layer.lora_B["b"].weight.normal_()
    x = torch.randn(4, 8)
    base = layer.base_layer(x)
    layer.set_active(("a",))
    ya = layer(x)
    layer.set_active(("b",))
    yb = layer(x)
    layer.set_active(("a", "b"))
    torch.testing.assert_close(layer(x), ya + yb - base)
    layer.merge()
    assert layer.merged_adapters == ["a", "b"]
    torch.testing.assert_close(layer.base_layer(x), ya + yb - base, atol=1e-5, rtol=0)


def test_forward_compiles_without_graph_breaks_and_matches_eager():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16))
    layer.add_adapter("default", lora.LoraConfig(r=4))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph=True raises on any graph break
    torch.testing.assert_close(compiled(x), layer(x))
    torch._dynamo.reset()
