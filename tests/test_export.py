"""Export round trips: merged HF folder (Llama, GPT-2), GGUF read back by transformers, adapter GGUF, Modelfile."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora
from lora.cli import main
from lora.export import export_adapter_gguf, export_gguf, export_merged, ollama_modelfile, permute_for_llama_cpp
from conftest import make_bpe_tokenizer, make_gpt2, make_llama, make_llama_for, randomize_adapters


def base_and_adapter(tmp_path, make_model, tokenizer=None, **cfg):
    """A base folder, a trained-looking adapter for it, and the merged model's logits on some tokens."""
    model = make_model()
    model.save_pretrained(tmp_path / "base")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_path / "base")
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, **cfg))
    randomize_adapters(model, std=0.2)
    lora.save_adapter(model, tmp_path / "adapter")
    tokens = torch.tensor([[5, 17, 42, 9, 30, 11]])
    with torch.no_grad():
        expected = lora.merge_and_unload(model)(tokens).logits
    return tokens, expected


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merged_folder_loads_with_transformers_and_matches(tmp_path, name):
    tok = make_bpe_tokenizer()
    make = (lambda: make_llama_for(tok)) if name == "llama" else make_gpt2
    tokens, expected = base_and_adapter(tmp_path, make, tok if name == "llama" else None)
    out = export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(loaded(tokens).logits, expected, atol=1e-5, rtol=0)
    if name == "llama":
        assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template


def test_the_merged_folder_takes_no_other_weight_files_from_the_base(tmp_path):
    base_and_adapter(tmp_path, make_llama)
    (tmp_path / "base" / "consolidated.safetensors").write_bytes(b"Mistral's own copy of the unmerged weights")
    (tmp_path / "base" / "params.txt").write_text("kept")
    merged = export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", verify=False)
    names = {p.name for p in merged.iterdir()}
    assert "consolidated.safetensors" not in names and "params.txt" in names and "model.safetensors" in names


def test_merged_folder_is_sharded_above_the_limit(tmp_path):
    tok = make_bpe_tokenizer()
    tokens, expected = base_and_adapter(tmp_path, lambda: make_llama_for(tok), tok)
    out = export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(tokens).logits, expected, atol=1e-5, rtol=0)


