"""The model card (README.md) in every saved adapter folder: what it says, that it is rewritten on every save, and
that a card that cannot be written never blocks the save."""

import json
import warnings

import pytest

import lora
from lora import model_card
from conftest import make_char_tokenizer, make_llama_for, randomize_adapters


def saved(tmp_path, cfg=None, **kwargs):
    model = make_llama_for(make_char_tokenizer())
    model.name_or_path = "my-base"
    lora.inject(model, cfg or lora.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*vLLM's LoRA serving does not")  # DoRA's
        folder = lora.save_adapter(model, tmp_path / "ad", **kwargs)
    return model, folder


def test_the_card_names_the_base_its_fingerprint_the_settings_and_how_to_load_it(tmp_path):
    model, folder = saved(tmp_path, card={"data": {"train_file": "my_train.jsonl", "train_examples": 123},
                                          "metrics": {"accuracy_after": 0.875, "eval_loss": 1.25}})
    card = (folder / "README.md").read_text()
    config = json.loads((folder / "adapter_config.json").read_text())
    digest = model_card.fingerprint_digest(config)
    assert digest and f"sha256 {digest} (float32 weights, 4 tensors sampled)" in card  # 2 layers x q, v
    assert card.startswith('---\nbase_model: "my-base"\nlibrary_name: peft\n')
    assert "# LoRA adapter for my-base" in card
    for row in ("| r | 4 |", "| lora_alpha | 8 |", "| scale | 2 (alpha / r) |",
                "| target modules | 4 (q_proj, v_proj) |", "| train_file | my_train.jsonl |",
                "| train_examples | 123 |", "| accuracy_after | 0.875 |", "| eval_loss | 1.25 |"):
        assert row in card, row
    parameters = sum(t.numel() for t in lora.adapter_state_dict(model).values())
    assert f"| parameters | {parameters:,} |" in card
    assert f"PeftModel.from_pretrained(base, {str(folder)!r})" in card
    assert f"lora generate --model my-base --adapter {folder}" in card
    assert f"vllm serve my-base --enable-lora --lora-modules adapter={folder}" in card
    assert "--adapter-only" in card


def test_the_card_is_rewritten_on_every_save_and_the_folder_stays_replaceable(tmp_path):
    _, folder = saved(tmp_path, card={"metrics": {"eval_loss": 2.5}})
    assert "| eval_loss | 2.5 |" in (folder / "README.md").read_text()
    _, folder = saved(tmp_path, card={"metrics": {"eval_loss": 0.5}})  # over the folder with the old card
    card = (folder / "README.md").read_text()
    assert "| eval_loss | 0.5 |" in card and "2.5" not in card
    _, folder = saved(tmp_path)  # no card facts: no metrics section
    assert "## Metrics" not in (folder / "README.md").read_text()


def test_dora_and_large_rank_cards_say_what_vllm_and_llama_cpp_need(tmp_path):
    _, folder = saved(tmp_path, cfg=lora.LoraConfig(r=4, dora=True))
    card = (folder / "README.md").read_text()
    assert "vLLM: no, it uses DoRA, which vLLM's LoRA serving does not load" in card
    assert "llama.cpp / Ollama: not as an adapter, it uses DoRA; llama.cpp adapters hold plain LoRA A/B" in card
    assert "vllm serve" not in card and "--adapter-only" not in card
    _, folder = saved(tmp_path, cfg=lora.LoraConfig(r=32))
    assert "--enable-lora --max-lora-rank 32 --lora-modules" in (folder / "README.md").read_text()


def test_a_card_that_fails_warns_and_the_adapter_is_saved_all_the_same(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the card renderer broke")

    monkeypatch.setattr(model_card, "render", broken)
    model = make_llama_for(make_char_tokenizer())
    lora.inject(model, lora.LoraConfig(r=2))
    randomize_adapters(model)
    with pytest.warns(UserWarning, match=r"model card \(README.md\) was not written \(RuntimeError: the card "
                                         r"renderer broke\); the adapter itself is saved"):
        folder = lora.save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = make_llama_for(make_char_tokenizer())
    lora.load_adapter(fresh, folder)
    assert all((a == b).all() for a, b in zip(lora.adapter_state_dict(fresh).values(),
                                               lora.adapter_state_dict(model).values()))


def test_a_card_that_fails_while_writing_leaves_no_half_card(tmp_path, monkeypatch):
    from pathlib import Path

    real = Path.write_text

    def fail_on_readme(self, text, *args, **kwargs):
        if self.name == "README.md":
            real(self, text[:10], *args, **kwargs)  # a partial write, then the disk is full
            raise OSError(28, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_on_readme)
    with pytest.warns(UserWarning, match="No space left on device"):
        _, folder = saved(tmp_path)
    assert not (folder / "README.md").exists() and (folder / "adapter_model.safetensors").is_file()


def test_peft_loads_a_folder_with_its_card(tmp_path):
    from peft import PeftModel

    model, folder = saved(tmp_path)
    base = make_llama_for(make_char_tokenizer())
    peft_model = PeftModel.from_pretrained(base, str(folder))
    import torch

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, model(ids).logits, atol=1e-5)
