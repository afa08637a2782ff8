"""LoRA on parameters (PEFT's target_parameters): mixture-of-experts stacks kept as 3-D tensors by transformers 5.

The family matrix (tests/test_families.py) trains, loads in PEFT, merges and exports each MoE family; here: the math
per expert, the layout of the file against PEFT's, what "all-linear" says, and the refusals.
"""

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lora
import lora.export
from conftest import make_bpe_tokenizer, randomize_adapters
from families import EXPERTS, MOE_FAMILIES, make_family
from lora.layers import LoRAParameter

IDS = torch.tensor([[5, 17, 42, 9, 30, 11, 100, 200, 7, 64, 250, 3]])
EXPERTS_ONLY = dict(r=2, alpha=4, targets=(), target_parameters=EXPERTS)


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def peft_model(family, tokenizer, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(make_family(family, tokenizer), folder).eval()


def test_all_linear_says_once_what_it_left_out_and_the_setting_that_covers_it(tokenizer):
    model = make_family("qwen3_moe", tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = lora.inject(model, lora.LoraConfig(r=2))
    said = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert len(said) == 1
    assert "4 expert weight stacks" in said[0] and "experts.gate_up_proj" in said[0] and "experts.down_proj" in said[0]
    assert "target_parameters=['experts.down_proj', 'experts.gate_up_proj']" in said[0]
    assert not any("experts" in p for p in paths)
    with warnings.catch_warnings(record=True) as caught:  # once covered, nothing is left to say
        warnings.simplefilter("always")
        lora.inject(make_family("qwen3_moe", tokenizer), lora.LoraConfig(r=2, target_parameters=EXPERTS))
    assert not [w for w in caught if "left out" in str(w.message)]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_router_stays_frozen_and_only_the_expert_adapters_train(family, tokenizer):
    model = make_family(family, tokenizer)
    router = [n for n, p in model.named_parameters() if ".mlp." in n and p.dim() == 2 and "experts" not in n]
    lora.inject(model, lora.LoraConfig(**EXPERTS_ONLY))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = dict(model.named_parameters())
    assert router and all(not frozen[n].requires_grad for n in router)
    randomize_adapters(model)
    model(IDS).logits.square().mean().backward()
    assert all(frozen[n].grad is None for n in router)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_each_expert_gets_its_own_low_rank_update_and_merging_changes_nothing(family, tokenizer):
    model = make_family(family, tokenizer)
    base = logits(model)
    lora.inject(model, lora.LoraConfig(**EXPERTS_ONLY))
    assert torch.equal(logits(model), base)  # B = 0: a fresh adapter leaves the output unchanged to the bit
    randomize_adapters(model)
    adapted = logits(model)
    assert (adapted - base).abs().max() > 1e-2
    wrappers = {m.parameter_name: m for m in model.modules() if isinstance(m, LoRAParameter)}
    for name, layer in wrappers.items():
        W = layer.base_parameter
        E, r = layer.num_experts, 2
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # PEFT's (E r, in), (out, r E)
        for e in range(E):
            by_hand = 2.0 * B[:, [k * E + e for k in range(r)]] @ A[e * r:(e + 1) * r]  # scale alpha / r = 2
            got = layer.delta_weight("default")[e]
            torch.testing.assert_close(got.T if layer.transposed else got, by_hand)
        assert layer.transposed == (family == "gpt_oss") and W.dim() == 3
    with lora.disabled(model):
        assert torch.equal(logits(model), base)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n and "lora" not in n}
    lora.merge(model)
    assert torch.equal(logits(model), adapted)  # the forward runs on exactly the tensor the merge writes
    lora.merge(model)  # idempotent
    assert torch.equal(logits(model), adapted)
    lora.unmerge(model)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    plain = lora.merge_and_unload(model)
    assert torch.equal(logits(plain), adapted)
    assert not any(isinstance(m, LoRAParameter) for m in plain.modules())
    assert sorted(plain.state_dict()) == sorted(make_family(family, tokenizer).state_dict())


def test_keys_and_config_are_peft_s_and_each_loads_the_other_s(tokenizer, tmp_path):
    """PEFT nests one wrapper per parameter in the order the module registers them (gate_up_proj innermost, at
    experts.base_layer); ours writes the same keys, and each side loads the other's file to the same logits."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    theirs = peft.get_peft_model(make_family("mixtral", tokenizer), config)
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = make_family("mixtral", tokenizer)
    lora.inject(ours, lora.LoraConfig(r=2, alpha=4, targets=["q_proj"], target_parameters=EXPERTS))
    lora.save_adapter(ours, tmp_path / "ours")
    their_keys, our_keys = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert {k: tuple(v.shape) for k, v in our_keys.items()} == {k: tuple(v.shape) for k, v in their_keys.items()}
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in our_keys  # gate_up_proj, inner
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in
                                           ("experts.gate_up_proj", "experts.down_proj")]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = make_family("mixtral", tokenizer)
        lora.load_adapter(loaded, tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), logits(theirs.eval()), atol=1e-5, rtol=1e-5)
    randomize_adapters(ours, seed=3)
    lora.save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(logits(peft_model("mixtral", tokenizer, tmp_path / "ours")), logits(ours),
                               atol=1e-5, rtol=1e-5)


def test_a_second_adapter_on_other_parameters_still_writes_peft_s_keys(tokenizer, tmp_path):
    """Adapter "one" adapts down_proj only, "two" both stacks: the wrappers nest as they were made, but each file
    has the keys PEFT gives that adapter alone."""
    model = make_family("qwen3_moe", tokenizer)
    lora.inject(model, lora.LoraConfig(r=2, targets=(), target_parameters=["experts.down_proj"]), adapter="one")
    lora.inject(model, lora.LoraConfig(r=2, targets=(), target_parameters=EXPERTS), adapter="two")
    randomize_adapters(model)
    lora.save_adapter(model, tmp_path / "two", adapter="two")
    lora.set_active(model, "two")
    theirs = peft_model("qwen3_moe", tokenizer, tmp_path / "two")
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-5, rtol=1e-5)
    lora.remove_adapter(model, "one")
    lora.remove_adapter(model, "two")
    assert not any(isinstance(m, LoRAParameter) for m in model.modules())


def test_a_peft_file_for_square_stacks_merges_through_the_model_folder(tokenizer, tmp_path):
    """Square expert stacks do not say by their shape how they are laid out: `lora merge` asks the model's own
    experts module (built without weights); a bare state dict cannot, and is refused with the route that works."""
    config_cls, model_cls, kwargs = MOE_FAMILIES["qwen3_moe"]
    MOE_FAMILIES["square"] = (config_cls, model_cls, kwargs | {"moe_intermediate_size": 32})  # gate_up: 64 x 64
    try:
        make_family("square", tokenizer).save_pretrained(tmp_path / "base")
        tokenizer.save_pretrained(tmp_path / "base")
        theirs = peft.get_peft_model(make_family("square", tokenizer),
                                     peft.LoraConfig(r=2, target_modules=None, target_parameters=EXPERTS))
        randomize_adapters(theirs)
        theirs.save_pretrained(tmp_path / "peft")
        expected = logits(theirs.eval())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora.export.write_merged(tmp_path / "base", tmp_path / "peft", tmp_path / "merged")
            with pytest.raises(ValueError, match=r"shapes do not say.*lora.load_adapter\(model, folder\), then "
                                                 r"lora.merge_and_unload"):
                lora.merge_state_dict(make_family("square", tokenizer).state_dict(), tmp_path / "peft")
            on_disk = load_file(tmp_path / "base" / "model.safetensors")  # transformers stores experts one by one
            with pytest.raises(ValueError, match=r"expert by expert on disk. Merge in the model instead: lora merge"):
                lora.merge_state_dict(on_disk, tmp_path / "peft")
        from transformers import AutoModelForCausalLM

        torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), expected,
                                   atol=1e-5, rtol=1e-5)
    finally:
        del MOE_FAMILIES["square"]


def test_what_cannot_adapt_a_parameter_is_refused_with_the_fix(tokenizer):
    with pytest.raises(ValueError, match=r"target_parameters .* cannot be combined with dropout.*dropout=0.0"):
        lora.LoraConfig(target_parameters=EXPERTS, dropout=0.1)
    with pytest.raises(ValueError, match=r"cannot be combined with dora=True"):
        lora.LoraConfig(target_parameters=EXPERTS, dora=True)
    model = make_family("mixtral", tokenizer)
    with pytest.raises(ValueError, match=r"\['experts.up_proj'\] matched no parameter.*experts.gate_up_proj"):
        lora.inject(model, lora.LoraConfig(target_parameters=["experts.up_proj"]))
    with pytest.raises(ValueError, match=r"a parameter of a Linear layer; adapt the layer itself through targets "
                                         r"\(targets=\['q_proj'\]\)"):
        lora.inject(model, lora.LoraConfig(targets=(), target_parameters=["q_proj.weight"]))
    assert not lora.inject.__globals__["adapters_of"](model)
    lora.inject(model, lora.LoraConfig(**EXPERTS_ONLY), adapter="a")
    with pytest.raises(ValueError, match=r"adapt whole parameters .*batches of their own"):
        with lora.row_adapters(model, ["a"]):
            pass
    with pytest.raises(ValueError, match=r"adapts parameters \(target_parameters\), which combine_adapters does "
                                         r"not sum"):
        lora.combine_adapters(model, {"a": 1.0}, name="c")


def test_gguf_of_a_moe_model_is_refused_naming_the_route(tokenizer, tmp_path):
    from families import save_base_and_adapter

    save_base_and_adapter(tmp_path, make_family("qwen3_moe", tokenizer), tokenizer, target_parameters=EXPERTS)
    for adapter_only in (False, True):
        with pytest.raises(ValueError, match=r"'qwen3_moe' model. Export a merged folder instead \(lora merge\)"):
            if adapter_only:
                lora.export.export_base_and_adapter_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "m.gguf",
                                                         verify=False)
            else:
                lora.export.export_gguf(tmp_path / "base", tmp_path / "m.gguf", tmp_path / "adapter", verify=False)
    assert not (tmp_path / "m.gguf").exists()


def test_the_router_is_adapted_when_asked_and_peft_agrees(tokenizer, tmp_path):
    """The router is a 2-D weight of a module that is not nn.Linear: a parameter adapter with one "expert"."""
    model = make_family("qwen3_moe", tokenizer)
    base = logits(model)
    lora.inject(model, lora.LoraConfig(r=2, targets=(), target_parameters=["gate.weight"]))
    router = model.model.layers[0].mlp.gate
    assert isinstance(router, LoRAParameter) and router.num_experts == 1 and (router.out_features, router.in_features) \
        == (4, 64)
    randomize_adapters(model, std=0.5)
    adapted = logits(model)
    assert (adapted - base).abs().max() > 1e-3
    lora.save_adapter(model, tmp_path / "ad")
    torch.testing.assert_close(logits(peft_model("qwen3_moe", tokenizer, tmp_path / "ad")), adapted,
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(logits(lora.merge_and_unload(model)), adapted)
