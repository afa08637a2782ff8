"""llama.cpp itself as the reader of our GGUF files: the same logits as transformers, the same token ids.

llama.cpp comes from the optional extra ``pip install -e '.[llamacpp]'`` (llama-cpp-python, a source package that
builds llama.cpp with the local C/C++ toolchain, about 8 minutes on 2 cores; CI builds it). Without it these tests
skip and say so.
"""

import numpy as np
import pytest
import torch
import transformers

from lora.export import export_adapter_gguf, export_gguf
from lora.export.gguf_arch import INTERLEAVED_ROPE
from conftest import make_bpe_tokenizer
from families import FAMILIES, make_family, save_base_and_adapter
from test_gguf_families import (EXPORTED, LLAMA3_SPLIT, QWEN2_SPLIT, make_sentencepiece_style_tokenizer,
                                split_then_bytes, with_pre_tokenizer)

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install -e '.[llamacpp]' "
                                                    "(builds llama-cpp-python from source)")
from tokenizers import pre_tokenizers  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog, order AB-12345 from Lisbon"
F32 = 0  # ggml's type id for float32: the KV cache in f32, so only llama.cpp's own kernels differ from torch
# ggml computes GELU through an fp16 table (Gemma, GPT-2): ~2e-3 on logits of magnitude ~10; everything else ~1e-5
TOLERANCE = 5e-3


def run_llama_cpp(path, ids, lora_path=None) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (float32 KV cache, one thread per core here)."""
    llm = llama_cpp.Llama(str(path), lora_path=str(lora_path) if lora_path else None, n_ctx=64, logits_all=True,
                          type_k=F32, type_v=F32, n_threads=2, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """family -> (folder with base/ and adapter/, the adapter model's logits on TEXT, TEXT's ids)."""
    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            model = save_base_and_adapter(root, make_family(family, tokenizer), tokenizer)
            ids = tokenizer(TEXT)["input_ids"]
            with torch.no_grad():
                cache[family] = root, model(torch.tensor([ids])).logits[0].numpy(), ids
        return cache[family]
    return get


@pytest.mark.parametrize("family", EXPORTED)
def test_llama_cpp_runs_the_merged_gguf_with_the_adapter_models_logits(trained, family):
    root, expected, ids = trained(family)
    path = export_gguf(root / "base", root / "merged.gguf", root / "adapter", dtype="f32")
    error = float(np.abs(run_llama_cpp(path, ids) - expected).max())
    print(f"{family}: llama.cpp merged max |d| = {error:.2g}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("family", EXPORTED)
def test_llama_cpp_applies_the_adapter_gguf_to_the_base_gguf(trained, family):
    root, expected, ids = trained(family)
    base = export_gguf(root / "base", root / "base.gguf", dtype="f32")
    adapter = export_adapter_gguf(root / "base", root / "adapter", root / "adapter.gguf")
    with_adapter = run_llama_cpp(base, ids, lora_path=adapter)
    error = float(np.abs(with_adapter - expected).max())
    print(f"{family}: llama.cpp base + adapter max |d| = {error:.2g}")
    assert error <= TOLERANCE
    assert float(np.abs(run_llama_cpp(base, ids) - expected).max()) > 100 * TOLERANCE  # the adapter is what matched


@pytest.mark.parametrize("family, change", [
    ("olmo2", {"tie_word_embeddings": True}),  # llama.cpp's OLMo 2 requires output.weight: written as a copy
    ("granite", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
])
def test_llama_cpp_runs_olmo2_and_granite_variants(tmp_path, tokenizer, family, change):
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**(kwargs | change), vocab_size=len(tokenizer),
                                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # biases start at zero, where a missing one would go unseen
                param.normal_(0, 0.5)
    model = save_base_and_adapter(tmp_path, model, tokenizer)
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    merged = export_gguf(tmp_path / "base", tmp_path / "merged.gguf", tmp_path / "adapter", dtype="f32")
    assert float(np.abs(run_llama_cpp(merged, ids) - expected).max()) <= TOLERANCE
    base = export_gguf(tmp_path / "base", tmp_path / "base.gguf", dtype="f32")
    adapter = export_adapter_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "adapter.gguf")
    assert float(np.abs(run_llama_cpp(base, ids, lora_path=adapter) - expected).max()) <= TOLERANCE


@pytest.mark.parametrize("family", EXPORTED)
def test_llama_cpp_rotates_as_the_exporter_assumes(trained, family, tmp_path):
    """The exporter permutes Q/K rows (and our reader unpermutes them) for the architectures in INTERLEAVED_ROPE:
    llama.cpp must use its "normal" (interleaved) rope for exactly those, and NEOX (halves) for the others."""
    root, _, _ = trained(family)
    path = export_gguf(root / "base", tmp_path / "model.gguf", dtype="f32", verify=False)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    arch = llm.metadata["general.architecture"]
    rope = llama_cpp.llama_model_rope_type(llm.model)
    if family == "gpt2":  # learned positions, no rotary
        assert rope == llama_cpp.LLAMA_ROPE_TYPE_NONE
    else:
        assert rope == (llama_cpp.LLAMA_ROPE_TYPE_NORM if arch in INTERLEAVED_ROPE else llama_cpp.LLAMA_ROPE_TYPE_NEOX)


def granite_tokenizer():
    """Granite 3's kind: digits one by one, then GPT-2's byte-level split, and no BOS added (its BOS is its EOS)."""
    tokenizer = with_pre_tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                            pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    tokenizer.bos_token = tokenizer.eos_token
    return tokenizer


def olmo2_tokenizer():
    """OLMo 2's kind: cl100k's split (Llama 3's regex), with a BOS its post-processor adds."""
    from tokenizers import processors

    tokenizer = with_pre_tokenizer(split_then_bytes(LLAMA3_SPLIT))
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.convert_tokens_to_ids("<|endoftext|>"))])
    return tokenizer


