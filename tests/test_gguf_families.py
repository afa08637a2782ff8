"""GGUF export per model family: merged files read back, adapter-only files rebuilt, refusals.

transformers' GGUF loader leaves some settings at its config classes' defaults (Gemma's query scale and
soft-capping, Qwen 3's head size, GPT-2's position count, Gemma's per-layer sliding pattern, any rope scaling);
:func:`lora.export.read_gguf_model` takes exactly those from the keys and tensors llama.cpp runs on, so a wrong key
fails here too. OLMo 2 and Granite, which that loader does not read, are read by our own reader
(:func:`lora.export.read_gguf_with_config`), itself checked against transformers' loader on the families both read.
The exports skip their own check (``verify=False``) unless a test is about the check.
"""

import json
import re
import shutil

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Regex, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import lora
import lora.adapter_io
from lora.adapter_io import read_adapter
import lora.export
from lora.export import (export_adapter_gguf, export_base_and_adapter_gguf, export_gguf, llama_cpp_pre_tokenizer,
                         read_gguf_model, read_gguf_with_config, verify_export)
from conftest import make_bpe_tokenizer
from families import FAMILIES, make_family, save_base_and_adapter

EXPORTED = ["llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "olmo2", "granite"]
# transformers' GGUF loader has no reader for these: our own reads them back
OWN_READER = ["olmo2", "granite"]
# Bloom: llama.cpp and transformers read it, but it is not written here (llama.cpp's converter reorders its fused
# per-head QKV and renames its un-prefixed norms).
REFUSED = ["bloom"]
TOKENS = torch.tensor([[5, 17, 42, 9, 30, 11, 100, 200, 7, 64, 250, 3]])
PERMUTED = {"llama3", "mistral", "granite"}  # llama.cpp's "llama" and "granite" architectures interleave rotary pairs


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer()


def build(root, model, tokenizer, **lora_config):
    """Save ``model`` (+ tokenizer) as a base folder and a random-looking all-linear adapter for it; return the
    merged model's logits on TOKENS."""
    model = save_base_and_adapter(root, model, tokenizer, **lora_config)
    with torch.no_grad():
        return lora.merge_and_unload(model)(TOKENS).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """family -> (folder with base/ and adapter/, merged logits, merged GGUF path), built once per family."""
    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            expected = build(root, make_family(family, tokenizer), tokenizer)
            cache[family] = root, expected, export_gguf(root / "base", root / "model.gguf", root / "adapter",
                                                        dtype="f32", verify=False)
        return cache[family]
    return get


@pytest.mark.parametrize("family", EXPORTED)
def test_family_gguf_read_back_matches_the_merged_model(exported, family):
    root, expected, path = exported(family)
    with torch.no_grad():
        got = read_gguf_model(path, base=root / "base")(TOKENS).logits
    error = float((got - expected).abs().max())
    print(f"{family}: max |d| = {error:.3g}")
    assert error <= 1e-3


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_own_reader_reads_what_transformers_gguf_loader_reads(tmp_path, tokenizer, family, dtype):
    """Our reader (the one OLMo 2 and Granite are checked with) against an independent one, on the families both
    read: the same weights, names and Q/K order (Llama's permuted rows, Llama 3's rope_freqs, a tied head, Mistral's
    head size, Qwen 2's biases, Qwen 3's q/k norms, Phi-3's fused projections), dequantized the same way."""
    build(tmp_path, make_family(family, tokenizer), tokenizer)
    path = export_gguf(tmp_path / "base", tmp_path / "model.gguf", tmp_path / "adapter", dtype=dtype, verify=False)
    ours = read_gguf_with_config(path, AutoConfig.from_pretrained(tmp_path / "base"))
    theirs = read_gguf_model(path)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(ours(TOKENS).logits, theirs(TOKENS).logits)


def test_own_reader_takes_llama_cpp_settings_from_the_file_not_the_base(exported, tmp_path):
    """A setting the writer left out reads back as llama.cpp's default, and a file that does not fit the base's
    model is refused, instead of being filled in from the base's config."""
    root, expected, path = exported("granite")
    config = AutoConfig.from_pretrained(root / "base")
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "granite")  # the same tensors, without the multipliers
    for field in reader.fields.values():
        if field.name.startswith("granite.") and not field.name.endswith("_scale") \
                and field.name != "granite.attention.scale":
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    bare = read_gguf_with_config(tmp_path / "bare.gguf", config)
    assert (bare.config.logits_scaling, bare.config.residual_multiplier, bare.config.embedding_multiplier) == (1, 1, 1)
    assert bare.config.attention_multiplier == pytest.approx(16 ** -0.5)  # llama.cpp's 1/sqrt(head_dim)
    with torch.no_grad():
        assert float((bare(TOKENS).logits - expected).abs().max()) > 0.1
    with pytest.raises(ValueError, match="llama.cpp 'granite' file; a 'olmo2' model"):
        read_gguf_with_config(path, AutoConfig.from_pretrained(exported("olmo2")[0] / "base"))
    gemma_root, _, gemma = exported("gemma2")
    with pytest.raises(ValueError, match="read it with read_gguf_model"):
        read_gguf_with_config(gemma, AutoConfig.from_pretrained(gemma_root / "base"))


