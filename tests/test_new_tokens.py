"""New tokens: lora.add_tokens grows the vocabulary, trainable_tokens trains only the new rows (PEFT's
trainable_token_indices), LoRA on nn.Embedding (PEFT's lora_embedding_A/B); each against PEFT, and through save,
load, merge, `lora merge` and GGUF export with the vocabulary and the tokenizer kept consistent."""

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora
import lora.export
from conftest import make_bpe_tokenizer, randomize_adapters
from families import make_family
from lora.cli import main
from lora.tokens import added_tokens

NEW = ["<|tag|>", "<|im_start|>", "<|x|>"]  # <|im_start|> is already in the tokenizer (id 1)
TEXT = "the <|tag|> quick <|x|> fox <|im_start|>"


def grown(family: str, tokens=NEW):
    """A tiny model of ``family`` and its tokenizer, with ``tokens`` added; (model, tokenizer, ids, new ids)."""
    tokenizer = make_bpe_tokenizer()
    model = make_family(family, tokenizer)
    before = len(tokenizer)
    ids = lora.add_tokens(model, tokenizer, tokens)
    return model, tokenizer, ids, [i for i in ids if i >= before]


def logits(model, tokenizer, text=TEXT):
    with torch.no_grad():
        return model(torch.tensor([tokenizer(text)["input_ids"]])).logits


