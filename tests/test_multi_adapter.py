"""Several adapters at once (issue 12): per-row adapters in one batch, adapter algebra, the DPO loss."""

import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F

import lora
from lora.inject import adapters_of, lora_layers
from conftest import make_char_tokenizer, make_gpt2, make_llama, make_llama_for, randomize_adapters


def two_adapters(make=make_llama, **b_cfg):
    model = make()
    lora.inject(model, lora.LoraConfig(r=2, alpha=4), adapter="a")
    lora.inject(model, lora.LoraConfig(r=4, alpha=4, **{"targets": ["q_proj", "v_proj"], **b_cfg}), adapter="b")
    randomize_adapters(model, std=0.3)
    return model


def alone(model, name, tokens):
    if name is None:
        with lora.disabled(model):
            return model(tokens).logits
    lora.set_active(model, name)
    return model(tokens).logits


def test_each_row_gets_what_it_gets_alone_with_its_adapter(tokens):
    model = two_adapters()
    names = ["a", None, "b", "a"]
    batch = torch.cat([tokens, tokens])  # (4, T)
    with lora.row_adapters(model, names):
        mixed = model(batch).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone(model, name, batch[i:i + 1])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown adapter"):
        with lora.row_adapters(model, ["a", "zzz"]):
            pass
    with pytest.raises(ValueError, match="one name .* per row"):
        with lora.row_adapters(model, ["a"]):
            model(batch)


