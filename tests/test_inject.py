"""Target matching, freezing, several adapters, disabling, and every error inject can raise."""

import pytest
import torch

import lora
from lora.layers import LoRALinear
from conftest import make_gpt2, make_llama, randomize_adapters
from tiny_gpt import TinyGPT

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_all_linear_wraps_every_linear_but_the_head(llama):
    names = lora.inject(llama, lora.LoraConfig())
    assert len(names) == 2 * 7
    assert {n.rsplit(".", 1)[-1] for n in names} == LLAMA_LINEARS
    assert "lm_head" not in names and not isinstance(llama.lm_head, LoRALinear)


def test_all_linear_finds_the_head_of_a_plain_module_by_vocab_size():
    model = TinyGPT()
    names = lora.inject(model, lora.LoraConfig())
    assert "head" not in names
    assert set(names) == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "fc", "out")}


def test_all_linear_on_gpt2_wraps_conv1d(gpt2):
    names = lora.inject(gpt2, lora.LoraConfig())
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert all(gpt2.get_submodule(n).fan_in_fan_out for n in names)


def test_suffix_list_regex_exclude_and_layers(llama):
    assert lora.inject(llama, lora.LoraConfig(targets=["q_proj", "v_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert lora.inject(make_llama(), lora.LoraConfig(targets=r".*\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    names = lora.inject(make_llama(), lora.LoraConfig(exclude=["mlp.down_proj", "k_proj"], layers=[1]))
    assert names == [f"model.layers.1.{m}" for m in
                     ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")]


def test_targeting_the_head_explicitly_is_allowed_when_untied(llama):
    assert lora.inject(llama, lora.LoraConfig(targets=["lm_head"])) == ["lm_head"]


def test_nothing_matched_lists_what_could_be_targeted(llama):
    with pytest.raises(ValueError) as e:
        lora.inject(llama, lora.LoraConfig(targets=["query", "value"]))
    msg = str(e.value)
    assert "matched no layer" in msg and "'q_proj'" in msg and "'down_proj'" in msg and "[0, 1]" in msg
    assert not any(isinstance(m, LoRALinear) for m in llama.modules())  # nothing half-done


def test_tied_head_is_refused_with_an_explanation():
    model = make_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with \['model.embed_tokens'\].*untie"):
        lora.inject(model, lora.LoraConfig(targets=["lm_head"]))


def test_only_adapter_parameters_train(llama):
    lora.inject(llama, lora.LoraConfig(r=2))
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 14
    count = lora.parameter_count(llama)
    assert count["trainable"] == sum(p.numel() for p in llama.parameters() if p.requires_grad)
    assert count["percent"] == pytest.approx(100 * count["trainable"] / count["total"])


def test_modules_to_save_and_bias_modes_train_in_full(gpt2):
    lora.inject(gpt2, lora.LoraConfig(targets=["c_attn"], bias="lora_only", modules_to_save=["ln_f"]))
    trainable = {n for n, p in gpt2.named_parameters() if p.requires_grad}
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.h.0.attn.c_attn.base_layer.bias"} \
        <= trainable
    assert "transformer.h.0.mlp.c_fc.bias" not in trainable
    model = make_gpt2()
    lora.inject(model, lora.LoraConfig(targets=["c_attn"], bias="all"))
    assert "transformer.h.0.mlp.c_fc.bias" in {n for n, p in model.named_parameters() if p.requires_grad}


def test_modules_to_save_errors(llama):
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier' matched no module"):
        lora.inject(llama, lora.LoraConfig(modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="both a LoRA target and in modules_to_save"):
        lora.inject(llama, lora.LoraConfig(targets=["lm_head"], modules_to_save=["lm_head"]))


def test_second_adapter_shares_wrappers_and_set_active_switches(llama, tokens):
    lora.inject(llama, lora.LoraConfig(r=2, targets=["q_proj"]))
    randomize_adapters(llama, seed=1)
    out_a = llama(tokens).logits
    lora.inject(llama, lora.LoraConfig(r=3, targets=["q_proj", "v_proj"]), adapter="b")
    q = llama.model.layers[0].self_attn.q_proj
    assert q.adapters == ("default", "b") and q.active_adapters == ("b",)
    # only the new adapter trains
    assert not q.lora_A["default"].weight.requires_grad and q.lora_A["b"].weight.requires_grad
    with lora.disabled(llama):
        base = llama(tokens).logits
    torch.testing.assert_close(llama(tokens).logits, base)  # b is fresh: base output
    lora.set_active(llama, "default")
    torch.testing.assert_close(llama(tokens).logits, out_a)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]"):
        lora.set_active(llama, ["default", "c"])


def test_disabled_gives_base_output_even_when_merged(llama, tokens):
    base = llama(tokens).logits
    lora.inject(llama, lora.LoraConfig(r=2))
    randomize_adapters(llama)
    adapted = llama(tokens).logits
    lora.merge(llama)
    with lora.disabled(llama):
        torch.testing.assert_close(llama(tokens).logits, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(llama(tokens).logits, adapted, atol=1e-5, rtol=0)
    assert llama.model.layers[0].self_attn.q_proj.merged_adapters == ["default"]


def test_adapter_name_errors(llama):
    with pytest.raises(ValueError, match="adapter name 'a.b' must start"):
        lora.inject(llama, lora.LoraConfig(), adapter="a.b")
    lora.inject(llama, lora.LoraConfig())
    with pytest.raises(ValueError, match="adapter 'default' is already injected"):
        lora.inject(llama, lora.LoraConfig())


def test_remove_adapter_restores_plain_layers(llama, tokens):
    keys = set(llama.state_dict())
    base = llama(tokens).logits
    lora.inject(llama, lora.LoraConfig(r=2))
    randomize_adapters(llama)
    lora.remove_adapter(llama, "default")
    assert set(llama.state_dict()) == keys
    assert torch.equal(llama(tokens).logits, base)


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be an integer >= 1"),
    ({"alpha": 0}, "alpha must be a number > 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"init": "xavier"}, "init must be one of"),
    ({"bias": "some"}, "bias must be one of"),
    ({"targets": "q_proj("}, "neither 'all-linear' nor a valid regex"),
    ({"targets": []}, "non-empty list"),
    ({"exclude": "k_proj"}, r"must be a list of module names.*\['k_proj'\]"),
    ({"layers": []}, "non-empty list of block indices"),
])
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora.LoraConfig(**kwargs)


def test_config_round_trips_through_peft_json():
    cfg = lora.LoraConfig(r=4, alpha=8, dropout=0.1, targets=["q_proj"], rslora=True, dora=True, init="gaussian",
                          bias="lora_only", modules_to_save=["score"])
    back = lora.LoraConfig.from_peft(cfg.to_peft(["model.layers.0.self_attn.q_proj"]))
    assert back == cfg.replace(targets=("model.layers.0.self_attn.q_proj",))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        lora.LoraConfig.from_peft({"peft_type": "IA3", "r": 1, "target_modules": []})
    with pytest.raises(ValueError, match="rank_pattern"):
        lora.LoraConfig.from_peft({"r": 1, "target_modules": ["q"], "rank_pattern": {"q": 2}})