def train_rows(model, seed=0):
    """Change every trainable token row (and LoRA weight) as training would."""
    g = torch.Generator().manual_seed(seed)
    randomize_adapters(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name or "lora_embedding" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def peft_loads(folder, family, tokens=NEW):
    base, _, _, _ = grown(family, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, folder).eval()


@pytest.mark.parametrize("family", ["llama3", "qwen2"])  # an untied head, a tied one
def test_add_tokens_grows_embedding_and_head_with_mean_rows(family):
    tokenizer = make_bpe_tokenizer()
    model = make_family(family, tokenizer)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = model.get_input_embeddings().num_embeddings
    ids = lora.add_tokens(model, tokenizer, NEW)
    assert ids == [rows, 1, rows + 1] and len(tokenizer) == rows + 2
    assert tokenizer("a <|tag|> b")["input_ids"].count(rows) == 1  # one token, never split
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (head is embedding) == (family == "qwen2") and model.config.vocab_size == rows + 2
    for weight, name in ((embedding, "model.embed_tokens.weight"), (head, "lm_head.weight")):
        before = old.get(name, old["model.embed_tokens.weight"])
        assert torch.equal(weight[:rows], before)  # the existing rows are untouched
        assert torch.equal(weight[rows:], before.float().mean(0).expand(2, -1))
    assert added_tokens(model) == {"tokens": ["<|tag|>", "<|x|>"], "ids": [rows, rows + 1], "special": True,
                                   "base_vocab_size": rows, "vocab_size": rows + 2}
    lora.inject(model, lora.LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"already has adapters \['default'\].*add tokens first, then lora.inject"):
        lora.add_tokens(model, tokenizer, ["<|late|>"])
    with pytest.raises(ValueError, match="non-empty list of tokens"):
        lora.add_tokens(make_family(family, tokenizer), tokenizer, "<|tag|>")


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma3"])  # untied head; tied; tied, scaled embedding
def test_trainable_tokens_train_only_their_rows_and_match_peft_both_ways(family, tmp_path):
    model, tokenizer, ids, new = grown(family)
    base = logits(model, tokenizer)
    lora.inject(model, lora.LoraConfig(r=2, targets=["q_proj"], trainable_tokens=ids))
    assert torch.equal(logits(model, tokenizer), base)  # untrained rows: the model is unchanged, to the bit
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    rows = {n for n in trainable if "trainable_tokens_delta" in n}
    assert rows == ({"model.embed_tokens.trainable_tokens_delta.default", "lm_head.trainable_tokens_delta.default"}
                    if family == "llama3" else {"model.embed_tokens.trainable_tokens_delta.default"})
    assert all("lora_" in n for n in trainable - rows)
    train_rows(model)
    ours = logits(model, tokenizer)
    assert (ours - base).abs().max() > 1e-2
    lora.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    # PEFT's list form trains the input embedding (and a tied head with it); an untied head is named
    assert config["trainable_token_indices"] == (ids if family != "llama3" else
                                                 {"model.embed_tokens": ids, "lm_head": ids})
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (3, 64)

    theirs = peft_loads(tmp_path / "ours", family)
    torch.testing.assert_close(logits(theirs, tokenizer), ours, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "peft")
    back, _, _, _ = grown(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no fingerprint in PEFT's file
        lora.load_adapter(back, tmp_path / "peft")
    torch.testing.assert_close(logits(back, tokenizer), ours, atol=1e-5, rtol=1e-5)

    before = model.get_input_embeddings().weight.detach().clone()
    merged = lora.merge_and_unload(model)
    torch.testing.assert_close(logits(merged, tokenizer), ours, atol=1e-5, rtol=1e-5)
    after = merged.get_input_embeddings().weight
    others = [i for i in range(after.shape[0]) if i not in ids]
    assert torch.equal(after[others], before[others])  # only the trained rows changed


def test_only_the_named_modules_train_rows_with_a_mapping(tmp_path):
    model, tokenizer, ids, new = grown("llama3")
    lora.inject(model, lora.LoraConfig(r=2, targets=["q_proj"], trainable_tokens={"embed_tokens": new}))
    assert [n for n, p in model.named_parameters() if p.requires_grad and "tokens" in n] == [
        "model.embed_tokens.trainable_tokens_delta.default"]
    train_rows(model)
    lora.save_adapter(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["trainable_token_indices"] == new
    torch.testing.assert_close(logits(peft_loads(tmp_path / "ad", "llama3"), tokenizer), logits(model, tokenizer),
                               atol=1e-5, rtol=1e-5)


def test_an_adapter_for_a_grown_vocabulary_is_refused_on_the_original_base_with_what_to_do(tmp_path):
    model, tokenizer, ids, new = grown("llama3")
    lora.inject(model, lora.LoraConfig(r=2, targets=["q_proj"], trainable_tokens=new))
    lora.save_adapter(model, tmp_path / "ad")
    original = make_family("llama3", make_bpe_tokenizer())
    with pytest.raises(ValueError, match=r"trained with the tokens \['<\|tag\|>', '<\|x\|>'\] added to its base.*"
                                         r"322 vocabulary rows.*this model has 320.*lora.add_tokens\(model, "
                                         r"tokenizer, \['<\|tag\|>', '<\|x\|>'\]\)"):
        lora.load_adapter(original, tmp_path / "ad")
    assert not lora.inject.__globals__["adapters_of"](original)
    # PEFT's own file records no added tokens: its ids beyond the vocabulary say it
    peft_loads(tmp_path / "ad", "llama3").save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match=r"vocabulary of at least 322 rows, but this model's has 320.*"
                                         r"resize_token_embeddings\(322\)"):
        lora.load_adapter(original, tmp_path / "peft")


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_lora_merge_and_gguf_keep_the_grown_vocabulary_and_the_tokenizer(family, tmp_path):
    """The base folder has the original vocabulary; `lora merge` grows it as add_tokens did, writes the trained rows,
    vocab_size and a tokenizer that gives the new tokens their ids; GGUF of the base with the adapter is refused
    with that route, and the GGUF of the merged folder holds the tokens and computes the same logits."""
    tokenizer = make_bpe_tokenizer()
    make_family(family, tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model, tokenizer, ids, new = grown(family)
    lora.inject(model, lora.LoraConfig(r=2, targets=["q_proj", "v_proj"], trainable_tokens=ids))
    train_rows(model)
    lora.save_adapter(model, tmp_path / "ad")
    expected = logits(model, tokenizer)

    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.config.vocab_size == 322 and merged_tokenizer.convert_tokens_to_ids(NEW) == ids
    assert merged_tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    torch.testing.assert_close(logits(merged, merged_tokenizer), expected, atol=1e-5, rtol=1e-5)
    base_state = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    for key, tensor in lora.merge_state_dict(base_state, tmp_path / "ad").items():
        torch.testing.assert_close(tensor, merged.state_dict()[key], atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match=r"trained with the tokens .* added to its base.*lora merge --model .* "
                                         r"then export that folder \(lora export gguf --model merged"):
        lora.export.export_gguf(tmp_path / "base", tmp_path / "x.gguf", tmp_path / "ad", verify=False)
    with pytest.raises(ValueError, match=r"also adapts vocabulary rows and added tokens.*lora merge"):
        lora.export.export_base_and_adapter_gguf(tmp_path / "base", tmp_path / "ad", tmp_path / "x.gguf",
                                                 verify=False)
    assert not (tmp_path / "x.gguf").exists()
    path = lora.export.export_gguf(tmp_path / "merged", tmp_path / "model.gguf", dtype="f32")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    vocabulary = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
                  for i in reader.fields["tokenizer.ggml.tokens"].data]
    assert len(vocabulary) == 322 and [vocabulary[i] for i in new] == ["<|tag|>", "<|x|>"]
    read = lora.export.read_gguf_model(path, base=tmp_path / "merged")
    torch.testing.assert_close(logits(read, merged_tokenizer), expected, atol=1e-3, rtol=1e-3)


def test_lora_on_an_embedding_matches_peft_both_ways_and_merges(tmp_path):
    model = make_family("llama3", make_bpe_tokenizer())
    tokenizer = make_bpe_tokenizer()
    base = logits(model, tokenizer)
    paths = lora.inject(model, lora.LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"]))
    assert "model.embed_tokens" in paths
    assert torch.equal(logits(model, tokenizer), base)  # A = 0, as PEFT starts it
    train_rows(model)
    ours = logits(model, tokenizer)
    assert (ours - base).abs().max() > 1e-2
    lora.save_adapter(model, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 320)
    assert saved["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_family("llama3", make_bpe_tokenizer()), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, tokenizer), ours, atol=1e-5, rtol=1e-5)
    # PEFT's own adapter, targets named as a user would: PEFT then saves the whole embedding matrix beside it
    theirs = peft.get_peft_model(make_family("llama3", make_bpe_tokenizer()),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    train_rows(theirs, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "peft" /
                                                                                "adapter_model.safetensors")
    back = make_family("llama3", make_bpe_tokenizer())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora.load_adapter(back, tmp_path / "peft")
    assert not [w for w in caught if "replaces" in str(w.message)]  # the base's own matrix: nothing to replace
    torch.testing.assert_close(logits(back, tokenizer), logits(theirs.eval(), tokenizer), atol=1e-5, rtol=1e-5)
    state = make_family("llama3", make_bpe_tokenizer()).state_dict()
    merged_state = lora.merge_state_dict(state, tmp_path / "ours")
    plain = lora.merge_and_unload(model)
    torch.testing.assert_close(logits(plain, tokenizer), ours, atol=1e-5, rtol=1e-5)
    for key, tensor in plain.state_dict().items():
        torch.testing.assert_close(merged_state[key], tensor, atol=1e-6, rtol=0)


def test_lora_on_a_tied_embedding_is_refused_and_rows_go_through_trainable_tokens():
    model = make_family("qwen2", make_bpe_tokenizer())
    with pytest.raises(ValueError, match=r"'model.embed_tokens' \(a LoRA target\) shares its weight with 'lm_head'"):
        lora.inject(model, lora.LoraConfig(targets=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"both train rows in full \(trainable_tokens\) and be adapted otherwise"):
        lora.inject(make_family("llama3", make_bpe_tokenizer()),
                    lora.LoraConfig(targets=["embed_tokens"], trainable_tokens=[3]))
    model, tokenizer, ids, new = grown("llama3")
    with pytest.raises(ValueError, match=r"token id 400, but this matrix has 322 rows; add the tokens first"):
        lora.inject(model, lora.LoraConfig(r=2, trainable_tokens=[400]))
    lora.inject(model, lora.LoraConfig(r=2, trainable_tokens=new), adapter="a")
    with pytest.raises(ValueError, match="vocabulary rows .*batches of their own"):
        with lora.row_adapters(model, ["a"]):
            pass
    with pytest.raises(ValueError, match=r"trainable_tokens must be a non-empty list of token ids"):
        lora.LoraConfig(trainable_tokens=["<|tag|>"])


def test_lora_on_a_scaled_embedding_scales_its_update_as_peft_does(tmp_path):
    """Gemma 3 multiplies its embedding's output by sqrt(hidden); the update is scaled with it (head untied here)."""
    import transformers

    from families import FAMILIES

    config_cls, model_cls, kwargs = FAMILIES["gemma3"]
    tokenizer = make_bpe_tokenizer()

    def untied():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**kwargs, vocab_size=len(tokenizer), tie_word_embeddings=False)
        return getattr(transformers, model_cls)(config).float().eval()

    model = untied()
    assert float(model.get_input_embeddings().embed_scale) == 8.0
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, targets=["embed_tokens"]))
    train_rows(model)
    lora.save_adapter(model, tmp_path / "ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(untied(), tmp_path / "ad").eval()
    torch.testing.assert_close(logits(theirs, tokenizer), logits(model, tokenizer), atol=1e-5, rtol=1e-5)
    adapted = logits(model, tokenizer)
    torch.testing.assert_close(logits(lora.merge_and_unload(model), tokenizer), adapted, atol=1e-5, rtol=1e-5)
