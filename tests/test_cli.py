"""The `lora` command line."""

import torch

import lora
from lora.cli import main
from conftest import make_llama_for, make_char_tokenizer, randomize_adapters


def test_generate_with_an_adapter_matches_the_library(tmp_path, capsys):
    tok = make_char_tokenizer()
    model = make_llama_for(tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lora.inject(model, lora.LoraConfig(r=4))
    randomize_adapters(model, std=0.5)
    lora.save_adapter(model, tmp_path / "ad")
    expected = lora.generate(model, tok, "hello", max_new_tokens=6, temperature=0)
    with torch.no_grad(), lora.disabled(model):
        base_text = lora.generate(model, tok, "hello", max_new_tokens=6, temperature=0)
    assert expected != base_text  # the adapter changes what is generated

    code = main(["generate", "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--prompt", "hello",
                 "--max-new-tokens", "6", "--temperature", "0"])
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"


def test_errors_exit_2_with_the_message(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "lora generate: error: no model" in capsys.readouterr().err


def test_a_file_error_is_one_line_and_exit_2(capsys, tmp_path):
    tok = make_char_tokenizer()
    model = make_llama_for(tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lora.inject(model, lora.LoraConfig(r=2))
    lora.save_adapter(model, tmp_path / "ad")
    (tmp_path / "file").write_text("a file where the output folder's parent should be\n")
    capsys.readouterr()
    code = main(["merge", "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "file" / "merged")])  # an OSError while writing
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("lora merge: error: [Errno") and str(tmp_path / "file") in lines[0]


def test_generate_takes_no_check_base_as_the_base_check_tells_it_to(tmp_path, capsys):
    tok = make_char_tokenizer()
    other = make_llama_for(tok, seed=1)  # another base than the adapter's
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    model = make_llama_for(tok)
    lora.inject(model, lora.LoraConfig(r=2))
    lora.save_adapter(model, tmp_path / "ad")
    args = ["generate", "--model", str(tmp_path / "other"), "--adapter", str(tmp_path / "ad"), "--prompt", "hi",
            "--max-new-tokens", "2", "--temperature", "0"]
    assert main(args) == 2
    assert "on the command line --no-check-base" in capsys.readouterr().err
    assert main(args + ["--no-check-base"]) == 0