def test_granite_multipliers_are_written_under_llama_cpp_keys(exported):
    _, _, path = exported("granite")
    fields = gguf.GGUFReader(str(path)).fields
    keys = {gguf.Keys.LLM.LOGIT_SCALE: 4.0, gguf.Keys.LLM.RESIDUAL_SCALE: 0.5, gguf.Keys.LLM.EMBEDDING_SCALE: 2.0,
            gguf.Keys.Attention.SCALE: 0.25}  # tests/families.py's Granite
    assert {key: fields[key.format(arch="granite")].contents() for key in keys} == keys


def test_llama3_rope_scaling_is_written_as_llama_cpp_rope_freqs(exported):
    """transformers' GGUF loader ignores rope scaling: read plainly, the file gives unscaled-rope logits."""
    _, expected, path = exported("llama3")
    factors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}["rope_freqs.weight"]
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)  # high .. low freq
    plain = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        assert float((plain(TOKENS).logits - expected).abs().max()) > 1e-2


def test_gemma3_linear_rope_scaling_and_local_rope_base(tmp_path, tokenizer):
    """Gemma 3 4B and up: linear rope scaling on full-attention layers, another rope base on sliding ones."""
    config_cls, model_cls, kwargs = FAMILIES["gemma3"]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs, vocab_size=len(tokenizer), layer_types=[
        "sliding_attention", "full_attention"], rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    expected = build(tmp_path, getattr(transformers, model_cls)(config).eval(), tokenizer)
    path = export_gguf(tmp_path / "base", tmp_path / "model.gguf", tmp_path / "adapter", dtype="f32", verify=False)
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["gemma3.rope.scaling.type"].contents() == "linear"
    assert fields["gemma3.attention.sliding_window_pattern"].contents() == [True, False]
    with torch.no_grad():
        assert float((read_gguf_model(path)(TOKENS).logits - expected).abs().max()) <= 1e-3


def llama_cpp_delta(path, n_heads):
    """gguf name -> delta W as llama.cpp applies the adapter file (alpha / rank per tensor, 1 when alpha is 0),
    with Q/K rows put back in Hugging Face's order."""
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.type").contents() == "adapter"
    alpha = reader.get_field("adapter.lora.alpha").contents()
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    deltas = {}
    for name in (n for n in tensors if n.endswith(".lora_a")):
        a, b = tensors[name], tensors[name[:-1] + "b"]  # (r, in), (out, r)
        delta = (alpha / b.shape[1] if alpha else 1.0) * b @ a  # llama.cpp's rank: lora_b's ne[0]
        heads = n_heads.get(name.split(".")[2])
        if heads:  # llama.cpp's interleaved pairs back to Hugging Face's halves (transformers' reader does this)
            delta = delta.reshape(heads, delta.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(delta.shape)
        deltas[name[: -len(".lora_a")]] = delta
    return deltas


def adapter_deltas(adapter_dir, arch, layers):
    """gguf name -> the adapter's own delta W (its scale times B A), by gguf's name table."""
    cfg, _, tensors = read_adapter(adapter_dir)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), layers)
    out = {}
    for key in (k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[len("base_model.model."): -len(".lora_A.weight")]
        B = tensors[key[: -len("A.weight")] + "B.weight"]
        out[names.get_name(module) + ".weight"] = cfg.scale * B @ tensors[key]
    return out


@pytest.mark.parametrize("family", EXPORTED)
def test_family_adapter_gguf_rebuilds_the_adapter_delta(exported, family):
    root, _, _ = exported(family)
    path = export_adapter_gguf(root / "base", root / "adapter", root / "adapter.gguf")
    config = AutoConfig.from_pretrained(root / "base")
    arch = gguf.GGUFReader(str(path)).get_field("general.architecture").contents()
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads} \
        if family in PERMUTED else {}
    got, want = llama_cpp_delta(path, heads), adapter_deltas(root / "adapter", arch, config.num_hidden_layers)
    assert sorted(got) == sorted(want) and len(got) == len(read_adapter(root / "adapter")[2]) // 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def doubled(root):
    """``root/adapter`` copied as ``root/adapter_x2`` with its alpha doubled (the classic wrong merge)."""
    if not (root / "adapter_x2").exists():
        shutil.copytree(root / "adapter", root / "adapter_x2")
        config = json.loads((root / "adapter_x2" / "adapter_config.json").read_text())
        config["lora_alpha"] *= 2
        (root / "adapter_x2" / "adapter_config.json").write_text(json.dumps(config))
    return root / "adapter_x2"


