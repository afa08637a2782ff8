"""Saving and loading adapter folders: round trips, atomic writes, strict keys, base fingerprint, bad files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
import lora.adapter_io
from conftest import make_gpt2, make_llama, randomize_adapters


def trained_llama(tmp_path, **cfg):
    model = make_llama()
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, **cfg))
    randomize_adapters(model)
    lora.save_adapter(model, tmp_path / "ad")
    return model


@pytest.mark.parametrize("cfg", [{}, {"dora": True}, {"rslora": True, "targets": ["q_proj", "v_proj"]},
                                 {"modules_to_save": ["lm_head"]}])
def test_save_load_round_trip_gives_same_logits(tmp_path, tokens, cfg):
    model = trained_llama(tmp_path, **cfg)
    expected = model(tokens).logits
    fresh = make_llama()
    lora.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(fresh(tokens).logits, expected)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_saved_file_has_peft_layout(tmp_path):
    model = make_gpt2()
    lora.inject(model, lora.LoraConfig(r=4, targets=["c_attn"], dora=True))
    lora.save_adapter(model, tmp_path / "ad")
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn"
    assert tensors[f"{key}.lora_A.weight"].shape == (4, 16)  # r x in
    assert tensors[f"{key}.lora_B.weight"].shape == (48, 4)  # out x r
    assert tensors[f"{key}.lora_magnitude_vector"].shape == (48,)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True and config["use_dora"] is True
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert len(config["base_model_fingerprint"]["values"]) == 2
    assert config["base_model_fingerprint"]["dtype"] == "float32"


def test_load_with_trainable_continues_training(tmp_path):
    trained_llama(tmp_path)
    model = make_llama()
    lora.load_adapter(model, tmp_path / "ad", trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_save_is_atomic_and_keeps_the_old_folder_on_failure(tmp_path, monkeypatch):
    model = trained_llama(tmp_path)
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model, seed=5)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora.adapter_io, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        lora.save_adapter(model, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary folder left behind


def test_save_to_a_file_path_is_refused(tmp_path, llama):
    lora.inject(llama, lora.LoraConfig())
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="f is a file; give a folder path"):
        lora.save_adapter(llama, tmp_path / "f")
    with pytest.raises(ValueError, match=r"no adapter 'other'; it has \['default'\]"):
        lora.save_adapter(llama, tmp_path / "g", adapter="other")


def test_save_replaces_an_adapter_folder_but_never_deletes_other_files(tmp_path, llama):
    lora.inject(llama, lora.LoraConfig())
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"run already holds \['checkpoints'\].*would delete them"):
        lora.save_adapter(llama, run)
    assert (run / "checkpoints" / "step-0000002").is_dir()
    lora.save_adapter(llama, tmp_path / "ad")
    (tmp_path / "ad" / "README.md").write_text("PEFT's model card")
    lora.save_adapter(llama, tmp_path / "ad")  # an adapter folder (PEFT's too) is replaced whole, card included
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["README.md", "adapter_config.json",
                                                                   "adapter_model.safetensors"]
    assert "PEFT's model card" not in (tmp_path / "ad" / "README.md").read_text()
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "README.md").write_text("what this folder is for")  # not an adapter's model card
    with pytest.raises(ValueError, match=r"already holds \['README.md'\]"):
        lora.save_adapter(llama, tmp_path / "adapters")


def test_missing_and_corrupt_files_give_clear_errors(tmp_path, llama):
    with pytest.raises(ValueError, match="does not exist"):
        lora.load_adapter(llama, tmp_path / "nope")
    trained_llama(tmp_path)
    folder = tmp_path / "ad"
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    data, config_text = weights.read_bytes(), config.read_text()
    for broken in (data[: len(data) // 2], b"\x00" * 3):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match="corrupt or truncated"):
            lora.load_adapter(llama, folder)
    weights.write_bytes(data)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lora.load_adapter(llama, folder)
    config.unlink()
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        lora.load_adapter(llama, folder)
    config.write_text(config_text)
    weights.unlink()
    with pytest.raises(ValueError, match="has no adapter_model.safetensors"):
        lora.load_adapter(llama, folder)
    assert not any("lora" in n for n in llama.state_dict())  # failed loads left the model untouched


def test_key_mismatches_are_each_named_and_the_model_is_left_untouched(tmp_path, tokens):
    trained_llama(tmp_path)
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(weights)
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors.pop(f"{q0}.lora_A.weight")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    tensors[f"{q0.replace('q_proj', 'k_proj')}.lora_B.weight"] = torch.zeros(3, 4)
    save_file(tensors, weights)
    model = make_llama()
    keys, base = set(model.state_dict()), model(tokens).logits
    with pytest.raises(ValueError) as e:
        lora.load_adapter(model, tmp_path / "ad")
    msg = str(e.value)
    assert f"missing from the file (1): ['{q0}.lora_A.weight']" in msg
    assert "in the file but not in the model (1)" in msg and "lora_C" in msg
    assert "wrong shape (1)" in msg and "file (3, 4) vs model (8, 4)" in msg
    assert set(model.state_dict()) == keys and torch.equal(model(tokens).logits, base)
    assert all(p.requires_grad for p in model.parameters())


def test_adapter_from_another_base_is_refused(tmp_path, tokens):
    trained_llama(tmp_path)
    other = make_llama(seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="trained on a different base model.*check_base=False"):
        lora.load_adapter(other, tmp_path / "ad")
    # a fine-tuned variant of the same base (weights moved by ~10%) is also refused
    variant = make_llama()
    with torch.no_grad():
        for p in variant.parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn_like(p))
    with pytest.raises(ValueError, match="different base model"):
        lora.load_adapter(variant, tmp_path / "ad")
    lora.load_adapter(variant, tmp_path / "ad", check_base=False)  # the user may override


def test_same_base_in_lower_precision_is_accepted(tmp_path, tokens):
    trained_llama(tmp_path)
    half = make_llama().to(torch.bfloat16)
    lora.load_adapter(half, tmp_path / "ad")
    assert half.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32


def test_fingerprint_of_a_merged_model_is_the_base_fingerprint(tmp_path):
    model = trained_llama(tmp_path)
    lora.merge(model)
    lora.save_adapter(model, tmp_path / "merged_save")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_fingerprint"]["values"]
    again = json.loads((tmp_path / "merged_save" / "adapter_config.json").read_text())
    again = again["base_model_fingerprint"]["values"]
    for path in saved:
        torch.testing.assert_close(torch.tensor(again[path]), torch.tensor(saved[path]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make, cfg", [(make_llama, {}), (make_llama, {"dora": True}),
                                       (make_llama, {"modules_to_save": ["lm_head"]}),
                                       (make_gpt2, {"bias": "lora_only"})])
def test_merge_state_dict_matches_in_model_merge(tmp_path, tokens, make, cfg):
    base = make()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    lora.inject(base, lora.LoraConfig(r=4, **cfg))
    randomize_adapters(base)
    if cfg.get("bias"):
        with torch.no_grad():
            base.transformer.h[0].attn.c_attn.base_layer.bias.add_(1.0)
    lora.save_adapter(base, tmp_path / "ad")
    expected = base(tokens).logits
    merged_model = lora.merge_and_unload(base)
    assert set(merged_model.state_dict()) == set(base_sd)  # plain base keys again
    torch.testing.assert_close(merged_model(tokens).logits, expected, atol=1e-5, rtol=0)

    merged_sd = lora.merge_state_dict(base_sd, tmp_path / "ad")
    for k, v in merged_model.state_dict().items():  # one home for the weight math: the same bits on both paths
        assert torch.equal(merged_sd[k], v), k
    fresh = make()
    fresh.load_state_dict(merged_sd)
    torch.testing.assert_close(fresh(tokens).logits, expected, atol=1e-5, rtol=0)


def test_merge_state_dict_refuses_an_adapter_for_another_model(tmp_path):
    trained_llama(tmp_path)
    with pytest.raises(ValueError, match="not in the base state dict; it was trained on a different model"):
        lora.merge_state_dict(make_gpt2().state_dict(), tmp_path / "ad")


def test_saving_a_dora_adapter_warns_that_vllm_cannot_serve_it(tmp_path, llama):
    lora.inject(llama, lora.LoraConfig(r=2, dora=True))
    with pytest.warns(UserWarning, match="uses DoRA: PEFT loads it, but vLLM's LoRA serving does not.*lora merge"):
        lora.save_adapter(llama, tmp_path / "ad")