@pytest.mark.parametrize("family, make, adds_bos", [("granite", granite_tokenizer, False),
                                                     ("olmo2", olmo2_tokenizer, True)])
def test_llama_cpp_tokenizes_olmo2_and_granite_files_like_hugging_face(tmp_path, family, make, adds_bos):
    """Their own kinds of tokenizer, BOS included (llama.cpp adds one exactly when the Hugging Face tokenizer does)."""
    tokenizer = make()
    make_family(family, tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    path = export_gguf(tmp_path, tmp_path / "model.gguf", dtype="f32", verify=False)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in (TEXT, "Order AB-12345 shipped 2024-01-02, it's HERE'S the\n\n  quick  brown fox!!", "é 東京 fox"):
        ids = tokenizer(text)["input_ids"]
        assert (ids[0] == tokenizer.bos_token_id) == adds_bos
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text


@pytest.mark.parametrize("make", [
    make_bpe_tokenizer,  # gpt-2
    lambda: with_pre_tokenizer(split_then_bytes(LLAMA3_SPLIT), ignore_merges=True),  # llama-bpe
    lambda: with_pre_tokenizer(split_then_bytes(LLAMA3_SPLIT)),  # smaug-bpe
    lambda: with_pre_tokenizer(split_then_bytes(QWEN2_SPLIT)),  # qwen2
    lambda: with_pre_tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])),  # smollm
    make_sentencepiece_style_tokenizer,  # llama.cpp's "llama" (SentencePiece) model
], ids=["gpt-2", "llama-bpe", "smaug-bpe", "qwen2", "smollm", "sentencepiece"])
def test_llama_cpp_tokenizes_like_the_hugging_face_tokenizer(tmp_path, make):
    tokenizer = make()
    make_family("llama3", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    path = export_gguf(tmp_path, tmp_path / "model.gguf", dtype="f32", verify=False)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in (TEXT, "Order AB-12345 shipped 2024-01-02, it's HERE'S the\n\n  quick  brown fox!!", "don't 123456789",
                 "  leading spaces and trailing  ", "é 東京 fox"):
        theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert theirs == tokenizer(text, add_special_tokens=False)["input_ids"], text