def held_figure(line: str) -> tuple[float, float]:
    """(the figure held to the tolerance, the tolerance) from the check's printed line or its error."""
    rounded = re.search(r", (\S+) against it rounded as stored", line)
    held = rounded[1] if rounded else re.search(r"max \|dlogit\| (\S+)", line)[1]
    return float(held), float(re.search(r"tolerance (\S+?)[ ,]", line)[1])


@pytest.mark.parametrize("family", OWN_READER)
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_olmo2_and_granite_exports_are_checked_by_our_reader(exported, tmp_path, capsys, family, dtype):
    """Merged and adapter-only, each read back by our reader and compared with the adapter model."""
    root = exported(family)[0]
    export_gguf(root / "base", tmp_path / "merged.gguf", root / "adapter", dtype=dtype)
    export_base_and_adapter_gguf(root / "base", root / "adapter", tmp_path / "split.gguf", dtype=dtype)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checked ")]
    assert [line.split(":")[0] for line in lines] == [
        f"checked {tmp_path / 'merged.gguf'}", f"checked {tmp_path / 'split.gguf'}",
        f"checked {tmp_path / 'split.gguf'} + split.adapter.gguf"]
    assert [" against the adapter model" in line for line in lines] == [True, False, True]
    for line in lines:
        held, tolerance = held_figure(line)
        assert held < tolerance / 10, line


@pytest.mark.parametrize("family, broken", [
    ("olmo2", "scale doubled"), ("granite", "scale doubled"), ("granite", "no Q/K permutation"),
    ("granite", "no multipliers"), ("olmo2", "adapter GGUF scale doubled"), ("granite", "adapter GGUF scale doubled"),
    ("granite", "adapter GGUF without Q/K permutation")])
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_wrong_olmo2_and_granite_exports_are_refused(exported, tmp_path, monkeypatch, family, broken, dtype):
    root = exported(family)[0]
    base, adapter = root / "base", root / "adapter"
    base_gguf = export_gguf(base, tmp_path / "base.gguf", dtype=dtype, verify=False)  # right: no adapter in it
    if "scale doubled" in broken:
        merged_tensors = lora.export.merged_tensors  # the writer merges the doubled adapter, whatever it is given
        monkeypatch.setattr(lora.export.gguf_writer, "merged_tensors",
                            lambda folder, _, check_base=True, **kw: merged_tensors(folder, doubled(root), check_base))
    elif "permutation" in broken:
        monkeypatch.setattr(lora.export.gguf_writer, "permute_for_llama_cpp", lambda weight, n_head: weight)
    else:
        monkeypatch.setattr(lora.export.gguf_writer, "GRANITE_SCALES", {})
    with pytest.raises(ValueError, match="export check failed") as caught:
        if broken.startswith("adapter GGUF"):
            made_from = doubled(root) if "doubled" in broken else adapter
            adapter_gguf = export_adapter_gguf(base, made_from, tmp_path / "adapter.gguf")
            verify_export(base, adapter, base_gguf, adapter_gguf=adapter_gguf)
        else:
            export_gguf(base, tmp_path / "model.gguf", adapter, dtype=dtype)
    held, tolerance = held_figure(str(caught.value))
    print(f"{family} {dtype} {broken}: {held:.3g} > {tolerance:.3g}")
    assert held > 10 * tolerance
    assert not (tmp_path / "model.gguf").exists()


