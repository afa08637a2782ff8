"""`lora info PATH`: an adapter folder (settings, base, targets, size, readers), a GGUF file, a merged folder."""

import json
import warnings

import pytest

import lora
from lora.cli import main
from lora.info import describe
from lora.model_card import fingerprint_digest
from conftest import make_bpe_tokenizer, make_llama_for, randomize_adapters
from families import make_family


def base_and_adapter(tmp_path, make_model=None, **cfg):
    tok = make_bpe_tokenizer()
    model = (make_model or make_llama_for)(tok)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model.name_or_path = str(tmp_path / "base")  # recorded as the adapter's base
    wrapped = lora.inject(model, lora.LoraConfig(r=4, alpha=8, **cfg))
    randomize_adapters(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*vLLM's LoRA serving does not")
        lora.save_adapter(model, tmp_path / "adapter")
    return model, wrapped


def test_an_adapter_folder_is_described_and_every_reader_takes_a_plain_adapter(tmp_path):
    model, wrapped = base_and_adapter(tmp_path)
    info = describe(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert info["kind"] == "adapter" and info["base_model_name_or_path"] == str(tmp_path / "base")
    assert info["base_fingerprint"] == fingerprint_digest(config) is not None
    assert (info["r"], info["lora_alpha"], info["scale"], info["target_modules"]) == (4, 8, 2.0, len(wrapped))
    assert info["target_names"] == sorted({w.rsplit(".", 1)[-1] for w in wrapped}) and info["layers"] == "0-1 (2)"
    assert info["parameters"] == sum(t.numel() for t in lora.adapter_state_dict(model).values())
    assert info["size_bytes"] == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert info["model_card"] is True
    assert info["readers"] == {"peft": None, "vllm": None, "llama.cpp": None}


def test_readers_say_no_with_the_reason(tmp_path):
    base_and_adapter(tmp_path, dora=True)
    readers = describe(tmp_path / "adapter")["readers"]
    assert readers["peft"] is None
    assert readers["vllm"].startswith("it uses DoRA, which vLLM's LoRA serving does not load; merge it")
    assert readers["llama.cpp"].startswith("it uses DoRA; llama.cpp adapters hold plain LoRA A/B pairs only")


def test_llama_cpp_is_refused_for_a_family_gguf_export_does_not_write_and_a_base_that_is_not_here(tmp_path):
    base_and_adapter(tmp_path, lambda tok: make_family("bloom", tok))
    readers = describe(tmp_path / "adapter")["readers"]
    assert readers["vllm"] is None
    assert "is a 'bloom' model" in readers["llama.cpp"] and "lora merge" in readers["llama.cpp"]
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace(str(tmp_path / "base"), "/nowhere/base"))
    assert "the base '/nowhere/base' is not on this machine" in describe(tmp_path / "adapter")["readers"]["llama.cpp"]


def test_gguf_files_and_merged_folders_are_described(tmp_path):
    from lora.export import export_adapter_gguf, write_gguf, write_merged

    model, _ = base_and_adapter(tmp_path)
    plain_parameters = sum(p.numel() for p in lora.merge_and_unload(model).parameters())
    write_gguf(tmp_path / "base", tmp_path / "model.gguf", tmp_path / "adapter", dtype="f32")
    info = describe(tmp_path / "model.gguf")
    assert (info["kind"], info["architecture"], info["layers"]) == ("gguf model", "llama", 2)
    assert info["parameters"] == plain_parameters and info["tensor_types"] == {"F32": info["tensors"]}
    assert info["tokenizer"] == "gpt2" and info["chat_template"] is True
    export_adapter_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "adapter.gguf")
    info = describe(tmp_path / "adapter.gguf")
    assert (info["kind"], info["adapter_type"]) == ("gguf adapter", "lora")
    assert info["tensors"] == 2 * 14  # A and B of every wrapped layer
    write_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    info = describe(tmp_path / "merged")
    assert (info["kind"], info["model_type"], info["layers"]) == ("model folder", "llama", 2)
    assert info["parameters"] == plain_parameters and info["gguf_export"] is True and info["tokenizer"] is True


def test_the_command_prints_it_and_refuses_what_it_cannot_read(tmp_path, capsys):
    base_and_adapter(tmp_path)
    assert main(["info", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "kind: adapter" in out and "r: 4" in out
    assert "  PEFT: yes" in out and "  vLLM: yes" in out and "  llama.cpp adapter GGUF: yes" in out
    assert main(["info", "--json", str(tmp_path / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out)["readers"]["peft"] is None
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "lora info: error: " in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "is none of them: lora info reads an adapter folder" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '{"peft_type": "IA3"}'])
def test_a_broken_adapter_config_is_one_error(tmp_path, capsys, bad):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(bad)
    assert main(["info", str(tmp_path / "ad")]) == 2
    assert capsys.readouterr().err.startswith("lora info: error: ")
