"""The tokenizer in a GGUF file: byte-level BPE as llama.cpp's ``gpt2`` model with its pre-tokenizer found by how
the tokenizer splits a probe text, SentencePiece-style BPE as its ``llama`` model, and the chat template."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from ..data import special_prefix
from ..models import SOURCE_INFO
from .gguf_arch import MERGED_ROUTE

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA_CPP_PRE_TOKENIZERS = (("gpt-2", (_GPT2_SPLIT,), False), ("smollm", (r"\p{N}", _GPT2_SPLIT), False),
                             ("llama-bpe", (_LLAMA3_SPLIT,), True), ("smaug-bpe", (_LLAMA3_SPLIT,), False),
                             ("qwen2", (_QWEN2_SPLIT,), False))
_PRE_TOKENIZER_PROBE = ("Hello WORLD, it's I'LL  don't: 1234567 3.14159 $price (x+y)=z\n\n\tTabbed   three\r\n"
                        "  end ünïcödé 東京タワー 😀!! 'quoted' ...\n")


def _regex_split(text: str, patterns: tuple[str, ...]) -> list[str]:
    """``text`` cut as llama.cpp's BPE pre-tokenizer cuts it: each regex in turn splits every piece further into its
    matches and the gaps between them."""
    import regex  # transformers' own dependency; Python's re knows no \p{L}

    pieces = [text]
    for pattern in patterns:
        compiled, split = regex.compile(pattern), []
        for piece in pieces:
            end = 0
            for match in compiled.finditer(piece):
                split += [piece[end:match.start()]] * (match.start() > end) + [match.group()] * bool(match.group())
                end = match.end()
            split += [piece[end:]] * (end < len(piece))
        pieces = split
    return pieces


def llama_cpp_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` type for a Hugging Face byte-level BPE tokenizer, or None if no known type
    splits text as this tokenizer does.

    Decided by behaviour, as llama.cpp's converter does (it hashes the tokens of a probe text): the tokenizer's own
    pre-tokenizer cuts a probe text, and the first type whose regexes cut it identically wins.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = tokenizer.backend_tokenizer
    if backend.pre_tokenizer is None:
        return None
    spec = json.loads(backend.to_str())
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(_PRE_TOKENIZER_PROBE)]
    if "ByteLevel" in json.dumps(spec["pre_tokenizer"]):  # pieces come back in GPT-2's printable byte alphabet
        unbyte = {char: byte for byte, char in bytes_to_unicode().items()}
        pieces = [bytes(unbyte[c] for c in piece).decode("utf-8", errors="replace") for piece in pieces]
    ignore_merges = bool(spec["model"].get("ignore_merges", False))
    matches = [(name, whole) for name, patterns, whole in _LLAMA_CPP_PRE_TOKENIZERS
               if _regex_split(_PRE_TOKENIZER_PROBE, patterns) == pieces]
    return next((name for name, whole in matches if whole == ignore_merges), matches[0][0] if matches else None)


def _gguf_pre_tokenizer(tokenizer, folder: Path) -> str:
    """``tokenizer.ggml.pre`` for the base: recorded when the base was converted from a GGUF file, else derived."""
    source = folder / SOURCE_INFO
    recorded = json.loads(source.read_text()).get("tokenizer.ggml.pre") if source.is_file() else None
    if recorded is not None:
        return recorded
    pre = llama_cpp_pre_tokenizer(tokenizer)
    if pre is None:
        # A warning, not a refusal: the vocabulary and merges are the model's own, so llama.cpp runs the model and
        # tokenizes most text the same; refusing would leave no GGUF at all, and the exact route stays open.
        warnings.warn(f"the tokenizer in {folder} splits text before BPE in a way none of llama.cpp's pre-tokenizer "
                      f"types known here does ({', '.join(name for name, _, _ in _LLAMA_CPP_PRE_TOKENIZERS)}); "
                      f"writing tokenizer.ggml.pre='default', so llama.cpp will tokenize some text differently from "
                      f"Hugging Face. For an exact tokenizer: lora merge, then llama.cpp's convert_hf_to_gguf.py "
                      f"(which recognises more tokenizers by their output)")
        return "default"
    return pre


def add_tokenizer(writer, folder: Path, config, gguf) -> None:
    """The Hugging Face tokenizer under llama.cpp's keys, plus the chat template.

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) becomes llama.cpp's "gpt2" tokenizer model with the pre-tokenizer
    type it splits text by; SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3) becomes its
    "llama" model, whose merges are chosen by token score: a token's score ranks the first merge that makes it, as
    SentencePiece's own scores do. Both also carry the merges, from which transformers' GGUF reader rebuilds them.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    sentencepiece = bool(spec["model"].get("byte_fallback")) and not byte_level
    if spec["model"]["type"] != "BPE" or not (byte_level or sentencepiece):
        raise ValueError(f"the tokenizer in {folder} is a {spec['model']['type']} tokenizer that is neither "
                         f"byte-level BPE nor BPE with byte fallback; GGUF export writes those two kinds only. "
                         f"{MERGED_ROUTE}")
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
        if sentencepiece and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[i] = gguf.TokenType.BYTE  # what llama.cpp falls back to for a character it has no token for
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    if sentencepiece:
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
        first_merge = {}
        for rank, merge in enumerate(merges):
            first_merge.setdefault(merge.replace(" ", ""), rank)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([-(first_merge[token] + 1.0) if token in first_merge else 0.0 for token in tokens])
        # llama.cpp prepends "▁" to the text unless told not to; Gemma's normalizer, for one, does not
        marked = tokenizer.backend_tokenizer.normalizer.normalize_str("a") \
            if tokenizer.backend_tokenizer.normalizer else "a"
        if tokenizer.backend_tokenizer.pre_tokenizer:
            marked = "".join(piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(marked))
        writer.add_add_space_prefix(marked.startswith("\u2581"))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_gguf_pre_tokenizer(tokenizer, folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    # by what the tokenizer does: Llama-3-style tokenizers add BOS in their post-processor, without add_bos_token
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and special_prefix(tokenizer)[:1] == [bos])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