def test_rslora_adapter_gguf_is_exact_under_llama_cpp_scaling(tmp_path, tokenizer):
    """rsLoRA's alpha / sqrt(r) is no alpha / r for any alpha llama.cpp could be given: it is folded into B."""
    build(tmp_path, make_family("llama3", tokenizer), tokenizer, rslora=True)
    path = export_adapter_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "adapter.gguf")
    assert gguf.GGUFReader(str(path)).get_field("adapter.lora.alpha").contents() == 4.0  # the rank: factor 1
    got = llama_cpp_delta(path, {"attn_q": 4, "attn_k": 2})
    want = adapter_deltas(tmp_path / "adapter", "llama", 2)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_adapter_gguf_with_per_module_ranks_is_exact(tmp_path, tokenizer, monkeypatch):
    """Modules of different ranks (PEFT's rank_pattern): one file-wide alpha cannot be alpha / rank for all, so the
    file says alpha 0, which llama.cpp reads as a factor of 1, and every B carries its module's own scale.

    Our adapter reader refuses A/B of another rank than the config's r, so the test lets such a file through.
    """
    from safetensors.torch import load_file, save_file

    build(tmp_path, make_family("qwen2", tokenizer), tokenizer)
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    for key in [k for k in tensors if ".self_attn." in k]:  # attention at rank 2, the MLP keeps rank 4
        tensors[key] = (tensors[key][:2] if key.endswith("lora_A.weight") else tensors[key][:, :2]).contiguous()
    save_file(tensors, str(file))
    monkeypatch.setattr(lora.adapter_io, "_check_tensors", lambda *args: None)
    path = export_adapter_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "adapter.gguf",
                               check_base=False)
    assert gguf.GGUFReader(str(path)).get_field("adapter.lora.alpha").contents() == 0.0
    got = llama_cpp_delta(path, {})
    cfg = read_adapter(tmp_path / "adapter")[0]
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        module = key[len("base_model.model."): -len(".lora_A.weight")]
        name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2).get_name(module) + ".weight"
        want = cfg.scale * tensors[key[:-len("A.weight")] + "B.weight"] @ tensors[key]  # the merge's own scale
        torch.testing.assert_close(got[name], want, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", REFUSED)
def test_families_not_written_are_refused_with_the_merged_route(tmp_path, tokenizer, family):
    build(tmp_path, make_family(family, tokenizer), tokenizer)
    for export in (lambda: export_gguf(tmp_path / "base", tmp_path / "x.gguf", tmp_path / "adapter", verify=False),
                   lambda: export_adapter_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "x.gguf")):
        with pytest.raises(ValueError, match=r"is a '\w+' model\. Export a merged folder instead \(lora merge\) "
                                             r"and convert it with llama.cpp's convert_hf_to_gguf.py"):
            export()
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("family, change, reason", [
    ("gemma2", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar=256, where llama.cpp scales queries by"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attention soft-capping"),
    ("qwen2", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, "'llama3' rope"),
    ("llama3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                    "original_max_position_embeddings": 64}}, "'yarn' rope"),
    ("granite", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     "'llama3' rope"),
    ("granite", {"logits_scaling": 0.0}, r"logits_scaling=0 \(llama.cpp reads 0 as not set\)"),
    ("olmo2", {"attention_bias": True}, "attention biases"),  # llama.cpp refuses to load the file
])
def test_settings_llama_cpp_would_run_differently_are_refused(tmp_path, tokenizer, family, change, reason):
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**(kwargs | change), vocab_size=len(tokenizer))
    getattr(transformers, model_cls)(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=f"{reason}.*lora merge"):
        export_gguf(tmp_path / "base", tmp_path / "x.gguf", verify=False)
    assert not (tmp_path / "x.gguf").exists()


def with_pre_tokenizer(pre_tokenizer, ignore_merges=False):
    """The test tokenizer with another pre-tokenizer (the vocabulary and merges stay)."""
    tokenizer = make_bpe_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.backend_tokenizer.model.ignore_merges = ignore_merges
    return tokenizer


