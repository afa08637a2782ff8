"""Target matching, freezing, several adapters, disabling, and every error inject can raise."""

import pytest
import torch

import lora
from lora.inject import adapters_of
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
    with pytest.raises(ValueError, match=r"'lm_head' \(a LoRA target\) shares its weight with "
                                         r"'model.embed_tokens'.*untie"):
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
    # the saved module trains a copy of its own (PEFT's modules_to_save.<adapter>); the original stays frozen
    assert {"transformer.ln_f.modules_to_save.default.weight", "transformer.ln_f.modules_to_save.default.bias",
            "transformer.h.0.attn.c_attn.base_layer.bias"} <= trainable
    assert "transformer.ln_f.original_module.weight" not in trainable
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
    ({"alpha": 0}, "alpha must be a finite number > 0"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
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


def one_layer_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def test_a_second_adapter_wraps_the_model_layers_not_the_first_adapters_insides(tokens):
    # issue 9: with all-linear, adapter "b" also wrapped a's lora_A/lora_B (7 targets for a, 21 for b)
    model = one_layer_llama()
    a = lora.inject(model, lora.LoraConfig(r=2), adapter="a")
    b = lora.inject(model, lora.LoraConfig(r=2), adapter="b")
    assert len(a) == 7 and b == a
    randomize_adapters(model)
    lora.set_active(model, ["a", "b"])
    expected = model(tokens).logits
    lora.merge(model)  # failed when b's wrappers sat inside a's
    torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=0)
    lora.unmerge(model)


def test_saved_modules_are_a_trained_copy_per_adapter(tokens):
    # issue 9: modules_to_save trained the base module in place, shared by every adapter and by disabled()
    model = make_llama()
    base_head = model.lm_head.weight.detach().clone()
    base_logits = model(tokens).logits
    lora.inject(model, lora.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]), adapter="a")
    with torch.no_grad():
        model.lm_head.modules_to_save["a"].weight.add_(0.5)  # what training the head does
    with_a = model(tokens).logits
    assert not torch.allclose(with_a, base_logits)
    with lora.disabled(model):
        assert torch.equal(model(tokens).logits, base_logits)  # the base model's own head

    lora.inject(model, lora.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]), adapter="b")
    assert torch.equal(model.lm_head.modules_to_save["b"].weight, base_head)  # b starts from the base, not a
    assert torch.equal(model(tokens).logits, base_logits)  # fresh b: the base output
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.modules_to_save.b.weight" in trainable and "lm_head.modules_to_save.a.weight" not in trainable
    lora.set_active(model, "a")
    assert torch.equal(model(tokens).logits, with_a)
    with pytest.raises(ValueError, match="only one of them can be active"):
        lora.set_active(model, ["a", "b"])
    assert torch.equal(model(tokens).logits, with_a)  # the refused switch changed nothing

    lora.remove_adapter(model, "a")
    lora.remove_adapter(model, "b")
    assert isinstance(model.lm_head, torch.nn.Linear) and torch.equal(model.lm_head.weight, base_head)


def test_merge_and_unload_keeps_the_active_adapters_trained_module(tokens):
    model = make_llama()
    keys = set(model.state_dict())
    lora.inject(model, lora.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(0.5)
    expected = model(tokens).logits
    plain = lora.merge_and_unload(model)
    assert set(plain.state_dict()) == keys
    torch.testing.assert_close(plain(tokens).logits, expected, atol=1e-5, rtol=0)


def test_a_tied_module_in_modules_to_save_is_refused():
    # issue 9: training a tied head trained the input embedding too
    model = make_llama(tie=True)
    with pytest.raises(ValueError, match=r"'lm_head' \(in modules_to_save\) shares its weight with "
                                         r"'model.embed_tokens'.*untie it first"):
        lora.inject(model, lora.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]))
    assert not any("lora_" in n or "modules_to_save" in n for n in model.state_dict())  # nothing was injected


def test_a_failed_load_under_a_new_name_leaves_the_model_exactly_as_it_was(tmp_path, tokens):
    # issue 9: a failed load_adapter(adapter="b") switched the active adapter "a" off
    other = make_llama(seed=3)
    lora.inject(other, lora.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    randomize_adapters(other)
    lora.save_adapter(other, tmp_path / "other")  # trained on another base: refused by the fingerprint

    model = make_llama()
    lora.inject(model, lora.LoraConfig(r=2, targets=["q_proj", "k_proj"]), adapter="a")
    randomize_adapters(model)
    logits = model(tokens).logits
    modules = {n: type(m) for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="different base model"):
        lora.load_adapter(model, tmp_path / "other", adapter="b")
    assert torch.equal(model(tokens).logits, logits)
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert set(adapters_of(model)) == {"a"}


def test_adapters_added_to_a_model_in_eval_mode_have_their_dropout_off(tokens):
    model = make_llama().eval()
    lora.inject(model, lora.LoraConfig(r=4, dropout=0.5, targets=["q_proj"]))
    lora.inject(model, lora.LoraConfig(r=4, dropout=0.5, targets=["q_proj", "v_proj"]), adapter="b")  # wrappers exist
    randomize_adapters(model, seed=1)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(tokens).logits, model(tokens).logits, atol=0, rtol=0)
    model.train()  # and train mode still turns it on
    assert not torch.equal(model(tokens).logits, model(tokens).logits)


def test_an_inject_that_one_layer_refuses_leaves_the_model_as_it_was_and_can_be_retried():
    model = make_llama()  # q_proj is 16 x 16, k_proj 8 x 16 (one key-value head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers.0.self_attn.k_proj: init=.pissa. needs r <= min\(in, out\) = 8"):
        lora.inject(model, lora.LoraConfig(r=12, init="pissa"))
    assert not adapters_of(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # bit for bit
    assert len(lora.inject(model, lora.LoraConfig(r=4, init="pissa"))) == 14
