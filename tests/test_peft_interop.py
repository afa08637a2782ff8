"""Adapters move both ways between this library and PEFT with the same logits."""

import json
import warnings

import peft
import pytest
import torch

import lora
from conftest import make_gpt2, make_llama, randomize_adapters

CASES = {
    "llama": (make_llama, dict(r=4, alpha=8), dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-rslora": (make_llama, dict(r=4, alpha=8, rslora=True, targets=["q_proj", "v_proj"]),
                     dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "llama-dora": (make_llama, dict(r=4, alpha=8, dora=True), dict(r=4, lora_alpha=8, use_dora=True,
                                                                  target_modules="all-linear")),
    "llama-head": (make_llama, dict(r=2, targets=["q_proj"], modules_to_save=["lm_head"]),
                   dict(r=2, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "gpt2": (make_gpt2, dict(r=4, alpha=8), dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                 fan_in_fan_out=True)),
}


def perturb_saved_modules(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("case", CASES)
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, tokens, case):
    make, ours, _ = CASES[case]
    model = make()
    lora.inject(model, lora.LoraConfig(**ours))
    randomize_adapters(model)
    perturb_saved_modules(model)
    expected = model(tokens).logits
    lora.save_adapter(model, tmp_path / "ad")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ad").eval()
    torch.testing.assert_close(theirs(tokens).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_ours_with_the_same_logits(tmp_path, tokens, case):
    make, _, theirs_cfg = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft.LoraConfig(**theirs_cfg))
    randomize_adapters(theirs)
    perturb_saved_modules(theirs)
    theirs.eval()
    expected = theirs(tokens).logits
    theirs.save_pretrained(tmp_path / "ad")

    model = make()
    with pytest.warns(UserWarning, match="records no base-model fingerprint"):
        lora.load_adapter(model, tmp_path / "ad")
    torch.testing.assert_close(model(tokens).logits, expected, atol=1e-5, rtol=1e-5)


def test_rslora_scale_agrees_with_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=9, lora_alpha=6, use_rslora=True,
                                                                  target_modules=["q_proj"]))
    ours = make_llama()
    lora.inject(ours, lora.LoraConfig(r=9, alpha=6, rslora=True, targets=["q_proj"]))
    their_scale = theirs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert ours.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(their_scale) == 2.0


def make_llama_classifier():
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = make_llama().config
    config.num_labels, config.pad_token_id = 3, 0
    return LlamaForSequenceClassification(config).eval()


def test_classification_adapter_loads_in_peft_as_a_classifier(tmp_path, tokens):
    # issue 9: the task type decides PEFT's wrapper; CAUSAL_LM on a classifier built the wrong one
    model = make_llama_classifier()
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, modules_to_save=["score"]))
    randomize_adapters(model)
    perturb_saved_modules(model)
    expected = model(tokens).logits  # (B, num_labels)
    lora.save_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_llama_classifier(), tmp_path / "ad").eval()
    assert isinstance(theirs, peft.PeftModelForSequenceClassification)
    torch.testing.assert_close(theirs(tokens).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_classifier_adapter_trained_with_peft_loads_with_its_head(tmp_path, tokens):
    theirs = peft.get_peft_model(make_llama_classifier(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                           target_modules=["q_proj", "v_proj"]))
    randomize_adapters(theirs)
    with torch.no_grad():
        theirs.base_model.model.score.modules_to_save["default"].weight.normal_()  # a trained head
    expected = theirs.eval()(tokens).logits
    theirs.save_pretrained(tmp_path / "ad")
    listed = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["modules_to_save"]
    assert "classifier" in listed  # a head name this model does not have
    ours = make_llama_classifier()
    lora.load_adapter(ours, tmp_path / "ad")
    torch.testing.assert_close(ours(tokens).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_peft_adapter_on_the_embedding_loads_with_peft_s_logits(tmp_path):
    """LoRA on nn.Embedding (lora_embedding_A/B) is supported; tests/test_new_tokens.py checks it both ways."""
    theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_embedding_A" in name:
                p.normal_()  # PEFT starts A at zero: give the update something to do
    theirs.save_pretrained(tmp_path / "ad")
    ours = make_llama()
    lora.load_adapter(ours, tmp_path / "ad")
    ids = torch.tensor([[3, 9, 27, 4, 60]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs.eval()(ids).logits, atol=1e-5, rtol=1e-5)
        assert (ours(ids).logits - make_llama()(ids).logits).abs().max() > 1e-3


def test_task_type_of_causal_and_plain_models(tmp_path):
    from tiny_gpt import TinyGPT

    for model, task in ((make_llama(), "CAUSAL_LM"), (make_gpt2(), "CAUSAL_LM"), (TinyGPT(), None)):
        lora.inject(model, lora.LoraConfig(r=2))
        lora.save_adapter(model, tmp_path / "ad")
        assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["task_type"] == task