def test_merge_refuses_an_adapter_for_another_model_and_keeps_old_output(tmp_path):
    tok = make_bpe_tokenizer()
    base_and_adapter(tmp_path, lambda: make_llama_for(tok), tok)
    make_gpt2().save_pretrained(tmp_path / "gpt2")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("mine")  # an earlier export's
    with pytest.raises(ValueError, match="trained on a different model"):
        export_merged(tmp_path / "gpt2", tmp_path / "adapter", tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_merge_into_a_base_saved_without_its_head_as_gpt2_is_on_the_hub(tmp_path):
    model = make_gpt2()
    model.transformer.save_pretrained(tmp_path / "base")  # GPT2Model: keys h.0..., not transformer.h.0...
    lora.inject(model, lora.LoraConfig(r=2))
    randomize_adapters(model, std=0.3)
    lora.save_adapter(model, tmp_path / "adapter")
    tokens = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        expected = model(tokens).logits
    merged = export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged)(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_merging_a_classifier_adapter_into_a_causal_lm_folder_says_where_it_belongs(tmp_path):
    from test_peft_interop import make_llama_classifier

    make_llama().save_pretrained(tmp_path / "base")
    classifier = make_llama_classifier()
    lora.inject(classifier, lora.LoraConfig(r=2, modules_to_save=["score"]))
    lora.save_adapter(classifier, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"trains a classification head \(score.weight\).*"
                                         r"AutoModelForSequenceClassification.*merge_and_unload"):
        export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")


def test_export_refuses_to_replace_a_folder_holding_files_it_did_not_write(tmp_path):
    tok = make_bpe_tokenizer()
    base_and_adapter(tmp_path, lambda: make_llama_for(tok), tok)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    for name in ("notes.txt", "llama-3-8b.Q4_K_M.gguf", "finetune.pt"):  # weight files of its own too
        (project / name).write_text("mine")
    with pytest.raises(ValueError, match=r"already holds \['finetune.pt', 'llama-3-8b.Q4_K_M.gguf', 'notes.txt', "
                                         r"'src'\].*would delete them"):
        export_merged(tmp_path / "base", tmp_path / "adapter", project)
    assert sorted(p.name for p in project.iterdir()) == ["finetune.pt", "llama-3-8b.Q4_K_M.gguf", "notes.txt", "src"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="file is a file; give a folder path"):
        export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    # an earlier export, sharded otherwise, is replaced whole: no stale shard stays beside the new file
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model-00001-of-00002.safetensors").write_text("old")
    export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert "model-00001-of-00002.safetensors" not in {p.name for p in (tmp_path / "merged").iterdir()}
    assert (tmp_path / "merged" / "model.safetensors").is_file()


# f32 must be exact to 1e-4; f16 and q8_0 may be off by this fraction of the largest logit. q8_0 keeps every weight
# within half a step of its 32-value block (max/127); this deliberately large-init tiny model amplifies that to ~4%.
@pytest.mark.parametrize("dtype, tolerance", [("f32", None), ("f16", 0.005), ("q8_0", 0.06)])
def test_gguf_read_back_by_transformers_matches_the_merged_model(tmp_path, dtype, tolerance):
    tok = make_bpe_tokenizer()
    tokens, expected = base_and_adapter(tmp_path, lambda: make_llama_for(tok), tok)
    path = export_gguf(tmp_path / "base", tmp_path / "out" / "model.gguf", tmp_path / "adapter", dtype=dtype)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        got = loaded(tokens).logits
    if tolerance is None:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    else:
        error = float((got - expected).abs().max() / expected.abs().max())
        assert 0 < error < tolerance, error  # lower precision changes something, but little
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "the quick brown fox, order AB-12345"
    assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert gguf_tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("adds_bos", [True, False])
def test_gguf_says_add_bos_when_the_tokenizer_adds_it_in_its_post_processor(tmp_path, adds_bos):
    """Llama-3-style tokenizers add BOS in tokenizer.json's post-processor, with no add_bos_token in their config."""
    import gguf
    from tokenizers import processors

    tok = make_bpe_tokenizer()
    tok.bos_token = "<|im_start|>"
    if adds_bos:
        bos = tok.convert_tokens_to_ids("<|im_start|>")
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                            special_tokens=[("<|im_start|>", bos)])
    base_and_adapter(tmp_path, lambda: make_llama_for(tok), tok)
    path = export_gguf(tmp_path / "base", tmp_path / "model.gguf", dtype="f32", verify=False)
    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.add_bos_token"]
    assert bool(field.parts[field.data[0]][0]) is adds_bos


def test_tied_head_is_left_out_of_the_gguf(tmp_path):
    import gguf

    tok = make_bpe_tokenizer()
    tokens, expected = base_and_adapter(tmp_path, lambda: make_llama_for(tok, tie=True), tok)
    path = export_gguf(tmp_path / "base", tmp_path / "model.gguf", tmp_path / "adapter", dtype="f32")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    torch.testing.assert_close(loaded(tokens).logits, expected, atol=1e-4, rtol=0)


def test_adapter_gguf_holds_the_permuted_update(tmp_path):
    import gguf

    tok = make_bpe_tokenizer()
    base_and_adapter(tmp_path, lambda: make_llama_for(tok), tok, rslora=True)
    path = export_adapter_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    alpha = reader.get_field("adapter.lora.alpha").contents()
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    a, b = tensors["blk.1.attn_k.weight.lora_a"], tensors["blk.1.attn_k.weight.lora_b"]  # (r, in), (out, r)
    rank = a.shape[0]
    from lora.adapter_io import read_adapter

    cfg, _, saved = read_adapter(tmp_path / "adapter")
    key = "base_model.model.model.layers.1.self_attn.k_proj"
    delta = cfg.scale * saved[f"{key}.lora_B.weight"] @ saved[f"{key}.lora_A.weight"]
    np.testing.assert_allclose(alpha / rank * b @ a, permute_for_llama_cpp(delta, 2).numpy(), atol=1e-5)
    assert sum(n.endswith(".lora_a") for n in tensors) == 14  # every wrapped layer