def split_then_bytes(regex):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# the splits as the models' own tokenizer.json files have them (transformers keeps copies for its GGUF reader)
LLAMA3_SPLIT = transformers.integrations.gguf.gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]
QWEN2_SPLIT = transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX


@pytest.mark.parametrize("make, pre, transformers_reads_it", [
    (make_bpe_tokenizer, "gpt-2", True),  # GPT-2's ByteLevel regex: every test family's tokenizer
    (lambda: with_pre_tokenizer(split_then_bytes(LLAMA3_SPLIT), ignore_merges=True), "llama-bpe", True),
    (lambda: with_pre_tokenizer(split_then_bytes(LLAMA3_SPLIT)), "smaug-bpe", True),  # same split, merges first
    (lambda: with_pre_tokenizer(split_then_bytes(QWEN2_SPLIT)), "qwen2", True),
    # SmolLM / StarCoder: digits one by one, then GPT-2's regex; transformers reads "smollm" as plain GPT-2
    (lambda: with_pre_tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])),
     "smollm", False),
])
def test_pre_tokenizer_type_is_derived_from_the_tokenizer(tmp_path, make, pre, transformers_reads_it):
    tokenizer = make()
    assert llama_cpp_pre_tokenizer(tokenizer) == pre
    make_family("llama3", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    path = export_gguf(tmp_path, tmp_path / "model.gguf", dtype="f32", verify=False)
    assert gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.pre").contents() == pre
    if transformers_reads_it:
        text = "Order AB-12345 shipped 2024-01-02 from Lisbon, it's HERE'S the\n\n  quick brown fox!"
        read = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
        assert read(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_unknown_pre_tokenizer_warns_and_writes_default(tmp_path):
    tokenizer = with_pre_tokenizer(pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                            pre_tokenizers.ByteLevel(use_regex=False)]))
    assert llama_cpp_pre_tokenizer(tokenizer) is None
    make_family("qwen3", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="none of llama.cpp's pre-tokenizer types.*convert_hf_to_gguf.py"):
        path = export_gguf(tmp_path, tmp_path / "model.gguf", verify=False)
    assert gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.pre").contents() == "default"


def test_recorded_pre_tokenizer_of_a_converted_base_is_kept(tmp_path, tokenizer):
    make_family("llama3", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "lora_source.json").write_text(json.dumps({"gguf": "x.gguf", "tokenizer.ggml.pre": "smollm"}))
    path = export_gguf(tmp_path, tmp_path / "model.gguf", verify=False)
    assert gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.pre").contents() == "smollm"


def make_sentencepiece_style_tokenizer():
    """BPE with byte fallback and "▁" for spaces (Llama 2 / Mistral / Gemma / Phi-3 style), trained in memory."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()  # pieces never span a "▁", as in SentencePiece
    trained.train_from_iterator(["the quick brown fox jumps over the lazy dog", "order AB-12345 from Lisbon"] * 20,
                                trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    # ids as SentencePiece's: unknown, BOS, EOS, the 256 byte tokens, then the learned pieces
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab, [tuple(m) for m in learned["merges"]], unk_token="<unk>",
                                   byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("family", ["llama3", "gemma2"])
def test_sentencepiece_style_tokenizer_is_written_as_llama_cpp_llama_model(tmp_path, family):
    tokenizer = make_sentencepiece_style_tokenizer()
    make_family(family, tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    path = export_gguf(tmp_path, tmp_path / "model.gguf", verify=False)
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and fields["tokenizer.ggml.add_space_prefix"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    scores, tokens = fields["tokenizer.ggml.scores"].contents(), fields["tokenizer.ggml.tokens"].contents()
    assert scores[tokens.index("▁the")] > scores[tokens.index("▁Lisbon")]  # merged earlier: preferred by llama.cpp
    read = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = "the lazy fox ordered 12345 from Lisbon: é 東京"  # é and 東 are in no token: bytes
    assert read(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert "<0xC3>" in tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def test_other_tokenizer_kinds_are_refused(tmp_path):
    from conftest import make_char_tokenizer

    tokenizer = make_char_tokenizer()  # word-level, one token per character
    make_family("qwen3", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="WordLevel tokenizer that is neither byte-level BPE nor BPE with byte "
                                         "fallback.*lora merge"):
        export_gguf(tmp_path, tmp_path / "model.gguf", verify=False)
