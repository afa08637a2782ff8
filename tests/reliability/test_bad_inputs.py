"""A table of bad inputs: every one is refused with our ValueError, whose message names the problem and the fix,
and nothing of the user's changes (every file under the row's folder keeps its bytes and mode; an output that
existed stays as it was; no temporary file is left). Recipe and CLI failures print one error line, no traceback,
and exit non-zero.

Each row builds its inputs in its own folder and returns what to run. ``kind`` says how it runs: ``raises`` (a
library call), ``cli`` (``lora.cli.main`` in this process), ``proc`` (a subprocess, as a user runs it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
from lora import LoraConfig
from conftest import make_char_tokenizer, make_llama, make_llama_for, randomize_adapters
from fuzz_targets import is_ours

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@dataclass
class Row:
    id: str
    build: Callable[[Path], object]
    problem: str  # regex: the message names what is wrong (the file, key, value)
    fix: str  # regex: ... and what to do about it
    kind: str = "raises"


ROWS: list[Row] = []


def row(id: str, problem: str, fix: str, kind: str = "raises"):
    def register(build):
        ROWS.append(Row(id, build, problem, fix, kind))
        return build
    return register


# -- builders ---------------------------------------------------------------------------------------------------------
def adapter(tmp: Path, name: str = "adapter", seed: int = 0, **cfg) -> Path:
    """A trained-looking adapter (non-zero B) of make_llama(seed) on q_proj and v_proj."""
    model = make_llama(seed)
    lora.inject(model, LoraConfig(**{"r": 2, "targets": ["q_proj", "v_proj"], **cfg}))
    randomize_adapters(model, seed=seed)
    return lora.save_adapter(model, tmp / name)


def edit_weights(folder: Path, change: Callable[[dict], dict]) -> Path:
    tensors = load_file(folder / WEIGHTS)
    save_file(change(tensors), folder / WEIGHTS, metadata={"format": "pt"})
    return folder


def edit_config(folder: Path, change: Callable[[dict], dict]) -> Path:
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps(change(config)))
    return folder


def load_into_base(folder: Path):
    return lambda: lora.load_adapter(make_llama(0), folder)


def llama_dir(tmp: Path, name: str = "base", seed: int = 0) -> Path:
    """A Hugging Face folder of make_llama(seed) (config + safetensors), as export reads it."""
    make_llama(seed).save_pretrained(tmp / name)
    return tmp / name


def chat_model_dir(tmp: Path) -> Path:
    """A tiny Llama with a character tokenizer: what the recipes and `lora generate` load."""
    tok = make_char_tokenizer()
    make_llama_for(tok).save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    return tmp / "model"


def existing_output(path: Path, is_dir: bool) -> Path:
    """An output destination the user already has: a failed export must leave it as it was."""
    if is_dir:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"previous export")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"previous export")
    return path


def jsonl(tmp: Path, lines: list, name: str = "d.jsonl") -> Path:
    path = tmp / name
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return path


def load(path: Path, **kwargs):
    from lora.data import load_dataset

    return lambda: load_dataset(path, make_char_tokenizer(), **kwargs)


def settings(argv: list[str]):
    sys.path.insert(0, str(ROOT / "recipes"))
    import sft

    from lora.recipe import parse_settings

    return lambda: parse_settings(sft.SFT, argv)


# -- LoraConfig: values and targets -----------------------------------------------------------------------------------
@row("config-targets-match-nothing", r"targets=\('qproj',\).* matched no layer",
     r"Linear layers in this model \(suffixes\): \[.*'q_proj'")
def _(tmp):
    return lambda: lora.inject(make_llama(), LoraConfig(targets=["qproj"]))


@row("config-regex-matches-nothing", r"matched no layer", r"example full paths: \['model\.layers\.0\.self_attn")
def _(tmp):
    return lambda: lora.inject(make_llama(), LoraConfig(targets=r".*\.attention\.query"))


@row("config-layers-out-of-range", r"layers=\(7,\)\) matched no layer", r"block indices: \[0, 1\]")
def _(tmp):
    return lambda: lora.inject(make_llama(), LoraConfig(layers=[7]))


@row("config-bad-regex", r"targets '\(' is neither 'all-linear' nor a valid regex", r"pass a list of module-name")
def _(tmp):
    return lambda: LoraConfig(targets="(")


@row("config-r-zero", r"LoraConfig\.r must be", r"an integer >= 1, got 0")
def _(tmp):
    return lambda: LoraConfig(r=0)


@row("config-r-float", r"LoraConfig\.r must be", r"an integer >= 1, got 2\.5")
def _(tmp):
    return lambda: LoraConfig(r=2.5)


@row("config-r-string", r"LoraConfig\.r must be", r"an integer >= 1, got '8'")
def _(tmp):
    return lambda: LoraConfig(r="8")


@row("config-alpha-zero", r"LoraConfig\.alpha must be", r"number > 0, got 0")
def _(tmp):
    return lambda: LoraConfig(alpha=0)


@row("config-alpha-nan", r"LoraConfig\.alpha must be", r"number > 0, got nan")
def _(tmp):
    return lambda: LoraConfig(alpha=math.nan)


@row("config-alpha-inf", r"LoraConfig\.alpha must be", r"finite number > 0, got inf")
def _(tmp):
    return lambda: LoraConfig(alpha=math.inf)


@row("config-dropout-one", r"LoraConfig\.dropout must be", r"in \[0, 1\), got 1\.0")
def _(tmp):
    return lambda: LoraConfig(dropout=1.0)


@row("config-dropout-negative", r"LoraConfig\.dropout must be", r"in \[0, 1\), got -0\.1")
def _(tmp):
    return lambda: LoraConfig(dropout=-0.1)


@row("config-init-unknown", r"LoraConfig\.init must be", r"one of .*'kaiming'.*got 'xavier'")
def _(tmp):
    return lambda: LoraConfig(init="xavier")


@row("config-bias-unknown", r"LoraConfig\.bias must be", r"one of \('none', 'all', 'lora_only'\), got 'some'")
def _(tmp):
    return lambda: LoraConfig(bias="some")


@row("config-exclude-string", r"LoraConfig\.exclude must be a list of module names", r"write \['q_proj'\]")
def _(tmp):
    return lambda: LoraConfig(exclude="q_proj")


@row("config-targets-empty-list", r"LoraConfig\.targets must be", r"'all-linear', a regex string or a non-empty list")
def _(tmp):
    return lambda: LoraConfig(targets=[])


@row("config-layers-negative", r"LoraConfig\.layers must be", r"block indices >= 0, got \(-1,\)")
def _(tmp):
    return lambda: LoraConfig(layers=[-1])


@row("config-layers-not-integers", r"LoraConfig\.layers must be", r"integers|block indices")
def _(tmp):
    return lambda: LoraConfig(layers=["first"])


@row("config-modules-to-save-not-a-list", r"LoraConfig\.modules_to_save must be", r"list of module names")
def _(tmp):
    return lambda: LoraConfig(modules_to_save=5)


@row("config-modules-to-save-match-nothing", r"modules_to_save entry 'classifier' matched no module",
     r"top-level modules are \['model', 'lm_head'\]")
def _(tmp):
    return lambda: lora.inject(make_llama(), LoraConfig(modules_to_save=["classifier"]))


# -- adapter folders --------------------------------------------------------------------------------------------------
@row("adapter-folder-missing", r"adapter folder .*nope does not exist",
     r"expected a folder with adapter_config\.json and adapter_model\.safetensors")
def _(tmp):
    return load_into_base(tmp / "nope")


@row("adapter-config-file-missing", r"has no adapter_config\.json",
     r"needs adapter_config\.json and adapter_model\.safetensors")
def _(tmp):
    folder = adapter(tmp)
    (folder / CONFIG).unlink()
    return load_into_base(folder)


@row("adapter-weights-file-missing", r"has no adapter_model\.safetensors", r"save_adapter|save_pretrained|re-save")
def _(tmp):
    folder = adapter(tmp)
    (folder / WEIGHTS).unlink()
    return load_into_base(folder)


@row("adapter-only-pickle-bin", r"adapter_model\.bin is a pickle", r"re-save it with safetensors")
def _(tmp):
    folder = adapter(tmp)
    (folder / WEIGHTS).rename(folder / "adapter_model.bin")
    return load_into_base(folder)


@row("adapter-key-missing", r"missing from the file \(1\): \['base_model\.model\.model\.layers\.0\.self_attn\.q_proj"
                            r"\.lora_B\.weight'\]", r"trained on a different model|re-save")
def _(tmp):
    folder = edit_weights(adapter(tmp), lambda t: {k: v for k, v in t.items() if k != Q_B})
    return load_into_base(folder)


@row("adapter-key-extra", r"in the file but not in the model \(1\): \[.*mlp\.up_proj\.lora_A\.weight'\]",
     r"trained on a different model|re-save")
def _(tmp):
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    folder = edit_weights(adapter(tmp), lambda t: {**t, extra: torch.zeros(2, 16)})
    return load_into_base(folder)


@row("adapter-keys-renamed-with-adapter-name", r"lora_A\.default\.weight", r"trained on a different model|re-save")
def _(tmp):
    folder = edit_weights(adapter(tmp), lambda t: {k.replace(".lora_A.", ".lora_A.default."): v for k, v in t.items()})
    return load_into_base(folder)


@row("adapter-keys-without-peft-prefix", r"without PEFT's 'base_model\.model\.' prefix", r"re-save|save_adapter")
def _(tmp):
    folder = edit_weights(adapter(tmp), lambda t: {k[len("base_model.model."):]: v for k, v in t.items()})
    return load_into_base(folder)


@row("adapter-wrong-shapes", r"q_proj\.lora_A\.weight.*\(4, 16\)", r"trained on a different model|re-save")
def _(tmp):
    r4 = load_file(adapter(tmp, "r4", r=4) / WEIGHTS)
    return load_into_base(edit_weights(adapter(tmp), lambda t: r4))


@row("adapter-integer-dtype", r"(int64|integer).*lora_A|lora_A.*(int64|integer)", r"re-save|floating")
def _(tmp):
    folder = edit_weights(adapter(tmp), lambda t: {k: (v * 100).to(torch.int64) for k, v in t.items()})
    return load_into_base(folder)


@row("adapter-nan-weights", r"(NaN|non-finite).*q_proj\.lora_B|q_proj\.lora_B.*(NaN|non-finite)",
     r"re-save|retrain|checkpoint")
def _(tmp):
    folder = edit_weights(adapter(tmp), lambda t: {**t, Q_B: torch.full_like(t[Q_B], math.nan)})
    return load_into_base(folder)


@row("adapter-inf-weights", r"(inf|non-finite).*q_proj\.lora_A|q_proj\.lora_A.*(inf|non-finite)",
     r"re-save|retrain|checkpoint")
def _(tmp):
    folder = edit_weights(adapter(tmp), lambda t: {**t, Q_A: t[Q_A].index_fill(1, torch.tensor([3]), math.inf)})
    return load_into_base(folder)


@row("adapter-trained-on-another-base", r"was trained on a different base model",
     r"Load the right base model|check_base=False")
def _(tmp):
    return load_into_base(adapter(tmp, seed=1))  # make_llama(1) has the same shapes as make_llama(0)


@row("adapter-weights-truncated", r"adapter_model\.safetensors is corrupt or truncated",
     r"re-save the adapter or copy the file again")
def _(tmp):
    folder = adapter(tmp)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    return load_into_base(folder)


@row("adapter-weights-random-bytes", r"adapter_model\.safetensors is corrupt or truncated",
     r"re-save the adapter or copy the file again")
def _(tmp):
    folder = adapter(tmp)
    (folder / WEIGHTS).write_bytes(bytes(range(256)) * 8)
    return load_into_base(folder)


@row("adapter-weights-header-claims-a-terabyte", r"adapter_model\.safetensors is corrupt or truncated",
     r"re-save the adapter or copy the file again")
def _(tmp):
    folder = adapter(tmp)
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + b'{"__metadata__": {}}')
    return load_into_base(folder)


@row("adapter-weights-tensor-claims-a-terabyte", r"adapter_model\.safetensors is corrupt or truncated",
     r"re-save the adapter or copy the file again")
def _(tmp):
    folder = adapter(tmp)
    header = json.dumps({Q_A: {"dtype": "F32", "shape": [2**38, 1], "data_offsets": [0, 2**40]}}).encode()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    return load_into_base(folder)


@row("adapter-config-malformed-json", r"adapter_config\.json is not valid JSON", r"re-save the adapter")
def _(tmp):
    folder = adapter(tmp)
    (folder / CONFIG).write_text('{"r": 2, "target_modules": [')
    return load_into_base(folder)


@row("adapter-config-not-utf8", r"adapter_config\.json is not valid JSON", r"re-save the adapter")
def _(tmp):
    folder = adapter(tmp)
    (folder / CONFIG).write_bytes(b'{"r": 2, "peft_type": "LO\xffRA"}')
    return load_into_base(folder)


@row("adapter-config-not-an-object", r"adapter_config\.json must hold a JSON object, found list",
     r"must hold a JSON object")
def _(tmp):
    folder = adapter(tmp)
    (folder / CONFIG).write_text("[1, 2]")
    return load_into_base(folder)


@row("adapter-config-peft-type-not-lora", r"peft_type='PREFIX_TUNING'", r"only 'LORA' adapters can be loaded")
def _(tmp):
    return load_into_base(edit_config(adapter(tmp), lambda c: {**c, "peft_type": "PREFIX_TUNING"}))


@row("adapter-config-r-not-a-number", r"adapter_config\.json.*'r'|\br\b.*'eight'", r"integer")
def _(tmp):
    return load_into_base(edit_config(adapter(tmp), lambda c: {**c, "r": "eight"}))


@row("adapter-config-r-null", r"adapter_config\.json.*'r'|\br\b.*None", r"integer")
def _(tmp):
    return load_into_base(edit_config(adapter(tmp), lambda c: {**c, "r": None}))


@row("adapter-config-target-modules-not-a-list", r"target_modules", r"list of module names|regex")
def _(tmp):
    return load_into_base(edit_config(adapter(tmp), lambda c: {**c, "target_modules": 5}))


@row("adapter-config-fingerprint-garbage", r"base_model_fingerprint", r"re-save|check_base=False")
def _(tmp):
    return load_into_base(edit_config(adapter(tmp), lambda c: {**c, "base_model_fingerprint": "abc"}))


# -- merging and export -----------------------------------------------------------------------------------------------
@row("merge-state-dict-adapter-of-another-base", r"trained on a different base model",
     r"right base model|check_base=False")
def _(tmp):
    folder = adapter(tmp, seed=1)
    return lambda: lora.merge_state_dict(make_llama(0).state_dict(), folder)


@row("export-merged-adapter-of-another-base", r"trained on a different base model",
     r"right base model|check_base=False")
def _(tmp):
    from lora.export import export_merged

    base, folder = llama_dir(tmp), adapter(tmp, seed=1)
    out = existing_output(tmp / "exports" / "merged", is_dir=True)
    return lambda: export_merged(base, folder, out)


@row("export-merged-nan-adapter", r"(NaN|non-finite).*q_proj|q_proj.*(NaN|non-finite)", r"re-save|retrain|checkpoint")
def _(tmp):
    from lora.export import export_merged

    base = llama_dir(tmp)
    folder = edit_weights(adapter(tmp), lambda t: {**t, Q_B: torch.full_like(t[Q_B], math.nan)})
    out = existing_output(tmp / "exports" / "merged", is_dir=True)
    return lambda: export_merged(base, folder, out)


@row("export-merged-base-folder-missing", r"nope.*(does not exist|no such folder)", r"pass|embedded")
def _(tmp):
    from lora.export import export_merged

    folder = adapter(tmp)
    return lambda: export_merged(tmp / "nope", folder, tmp / "exports" / "merged")


@row("export-merged-base-without-safetensors", r"has no model\*\.safetensors weights",
     r"re-save the model with save_pretrained")
def _(tmp):
    from lora.export import export_merged

    base = llama_dir(tmp)
    (base / "model.safetensors").unlink()
    folder = adapter(tmp)
    return lambda: export_merged(base, folder, tmp / "exports" / "merged")


@row("export-gguf-unsupported-architecture", r"GGUF export supports .*'bloom' model",
     r"Export a merged folder instead \(lora merge\)")
def _(tmp):
    from transformers import BloomConfig, BloomForCausalLM

    from lora.export import export_gguf

    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)
    BloomForCausalLM(cfg).save_pretrained(tmp / "bloom")
    out = existing_output(tmp / "exports" / "model.gguf", is_dir=False)
    return lambda: export_gguf(tmp / "bloom", out)


@row("export-gguf-base-is-a-gguf-file", r"base\.gguf is a GGUF file", r"Convert it first")
def _(tmp):
    from lora.export import export_gguf

    (tmp / "base.gguf").write_bytes(b"GGUF" + bytes(60))
    out = existing_output(tmp / "exports" / "model.gguf", is_dir=False)
    return lambda: export_gguf(tmp / "base.gguf", out)


@row("export-gguf-folder-without-config", r"not a Hugging Face model folder \(no config\.json\)",
     r"save_pretrained|pass ")
def _(tmp):
    from lora.export import export_gguf

    base = llama_dir(tmp)
    (base / "config.json").unlink()
    out = existing_output(tmp / "exports" / "model.gguf", is_dir=False)
    return lambda: export_gguf(base, out)


@row("export-adapter-gguf-dora", r"this adapter uses DoRA", r"Merge it instead")
def _(tmp):
    from lora.export import export_adapter_gguf

    base, folder = llama_dir(tmp), adapter(tmp, dora=True)
    out = existing_output(tmp / "exports" / "model.adapter.gguf", is_dir=False)
    return lambda: export_adapter_gguf(base, folder, out)


# -- datasets ---------------------------------------------------------------------------------------------------------
@row("data-bad-json-line", r"d\.jsonl:2: not valid JSON", r"each line must be one JSON object")
def _(tmp):
    return load(jsonl(tmp, [{"text": "a"}, b'{"text": "b"']))


@row("data-empty-file", r"d\.jsonl holds no examples", r"one JSON object per line")
def _(tmp):
    (tmp / "d.jsonl").write_text("\n\n")
    return load(tmp / "d.jsonl")


@row("data-wrong-fields", r"d\.jsonl:1: cannot tell the format from the keys \['answer', 'question'\]",
     r"expected alpaca: 'instruction' and 'output'")
def _(tmp):
    return load(jsonl(tmp, [{"question": "q", "answer": "a"}]))


@row("data-mixed-formats", r"d\.jsonl:2: this record is in the 'chat' format", r"one file holds one format: split")
def _(tmp):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    return load(jsonl(tmp, [{"instruction": "q", "output": "a"}, chat]))


@row("data-overlong-drop-leaves-nothing", r"d\.jsonl: no example left after the over-long policy \(0/2 examples",
     r"raise max_length")
def _(tmp):
    return load(jsonl(tmp, [{"text": "x" * 50}, {"text": "y" * 60}]), max_length=16, overlong="drop")


@row("data-wrong-types", r"d\.jsonl:2: 'text' must be a non-empty string", r"must be a non-empty string")
def _(tmp):
    return load(jsonl(tmp, [{"text": "a"}, {"text": 5}]))


@row("data-not-utf8", r"d\.jsonl:1: not UTF-8 text \(byte 0xe9", r"save the file as UTF-8")
def _(tmp):
    return load(jsonl(tmp, [b'{"text": "caf\xe9"}']))


@row("data-folder-without-data-files", r"the data folder .*data holds no data files",
     r"pass a data file \(JSONL, JSON, CSV/TSV, Parquet")
def _(tmp):
    (tmp / "data").mkdir()
    (tmp / "data" / "notes.pdf").write_bytes(b"%PDF-1.4")
    return load(tmp / "data")


@row("data-mixed-label-kinds", r"d\.jsonl:2: label 'spam' is string, but line 1 has the integer label 0",
     r"use one kind for every label")
def _(tmp):
    return load(jsonl(tmp, [{"text": "a", "label": 0}, {"text": "b", "label": "spam"}]))


@row("data-unknown-format", r"unknown data format 'csv'", r"choose one of \['alpaca', 'chat'")
def _(tmp):
    return load(jsonl(tmp, [{"text": "a"}]), format="csv")


# -- data sources and formats beyond JSONL (issue 19) ----------------------------------------------------------------
def text_file(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def tool_chat(arguments='{"city": "Paris"}') -> dict:
    return {"tools": [TOOL], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                             "arguments": arguments}}]},
        {"role": "tool", "content": "18 C"}, {"role": "assistant", "content": "It is 18 C."}]}


@row("data-csv-wrong-field-count", r"d\.csv:3: 3 fields, but the header has 2 \(\['instruction', 'output'\]\)",
     r"quote fields that hold the delimiter")
def _(tmp):
    return load(text_file(tmp, "d.csv", "instruction,output\nSay hi,hi\nSay a, b,c\n"))


@row("data-csv-unterminated-quote", r"d\.csv:2: not valid CSV", r"quote fields .* with double quotes")
def _(tmp):
    return load(text_file(tmp, "d.csv", 'instruction,output\n"Say hi,hi\n'))


@row("data-csv-no-header-names", r"d\.csv:1: the header line must name every column once", r"Name the columns")
def _(tmp):
    return load(text_file(tmp, "d.csv", "instruction,\nSay hi,hi\n"))


@row("data-tsv-not-utf8", r"d\.tsv:2: not UTF-8 text \(byte 0xe9", r"save the file as UTF-8")
def _(tmp):
    return load(text_file(tmp, "d.tsv", b"text\tlabel\ncaf\xe9\tspam\n"))


@row("data-parquet-wrong-columns",
     r"d\.parquet row 1: cannot tell the format from the columns \['answer', 'question'\]",
     r"columns=prompt:question,completion:answer")
def _(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp / "d.parquet")
    return load(tmp / "d.parquet")


@row("data-parquet-corrupt", r"d\.parquet is not a readable Parquet file", r"write it again")
def _(tmp):
    return load(text_file(tmp, "d.parquet", b"PAR1" + bytes(range(200)) + b"PAR1"))


@row("data-json-empty-array", r"d\.json holds no examples", r"pass a data file|one JSON object per line")
def _(tmp):
    return load(text_file(tmp, "d.json", "[]\n"))


@row("data-json-array-bad-record", r"d\.json:4: not valid JSON", r"a \.json file holds one JSON array of records")
def _(tmp):
    return load(text_file(tmp, "d.json", '[\n {"text": "a"},\n {"text": "b"\n]\n'))


@row("data-json-array-missing-comma", r"d\.json:2: expected ',' or '\]' after record 1",
     r"a \.json file holds one JSON array of records")
def _(tmp):
    return load(text_file(tmp, "d.json", '[{"text": "a"}\n {"text": "b"}]\n'))


@row("data-json-array-not-records", r"d\.json:1 \(record 2\): expected a JSON object, found int",
     r"one JSON object")
def _(tmp):
    return load(text_file(tmp, "d.json", '[{"text": "a"}, 5]'))


@row("data-text-file-empty", r"d\.txt holds no examples", r"pass a data file")
def _(tmp):
    return load(text_file(tmp, "d.txt", "\n \n\n"))


@row("data-glob-matches-nothing", r"the pattern .*\*\.parquet' matches no data file", r"check the pattern")
def _(tmp):
    return load(tmp / "*.parquet")


@row("data-sharegpt-unknown-role", r"d\.jsonl:1: conversations\[1\] has the unknown role 'from': 'bot'",
     r"rename it to one of them")
def _(tmp):
    return load(jsonl(tmp, [{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}]))


@row("data-sharegpt-no-gpt-turn", r"d\.jsonl:1: 'conversations' has no 'gpt' turn", r"nothing to learn")
def _(tmp):
    return load(jsonl(tmp, [{"conversations": [{"from": "human", "value": "hi"}]}]))


@row("data-chat-unknown-role", r"d\.jsonl:1: messages\[1\] must be \{'role': one of \['system', 'user', "
     r"'assistant', 'tool'\]", r"'content': a string")
def _(tmp):
    return load(jsonl(tmp, [{"messages": [{"role": "user", "content": "q"}, {"role": "function", "content": "x"}]}]))


@row("data-tool-arguments-not-json", r"d\.jsonl:1: messages\[1\]\.tool_calls\[0\]\.function\.arguments is not JSON",
     r"write it as JSON")
def _(tmp):
    return load(jsonl(tmp, [tool_chat(arguments="{city: Paris")]))


@row("data-tool-arguments-not-an-object", r"d\.jsonl:1: messages\[1\]\.tool_calls\[0\]\.function\.arguments must "
     r"be a JSON object, got \[1, 2\]", r"write the arguments as an object")
def _(tmp):
    return load(jsonl(tmp, [tool_chat(arguments="[1, 2]")]))


@row("data-tools-not-a-list", r"d\.jsonl:1: 'tools' must be a list of", r"OpenAI's layout")
def _(tmp):
    return load(jsonl(tmp, [{**tool_chat(), "tools": {"name": "get_weather"}}]))


@row("data-tools-template-cannot-render", r"d\.jsonl:1: the tokenizer's chat template does not render tools",
     r"use a model whose chat template renders tools")
def _(tmp):
    return load(jsonl(tmp, [tool_chat()]))  # the ChatML test template writes role and content only


@row("data-tools-template-ignores-them", r"d\.jsonl:1: the tokenizer's chat template does not render tools \(the "
     r"tool 'get_weather' does not appear", r"use a model whose chat template renders tools")
def _(tmp):
    chat = {"tools": [TOOL], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    return load(jsonl(tmp, [chat]))


@row("data-tools-without-a-template", r"d\.jsonl:1: this tokenizer has no chat template, so tool definitions",
     r"use a model whose chat template renders tools")
def _(tmp):
    from lora.data import load_dataset

    path = jsonl(tmp, [tool_chat()])
    return lambda: load_dataset(path, make_char_tokenizer(chat_template=None))


@row("data-columns-unknown-field", r"columns: \['promt'\] is not a field of any format",
     r"the fields are \['instruction'")
def _(tmp):
    return load(jsonl(tmp, [{"q": "a", "a": "b"}]), columns="promt:q,completion:a")


@row("data-columns-malformed", r"columns='prompt=q': 'prompt=q' is not 'field:column'",
     r"columns=prompt:question,completion:answer")
def _(tmp):
    return load(jsonl(tmp, [{"q": "a", "a": "b"}]), columns="prompt=q")


@row("data-columns-missing-column", r"d\.jsonl:2: no column 'question', which columns= maps to 'prompt'",
     r"fix the mapping")
def _(tmp):
    return load(jsonl(tmp, [{"question": "q", "answer": "a"}, {"answer": "a"}]),
                columns="prompt:question,completion:answer")


@row("data-arrow-folder-is-a-dataset-dict", r"holds a DatasetDict \(the splits \['train'\]\)",
     r"pass one split's folder, e.g. .*train")
def _(tmp):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp / "ds"))
    return load(tmp / "ds")


@row("data-dataset-wrong-columns", r"the Dataset row 1: cannot tell the format from the columns \['a', 'b'\]",
     r"columns=")
def _(tmp):
    from datasets import Dataset

    from lora.data import load_dataset

    dataset = Dataset.from_dict({"a": ["x"], "b": ["y"]})
    return lambda: load_dataset(dataset, make_char_tokenizer())


@row("data-list-not-records", r"records\[1\]: expected a JSON object, found str", r"one JSON object")
def _(tmp):
    from lora.data import load_dataset

    return lambda: load_dataset([{"text": "a"}, "b"], make_char_tokenizer())


@row("data-not-a-source", r"cannot read data from a int", r"pass a data file")
def _(tmp):
    from lora.data import load_dataset

    return lambda: load_dataset(5, make_char_tokenizer())


@row("data-preferences-alpaca-layout-missing-rejected", r"d\.jsonl:2: 'instruction', 'chosen' and 'rejected' .*must be "
     r"strings for the 'preference' format", r"found keys \['chosen', 'input', 'instruction'\]")
def _(tmp):
    from lora.data import load_preferences

    path = jsonl(tmp, [{"instruction": "Say", "input": "hi", "chosen": "hi", "rejected": "no"},
                       {"instruction": "Say", "input": "yo", "chosen": "yo"}])
    return lambda: load_preferences(path, make_char_tokenizer())


# -- recipe settings (lora.recipe.parse_settings) ---------------------------------------------------------------------
@row("recipe-unknown-key", r"unknown setting\(s\) \['epoch'\] in the command line", r"Valid settings: .*epochs")
def _(tmp):
    return settings(["epoch=3"])


@row("recipe-bad-int", r"batch_size='eight'", r"expected int")
def _(tmp):
    return settings(["batch_size=eight"])


@row("recipe-bad-bool", r"packing='maybe'", r"expected bool")
def _(tmp):
    return settings(["packing=maybe"])


@row("recipe-bad-value-r-zero", r"LoraConfig\.r must be", r"an integer >= 1, got 0")
def _(tmp):
    return settings(["r=0"])


@row("recipe-learning-rate-nan", r"TrainConfig\.learning_rate must be", r"> 0 \(a finite number\), got nan")
def _(tmp):
    return settings(["learning_rate=nan"])


@row("recipe-epochs-infinite", r"TrainConfig\.epochs must be", r"finite")
def _(tmp):
    return settings(["epochs=inf"])


@row("recipe-not-key-value", r"unexpected argument '--lr'", r"settings are key=value")
def _(tmp):
    return settings(["--lr", "3"])


@row("recipe-bad-list-value", r"layers='\[0,'", r"expected .*(int|list)")
def _(tmp):
    return settings(["layers=[0,"])


@row("recipe-config-file-missing", r"config file .*none\.yaml does not exist", r"pass|recipes/configs")
def _(tmp):
    return settings(["--config", str(tmp / "none.yaml")])


@row("recipe-config-not-yaml", r"bad\.yaml", r"YAML|fix")
def _(tmp):
    (tmp / "bad.yaml").write_text("r: [1,\nlearning_rate: 3\n")
    return settings(["--config", str(tmp / "bad.yaml")])


@row("recipe-config-not-a-mapping", r"list\.yaml must be a YAML mapping of settings, found list",
     r"mapping of settings")
def _(tmp):
    (tmp / "list.yaml").write_text("- r\n- 8\n")
    return settings(["--config", str(tmp / "list.yaml")])


@row("recipe-config-unknown-key", r"unknown setting\(s\) \['rank'\] in .*c\.yaml", r"Valid settings: .*\br\b")
def _(tmp):
    (tmp / "c.yaml").write_text("rank: 8\n")
    return settings(["--config", str(tmp / "c.yaml")])


# -- the command line, in this process (lora.cli.main) ----------------------------------------------------------------
@row("cli-generate-model-missing", r"no model '.*missing'", r"give a local path", kind="cli")
def _(tmp):
    return ["generate", "--model", str(tmp / "missing"), "--prompt", "x"]


@row("cli-generate-adapter-missing", r"adapter folder .*nope does not exist", r"expected a folder with", kind="cli")
def _(tmp):
    return ["generate", "--model", str(chat_model_dir(tmp)), "--adapter", str(tmp / "nope"), "--prompt", "x"]


@row("cli-merge-adapter-missing", r"adapter folder .*nope does not exist", r"expected a folder with", kind="cli")
def _(tmp):
    return ["merge", "--model", str(llama_dir(tmp)), "--adapter", str(tmp / "nope"), "--out", str(tmp / "out")]


@row("cli-merge-model-missing", r"missing.*(does not exist|no such folder)", r"pass|embedded", kind="cli")
def _(tmp):
    return ["merge", "--model", str(tmp / "missing"), "--adapter", str(adapter(tmp)), "--out", str(tmp / "out")]


@row("cli-export-adapter-only-without-adapter", r"--adapter-only needs --adapter", r"--adapter DIR", kind="cli")
def _(tmp):
    return ["export", "gguf", "--model", str(llama_dir(tmp)), "--out", str(tmp / "m.gguf"), "--adapter-only"]


@row("cli-export-adapter-only-dora", r"this adapter uses DoRA", r"Merge it instead", kind="cli")
def _(tmp):  # refused before the base GGUF replaces the user's file at --out
    out = existing_output(tmp / "exports" / "model.gguf", is_dir=False)
    return ["export", "gguf", "--model", str(llama_dir(tmp)), "--adapter", str(adapter(tmp, dora=True)),
            "--adapter-only", "--out", str(out)]


@row("cli-merge-out-is-a-file", r"model\.gguf is a file", r"give a folder path", kind="cli")
def _(tmp):
    out = existing_output(tmp / "exports" / "model.gguf", is_dir=False)
    return ["merge", "--model", str(llama_dir(tmp)), "--adapter", str(adapter(tmp)), "--out", str(out)]


@row("cli-merge-out-holds-other-files", r"project already holds \['notes\.txt'\]", r"new or empty folder",
     kind="cli")
def _(tmp):
    (tmp / "project").mkdir()
    (tmp / "project" / "notes.txt").write_text("mine")
    return ["merge", "--model", str(llama_dir(tmp)), "--adapter", str(adapter(tmp)), "--out", str(tmp / "project")]


@row("cli-export-bad-dtype", r"argument --dtype: invalid choice: 'q4'", r"choose from", kind="cli")
def _(tmp):
    return ["export", "gguf", "--out", str(tmp / "m.gguf"), "--dtype", "q4"]


@row("cli-data-inspect-source-missing", r"data file .*missing\.csv does not exist", r"pass the path of", kind="cli")
def _(tmp):
    return ["data", "inspect", str(tmp / "missing.csv"), "--model", str(chat_model_dir(tmp))]


@row("cli-data-inspect-sharegpt-unknown-role", r"d\.jsonl:1: conversations\[0\] has the unknown role",
     r"rename it", kind="cli")
def _(tmp):
    data = jsonl(tmp, [{"conversations": [{"from": "robot", "value": "x"}]}])
    return ["data", "inspect", str(data), "--model", str(chat_model_dir(tmp))]


# -- as a user runs them: subprocesses ---------------------------------------------------------------------------------
@row("proc-sft-config-not-yaml", r"bad\.yaml", r"YAML|fix", kind="proc")
def _(tmp):
    (tmp / "bad.yaml").write_text("r: [1,\n")
    return [PYTHON, str(ROOT / "recipes" / "sft.py"), "--config", str(tmp / "bad.yaml")]


@row("proc-sft-output-dir-under-a-file", r"notes\.txt", r"\b(pass|use|choose)\b", kind="proc")
def _(tmp):
    (tmp / "notes.txt").write_text("the user's notes")
    train = jsonl(tmp, [{"instruction": "Say", "output": w} for w in ("hi", "yo", "ok", "no")], name="t.jsonl")
    return [PYTHON, str(ROOT / "recipes" / "sft.py"), f"model={chat_model_dir(tmp)}", f"train_file={train}",
            f"eval_file={train}", f"output_dir={tmp / 'notes.txt' / 'run'}", f"adapter_dir={tmp / 'ad'}",
            "max_steps=1", "batch_size=1", "grad_accum=1", "seq_len=64"]


@row("proc-sft-train-file-malformed-csv", r"t\.csv:3: 3 fields, but the header has 2", r"quote fields", kind="proc")
def _(tmp):
    train = text_file(tmp, "t.csv", "instruction,output\nSay hi,hi\nSay a, b,c\n")
    return [PYTHON, str(ROOT / "recipes" / "sft.py"), f"model={chat_model_dir(tmp)}", f"train_file={train}",
            f"eval_file={train}", f"output_dir={tmp / 'run'}", f"adapter_dir={tmp / 'ad'}", "max_steps=1"]


@row("proc-cli-merge-model-missing", r"missing.*(does not exist|no such folder)", r"pass|embedded", kind="proc")
def _(tmp):
    return [PYTHON, "-m", "lora.cli", "merge", "--model", str(tmp / "missing"), "--adapter", str(tmp / "ad"),
            "--out", str(tmp / "out")]


@row("proc-cli-export-bad-dtype", r"argument --dtype: invalid choice: 'q4'", r"choose from", kind="proc")
def _(tmp):
    return [PYTHON, "-m", "lora.cli", "export", "gguf", "--out", str(tmp / "m.gguf"), "--dtype", "q4"]


# -- the checks --------------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: content hash (files) and permission bits."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        out[str(path.relative_to(root))] = (digest, oct(st.st_mode))
    return out


def error_lines(text: str) -> list[str]:
    """Our error lines: "error: ..." (recipes), "lora merge: error: ..." (the CLI, argparse's own errors too).

    Warnings that libraries print on import (torch, torchao) are not counted; a traceback is checked for apart.
    """
    return [line for line in text.splitlines() if re.match(r"(lora[\w ]*: )?error: ", line)]


def check_one_line(stderr: str, code: int, r: Row) -> None:
    assert code not in (0, None), f"exit status {code}: the failure was not reported"
    assert "Traceback" not in stderr, f"a traceback instead of one line:\n{stderr[-3000:]}"
    lines = error_lines(stderr)
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    assert re.search(r.problem, lines[0]), f"the error line does not name the problem ({r.problem!r}): {lines[0]}"
    assert re.search(r.fix, lines[0]), f"the error line does not say the fix ({r.fix!r}): {lines[0]}"


_PROCS: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The subprocess rows, all started at once (each pays ~3-8 s of imports; in parallel they overlap)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    for r in ROWS:
        if r.kind == "proc":
            tmp = tmp_path_factory.mktemp(r.id)
            argv = r.build(tmp)
            before = snapshot(tmp)
            proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            _PROCS[r.id] = (tmp, before, proc)
    yield _PROCS
    for _, _, proc in _PROCS.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_refused_with_the_problem_and_the_fix(r: Row, tmp_path, request):
    if r.kind == "proc":
        tmp, before, proc = request.getfixturevalue("started")[r.id]
        try:
            _, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the command hung")
        check_one_line(stderr, proc.returncode, r)
        assert snapshot(tmp) == before, "the failed run changed or left files"
        return

    action = r.build(tmp_path)
    before = snapshot(tmp_path)
    if r.kind == "cli":
        from lora.cli import main

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                code = main(action)
            except SystemExit as e:  # argparse's own errors
                code = e.code
        check_one_line(stderr.getvalue(), code, r)
    else:
        with pytest.raises(Exception) as info:
            action()
        e = info.value
        assert type(e) is ValueError, f"{type(e).__name__} escaped instead of our ValueError: {e}"
        message = str(e)
        assert re.search(r.problem, message), f"the message does not name the problem ({r.problem!r}): {message}"
        assert re.search(r.fix, message), f"the message does not say the fix ({r.fix!r}): {message}"
        assert is_ours(e), f"a ValueError from inside a call, not one of our messages: {message}"
    assert snapshot(tmp_path) == before, "the failed call changed the user's files or left a temporary file"


def test_the_table_is_big_and_covers_every_area():
    areas = {r.id.split("-")[0] for r in ROWS}
    assert len(ROWS) >= 40 and len({r.id for r in ROWS}) == len(ROWS)
    assert areas >= {"config", "adapter", "merge", "export", "data", "recipe", "cli", "proc"}