def test_adapter_gguf_refuses_what_llama_cpp_cannot_hold(tmp_path):
    tok = make_bpe_tokenizer()
    base_and_adapter(tmp_path, lambda: make_llama_for(tok), tok, dora=True)
    with pytest.raises(ValueError, match="uses DoRA.*Merge it instead: lora export gguf --adapter"):
        export_adapter_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_gpt2_gguf_read_back_by_transformers_matches_the_merged_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_bpe_tokenizer()

    def make():
        torch.manual_seed(0)
        # n_positions=1024 as in GPT-2 itself: transformers' GGUF reader maps gpt2.context_length to n_ctx, not to
        # n_positions, so it always builds a 1024-row position table
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=1024,
                                          bos_token_id=0, eos_token_id=tok.eos_token_id)).eval()

    tokens, expected = base_and_adapter(tmp_path, make, tok)
    path = export_gguf(tmp_path / "base", tmp_path / "out" / "model.gguf", tmp_path / "adapter", dtype="f32")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, expected, atol=1e-4, rtol=0)
    # the adapter alone too (per family in test_gguf_families.py): Conv1D's LoRA A/B already have llama.cpp's layout
    import gguf

    adapter_path = export_adapter_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "a.gguf")
    names = {t.name for t in gguf.GGUFReader(str(adapter_path)).tensors}
    assert "blk.0.attn_qkv.weight.lora_a" in names and len(names) == 2 * 4 * 2  # 4 Conv1D per block, A and B


def test_gguf_refuses_other_architectures_and_bad_dtype(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             word_embed_proj_dim=16)).save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match="GGUF export supports llama, mistral, .*gpt2 models; .* is a 'opt' "
                                         "model. Export a merged folder instead \\(lora merge\\)"):
        export_gguf(tmp_path / "opt", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_gguf(tmp_path / "opt", tmp_path / "x.gguf", dtype="q4")
    with pytest.raises(ValueError, match="is a GGUF file"):
        export_gguf(tmp_path / "model.gguf", tmp_path / "x.gguf")


def test_modelfile_converts_a_chatml_template():
    template = ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
                "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}")
    text = ollama_modelfile("model.gguf", template, ["<|im_end|>"], 0.3, adapter_file="model.adapter.gguf")
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf" and lines[1] == "ADAPTER ./model.adapter.gguf"
    assert "{{ range .Messages }}" in text.replace("{{-", "{{") and '<|im_start|>{{ .Role }}' in text
    assert 'SYSTEM """You are helpful"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER temperature 0.3" in lines
    plain = ollama_modelfile("m.gguf", "{{ bos_token }}{{ messages }}", [], 0.7)
    assert "TEMPLATE" not in plain  # unknown template family: Ollama falls back to the GGUF's own


def test_cli_merge_and_export_gguf_with_modelfile(tmp_path, capsys):
    tok = make_bpe_tokenizer()
    tokens, expected = base_and_adapter(tmp_path, lambda: make_llama_for(tok), tok)
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(tokens).logits, expected,
                               atol=1e-5, rtol=0)
    out = tmp_path / "ollama" / "model.gguf"
    assert main(["export", "gguf", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out), "--dtype", "f32", "--adapter-only", "--temperature", "0.2"]) == 0
    assert out.is_file() and (tmp_path / "ollama" / "model.adapter.gguf").is_file()
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert "ADAPTER ./model.adapter.gguf" in modelfile and "PARAMETER temperature 0.2" in modelfile
    assert "ollama create" in capsys.readouterr().out
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "m2")]) == 2


def test_smollm2_adapter_through_gguf_answers_held_out_prompts_like_the_merged_model(tmp_path):
    """The real default model: a briefly trained adapter, exported to GGUF, read back by transformers."""
    from lora.data import load_dataset, prompts_and_answers
    from lora.generate import exact_match
    from lora.train import TrainConfig, Trainer

    data = Path(__file__).resolve().parents[1] / "lora" / "recipes" / "data"
    model, tokenizer = lora.load_model("smollm2-135m")
    train, _ = load_dataset(data / "extract_train.jsonl", tokenizer, max_length=256)
    lora.inject(model, lora.LoraConfig(r=8, alpha=16))
    Trainer(model, TrainConfig(max_steps=3, batch_size=4, seq_len=256, output_dir=str(tmp_path / "run")),
            train[:96]).train()
    lora.save_adapter(model, tmp_path / "adapter")
    prompts, answers = prompts_and_answers(data / "extract_eval.jsonl")
    prompts, answers = prompts[:12], answers[:12]
    _, expected = exact_match(lora.merge_and_unload(model), tokenizer, prompts, answers)

    path = export_gguf("smollm2-135m", tmp_path / "gguf" / "model.gguf", tmp_path / "adapter", dtype="f32")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _, got = exact_match(loaded, gguf_tokenizer, prompts, answers)
    assert got == expected
    assert sum(g.strip() == a for g, a in zip(got, answers)) >= 3  # the base model gets 0 of these right