def test_rows_with_their_own_trained_head(tokens):
    model = make_llama()
    for name in ("a", "b"):
        lora.inject(model, lora.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]), adapter=name)
        with torch.no_grad():
            model.lm_head.modules_to_save[name].weight.add_(0.3 if name == "a" else -0.3)
    randomize_adapters(model)
    with lora.row_adapters(model, ["b", "a"]):
        mixed = model(tokens).logits
    torch.testing.assert_close(mixed[0], alone(model, "b", tokens[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], alone(model, "a", tokens[1:])[0], atol=1e-5, rtol=1e-5)


def test_generate_with_adapter_names_matches_each_prompt_alone():
    tok = make_char_tokenizer()
    model = make_llama_for(tok)
    for name in ("a", "b"):
        lora.inject(model, lora.LoraConfig(r=4), adapter=name)
    randomize_adapters(model, std=0.5)
    prompts, names = ["hello", "hi there", "hey"], ["a", None, "b"]
    mixed = lora.generate(model, tok, prompts, max_new_tokens=6, temperature=0, adapter_names=names)
    expected = []
    for prompt, name in zip(prompts, names):
        if name is None:
            with lora.disabled(model):
                expected.append(lora.generate(model, tok, prompt, max_new_tokens=6, temperature=0))
        else:
            lora.set_active(model, name)
            expected.append(lora.generate(model, tok, prompt, max_new_tokens=6, temperature=0))
    assert mixed == expected
    assert len(set(expected)) > 1  # the adapters really answer differently


def delta(model, name, path):
    return dict(lora_layers(model))[path].delta_weight(name).detach()


@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_cat_is_exactly_the_weighted_sum_across_ranks_alphas_and_rslora(make):
    model = make()
    lora.inject(model, lora.LoraConfig(r=2, alpha=3, rslora=True), adapter="a")
    lora.inject(model, lora.LoraConfig(r=5, alpha=16), adapter="b")
    randomize_adapters(model, std=0.3)
    errors = lora.combine_adapters(model, {"a": 0.7, "b": -0.3}, name="c", method="cat")
    assert errors and set(errors.values()) == {0.0}
    for path, layer in lora_layers(model):
        assert layer.lora_A["c"].weight.shape[0] == 7  # rank = sum of ranks
        torch.testing.assert_close(delta(model, "c", path),
                                   0.7 * delta(model, "a", path) - 0.3 * delta(model, "b", path), atol=1e-6, rtol=0)


def test_svd_is_the_best_low_rank_approximation():
    model = two_adapters()
    summed = {p: delta(model, "a", p) + 2.0 * (delta(model, "b", p) if "b" in layer.lora_A else 0)
              for p, layer in lora_layers(model)}
    errors = lora.combine_adapters(model, {"a": 1.0, "b": 2.0}, name="c", method="svd", rank=2)
    for path, target in summed.items():
        S = torch.linalg.svdvals(target.double())
        optimal = float((S[2:].pow(2).sum() / S.pow(2).sum()).sqrt())  # Eckart-Young
        assert errors[path] == pytest.approx(optimal, rel=1e-4, abs=1e-6)
        got = float((delta(model, "c", path) - target).norm() / target.norm())
        assert got == pytest.approx(optimal, rel=1e-3, abs=1e-5)
    assert any(e > 0.01 for e in errors.values())  # rank 2 really truncates the rank-6 layers
    full = lora.combine_adapters(model, {"a": 1.0, "b": 2.0}, name="d", method="svd", rank=6)
    assert max(full.values()) < 1e-6


def test_combined_adapter_saves_and_loads_in_peft(tmp_path, tokens):
    model = two_adapters()
    lora.combine_adapters(model, {"a": 0.5, "b": 0.5}, name="c", method="svd", rank=3)
    expected = alone(model, "c", tokens)
    lora.save_adapter(model, tmp_path / "c", adapter="c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["r"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "c").eval()
    torch.testing.assert_close(theirs(tokens).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_combining_a_principal_init_adapter_sums_its_update_over_the_original_base(tokens, init):
    model = make_llama()
    lora.inject(model, lora.LoraConfig(r=2, alpha=4, init=init), adapter="p")
    lora.inject(model, lora.LoraConfig(r=3, alpha=3, targets=["q_proj"]), adapter="k")
    randomize_adapters(model, std=0.3)
    expected = alone(model, "p", tokens)
    lora.combine_adapters(model, {"p": 1.0}, name="c")
    torch.testing.assert_close(alone(model, "c", tokens), expected, atol=1e-5, rtol=1e-5)
    lora.combine_adapters(model, {"p": 0.5, "k": -1.0}, name="d")
    for path, layer in lora_layers(model):
        A0, B0 = layer.initial_factors["p"]
        update_p = delta(model, "p", path) - layer.scaling["p"] * B0 @ A0  # what p adds to the original base
        update_k = delta(model, "k", path) if "k" in layer.lora_A else 0
        assert layer.lora_A["d"].weight.shape[0] == 2 * 2 + 3
        torch.testing.assert_close(delta(model, "d", path), 0.5 * update_p - update_k, atol=1e-5, rtol=0)


def test_loading_into_a_merged_or_principal_init_adapter_is_refused(tmp_path, tokens):
    model = make_llama()
    lora.inject(model, lora.LoraConfig(r=2, alpha=4))
    lora.save_adapter(model, tmp_path / "ad")
    randomize_adapters(model, std=0.3)
    lora.merge(model)
    merged = model(tokens).logits
    with pytest.raises(ValueError, match="'default' is merged into the base weights; call lora.unmerge"):
        lora.load_adapter(model, tmp_path / "ad")
    torch.testing.assert_close(model(tokens).logits, merged, atol=0, rtol=0)
    principal = make_llama()
    lora.inject(principal, lora.LoraConfig(r=2, alpha=4, init="pissa"))
    with pytest.raises(ValueError, match="init='pissa'.*under another adapter name"):
        lora.load_adapter(principal, tmp_path / "ad")


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
def test_a_dora_adapter_merged_with_another_gives_what_the_forward_gave(tokens, order):
    model = two_adapters(dora=True)  # b is DoRA: its update depends on the base weight under it
    lora.set_active(model, order)
    both = model(tokens).logits
    lora.merge(model)
    torch.testing.assert_close(model(tokens).logits, both, atol=1e-5, rtol=1e-5)
    lora.unmerge(model)
    torch.testing.assert_close(model(tokens).logits, both, atol=1e-5, rtol=1e-5)


def test_two_dora_adapters_are_not_merged_in_one_step(tokens):
    model = two_adapters(dora=True)
    lora.inject(model, lora.LoraConfig(r=2, dora=True, targets=["q_proj"]), adapter="c")
    randomize_adapters(model, std=0.3)
    lora.set_active(model, ["b", "c"])
    before = model(tokens).logits
    with pytest.raises(ValueError, match=r"DoRA adapters \['b', 'c'\] would be merged in one step.*one at a time"):
        lora.merge(model)
    assert not any(layer.merged_adapters for _, layer in lora_layers(model))  # no layer was merged
    torch.testing.assert_close(model(tokens).logits, before, atol=0, rtol=0)


def test_combining_refuses_what_is_not_a_low_rank_delta():
    model = two_adapters(dora=True)
    with pytest.raises(ValueError, match="'b' uses DoRA.*merge it instead"):
        lora.combine_adapters(model, {"a": 1.0, "b": 1.0}, name="c")
    with pytest.raises(ValueError, match="unknown adapter"):
        lora.combine_adapters(model, {"zzz": 1.0}, name="c")
    with pytest.raises(ValueError, match="method must be one of"):
        lora.combine_adapters(model, {"a": 1.0}, name="c", method="ties")
    assert set(adapters_of(model)) == {"a", "b"}  # nothing was added


def test_dpo_loss_is_the_sigmoid_loss_of_the_reward_margin():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -4.0])
    margin = (pc - rc) - (pr - rr)  # (B,)
    expected = -F.logsigmoid(0.1 * margin).mean()
    assert float(lora.dpo_loss(pc, pr, rc, rr, beta=0.1)) == pytest.approx(float(expected))
    assert float(lora.dpo_loss(rc, rr, rc, rr)) == pytest.approx(float(torch.log(torch.tensor(2.0))))  # no margin
    with pytest.raises(ValueError, match="beta must be > 0"):
        lora.dpo_loss(pc, pr, rc, rr, beta=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_start_from_w_and_save_a_plain_delta_for_the_original_base(tmp_path, tokens, init):
    model = make_llama()
    base_logits = model(tokens).logits
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, init=init))
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(model(tokens).logits, base_logits, atol=1e-5, rtol=0)  # starts where the base is
    start = q.delta_weight("default")
    if init == "pissa":  # the principal part: the top-4 singular directions of W
        U, S, Vh = torch.linalg.svd(W)
        torch.testing.assert_close(start, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(q.base_layer.weight + start, W, atol=1e-6, rtol=0)  # the base keeps the residual

    randomize_adapters(model, std=0.2)  # what training does
    trained = model(tokens).logits
    with lora.disabled(model):
        torch.testing.assert_close(model(tokens).logits, base_logits, atol=1e-5, rtol=0)  # the original base
    lora.save_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # a plain rank-2r delta

    for load in ("ours", "peft", "merge"):
        fresh = make_llama()  # the ORIGINAL base
        if load == "ours":
            lora.load_adapter(fresh, tmp_path / "ad")
        elif load == "peft":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fresh = peft.PeftModel.from_pretrained(fresh, tmp_path / "ad").eval()
        else:
            fresh.load_state_dict(lora.merge_state_dict(base_sd, tmp_path / "ad"))
        torch.testing.assert_close(fresh(tokens).logits, trained, atol=1e-5, rtol=1e-5)

    plain = lora.merge_and_unload(model)
    torch.testing.assert_close(plain(tokens).logits, trained, atol=1e-5, rtol=1e-5)


def test_removing_a_pissa_adapter_gives_the_base_its_weight_back(tokens):
    model = make_llama()
    W = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    lora.inject(model, lora.LoraConfig(r=4, init="pissa"))
    lora.remove_adapter(model, "default")
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, W, atol=1e-6, rtol=0)


def test_an_unconverted_pissa_adapter_from_peft_is_refused(tmp_path):
    model = make_llama()
    lora.inject(model, lora.LoraConfig(r=2))
    lora.save_adapter(model, tmp_path / "ad")
    config_file = tmp_path / "ad" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(ValueError, match="relative to a residual base.*path_initial_model_for_weight_conversion"):
        lora.load_adapter(make_llama(), tmp_path / "ad")


def test_rows_with_a_pissa_adapter_and_scattered_rows(tokens):
    model = make_llama()
    lora.inject(model, lora.LoraConfig(r=2, init="pissa", targets=["q_proj", "up_proj"]), adapter="p")
    lora.inject(model, lora.LoraConfig(r=2), adapter="a")
    randomize_adapters(model, std=0.3)
    names = ["p", "a", None, "p"]  # p's rows are not contiguous: the index path
    batch = torch.cat([tokens, tokens])
    with lora.row_adapters(model, names):
        mixed = model(batch).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone(model, name, batch[i:i + 1])[0], atol=1e-5, rtol=1e-5)
