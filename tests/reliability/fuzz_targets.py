"""Fuzz properties of the parsers that read what users hand us, shared by ``test_fuzz.py`` (a few hundred cases
in CI) and ``bench/fuzz.py`` (10,000 and more).

The property, for every target: whatever the input, the only exception that escapes is one of our own clear
``ValueError``\\ s (raised by a ``raise`` statement in the ``lora`` package, with a message), within a time limit,
without a large allocation (a safetensors header that claims a terabyte is refused before anything is allocated),
and a failed ``load_adapter`` leaves the model as it was.

Targets: ``adapter_config`` (fuzzed ``adapter_config.json`` through ``LoraConfig.from_peft``, ``read_adapter`` and
``load_adapter``), ``adapter_weights`` (fuzzed ``adapter_model.safetensors`` bytes through the same), ``jsonl``
(fuzzed files through ``read_jsonl``, ``load_dataset`` and ``prompts_and_answers``), ``data_files`` (JSON arrays,
CSV/TSV and text files through those, ``load_preferences`` and ``inspect_data``), ``parquet`` (typed tables, some
damaged, with ``columns=``), ``formats`` (chat with tool calls, ShareGPT, preference pairs, renamed columns, as
lists of records) and ``recipe_settings``
(fuzzed ``key=value`` arguments and ``--config`` YAML through ``parse_settings``).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import json
import os
import random
import signal
import struct
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora
from lora.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter
from lora.config import LoraConfig
from lora.inject import adapters_of
from lora.layers import LoRALinear

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
for _p in (TESTS, ROOT / "recipes"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from conftest import make_char_tokenizer, make_llama  # noqa: E402
from data_templates import tool_conversation  # noqa: E402

LORA_DIR = Path(lora.__file__).resolve().parent
TIME_LIMIT_S = 30  # a case that runs longer than this is a hang
MEMORY_LIMIT_BYTES = 512 * 1024**2  # how far one case may raise the process's RSS above where it started


class PropertyFailure(AssertionError):
    """A case broke the property; ``signature`` groups failures with one cause (exception type and place)."""

    def __init__(self, target: str, signature: str, detail: str):
        super().__init__(f"[{target}] {signature}: {detail}")
        self.signature = signature


class Hang(Exception):
    pass


# -- what counts as our own error ------------------------------------------------------------------------------------
@functools.cache
def _raise_lines(filename: str) -> frozenset[int]:
    """Every line covered by a ``raise`` statement in a source file."""
    tree = ast.parse(Path(filename).read_text(), filename)
    return frozenset(line for node in ast.walk(tree) if isinstance(node, ast.Raise)
                     for line in range(node.lineno, node.end_lineno + 1))


def _innermost(exc: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(exc.__traceback__)
    return frames[-1] if frames else None


def is_ours(exc: BaseException) -> bool:
    """A ``ValueError`` (not a subclass such as ``JSONDecodeError``) with a message, raised by a ``raise`` statement
    of the ``lora`` package itself, its wings included (not by ``int("x")`` or a library deep inside a call)."""
    if type(exc) is not ValueError or not str(exc).strip():
        return False
    frame = _innermost(exc)
    if frame is None or LORA_DIR not in Path(frame.filename).resolve().parents:  # lora/ or a wing inside it
        return False
    return frame.lineno in _raise_lines(frame.filename)


def where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame inside the project (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if f.filename.startswith(str(ROOT)) and "/tests/" not in f.filename
              and "/.venv/" not in f.filename and "site-packages" not in f.filename] or frames
    if not inside:
        return "?"
    f = inside[-1]
    return f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def start_measuring() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS and return that RSS in bytes.

    ru_maxrss never goes down, so after an earlier test peaked higher, a new allocation would not show in it;
    writing 5 to clear_refs (Linux >= 4.0) resets VmHWM, so each case is judged by what it allocated itself."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_since_start() -> int:
    return _status_kib("VmHWM") * 1024


@contextlib.contextmanager
def time_limit(seconds: float):
    """Interrupt the case with :class:`Hang` after ``seconds`` (a deadline that also stops a real hang)."""
    def on_alarm(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def expect_ours(target: str, call: Callable, *args, **kwargs):
    """Run ``call``; return its result, or None when it raised our own clear ValueError. Anything else (another
    exception, a foreign ValueError, a hang, a big allocation) raises :class:`PropertyFailure`."""
    start_rss = start_measuring()
    name = getattr(call, "__qualname__", str(call))
    try:
        with time_limit(TIME_LIMIT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "records no base-model fingerprint": expected, and noisy
            return call(*args, **kwargs)
    except Hang as e:
        raise PropertyFailure(target, f"{name}: hang", str(e)) from None
    except Exception as e:
        message = str(e)
        if not is_ours(e):
            raise PropertyFailure(target, f"{name}: {type(e).__name__} at {where(e)}",
                                  f"{type(e).__name__}: {message[:300]}") from e
        if "alloc" in message.lower() or "memory" in message.lower():
            raise PropertyFailure(target, f"{name}: allocation attempted at {where(e)}", message[:300]) from e
        return None
    finally:
        grown = peak_since_start() - start_rss
        if grown > MEMORY_LIMIT_BYTES:
            raise PropertyFailure(target, f"{name}: peak memory grew by {grown / 1024**2:.0f} MiB",
                                  "an input made the process allocate far more than the file's size")


# -- shared fixtures (built once per process) -------------------------------------------------------------------------
@functools.cache
def workdir() -> Path:
    holder = tempfile.TemporaryDirectory(prefix="lora-fuzz-")
    _KEEP.append(holder)
    return Path(holder.name)


_KEEP: list = []


@functools.cache
def base_model():
    return make_llama()


@functools.cache
def reference_adapter() -> tuple[dict, bytes, dict]:
    """A valid adapter of :func:`base_model`: (config dict, weights file bytes, {key: (dtype, shape)})."""
    from safetensors.torch import load_file

    model = make_llama()
    lora.inject(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    folder = lora.save_adapter(model, workdir() / "reference")
    config = json.loads((folder / CONFIG_NAME).read_text())
    weights = (folder / WEIGHTS_NAME).read_bytes()
    specs = {k: ("F32", list(t.shape)) for k, t in load_file(folder / WEIGHTS_NAME).items()}
    return config, weights, specs


@functools.cache
def tokenizers():
    return make_char_tokenizer(), make_char_tokenizer(chat_template=None)


def _check_model_untouched(target: str, model) -> None:
    if any(isinstance(m, LoRALinear) for m in model.modules()) or adapters_of(model):
        raise PropertyFailure(target, "load_adapter: model changed by a failed load",
                              "a refused adapter left LoRA layers or an adapter entry in the model")


def _load_into_base(target: str, folder: Path) -> None:
    """load_adapter into the shared base model, then take the adapter out again (or check a failure left none)."""
    model = base_model()
    if expect_ours(target, load_adapter, model, folder) is not None:
        lora.remove_adapter(model, "default")
    _check_model_untouched(target, model)


# -- target: adapter_config.json ---------------------------------------------------------------------------------------
_JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                 | st.text(max_size=12))
JSON_VALUES = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "use_rslora",
                "use_dora", "init_lora_weights", "bias", "modules_to_save", "layers_to_transform",
                "base_model_name_or_path", "base_model_fingerprint", "rank_pattern", "alpha_pattern", "lora_bias",
                "exclude_modules", "task_type", "inference_mode"]
_TRICKY = st.sampled_from([0, -1, 1, 2, 3, 10**30, 2.5, float("nan"), float("inf"), "8", "x", "", [], {}, [0],
                           ["q_proj"], "all-linear", "(", ".*", "LORA", "lora", "gaussian", "pissa", "none", "all",
                           True, False, None, {"model.layers.0.self_attn.q_proj": [1.0]},
                           {"model.layers.0.self_attn.q_proj": "abc"}, {"x": [float("nan")] * 16}])


@st.composite
def adapter_config_files(draw) -> bytes:
    """A mutated valid config (mostly), any JSON value, or raw bytes, as the file's bytes."""
    config, _, _ = reference_adapter()
    kind = draw(st.sampled_from(["mutated"] * 6 + ["any-json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "any-json":
        return json.dumps(draw(JSON_VALUES)).encode()
    cfg = dict(config)
    if draw(st.integers(0, 3)) == 0:
        cfg.pop(draw(st.sampled_from(_CONFIG_KEYS)), None)
    # one changed key most of the time, so a check that runs early does not hide what a later one would miss
    for key in draw(st.lists(st.sampled_from(_CONFIG_KEYS), min_size=1, max_size=draw(st.sampled_from([1, 1, 2, 4])),
                             unique=True)):
        cfg[key] = draw(_TRICKY | JSON_VALUES)
    return json.dumps(cfg).encode()


def check_adapter_config(data: bytes) -> None:
    target = "adapter_config"
    _, weights, _ = reference_adapter()
    folder = workdir() / "adapter_config"
    folder.mkdir(exist_ok=True)
    (folder / CONFIG_NAME).write_bytes(data)
    (folder / WEIGHTS_NAME).write_bytes(weights)
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        raw = json.loads(data)
        if isinstance(raw, dict):
            expect_ours(target, LoraConfig.from_peft, raw)
    expect_ours(target, read_adapter, folder)
    _load_into_base(target, folder)


# -- target: adapter_model.safetensors ---------------------------------------------------------------------------------
_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3",
           "F8_E5M2", "C64", "F4", "Q4"]
_BIG = st.sampled_from([2**20, 2**31, 2**32 + 1, 2**40, 2**62, 2**64 - 1])


def _safetensors_bytes(header: dict | bytes, data: bytes, claimed_len: int | None = None) -> bytes:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(encoded) if claimed_len is None else claimed_len
    return struct.pack("<Q", length % 2**64) + encoded + data


@st.composite
def adapter_weight_files(draw) -> bytes:
    """Structured headers with fuzzed dtypes/shapes/offsets, mutated real files, huge claims, or random bytes."""
    _, weights, specs = reference_adapter()
    kind = draw(st.sampled_from(["structured"] * 4 + ["mutated"] * 3 + ["huge-claim"] * 2 + ["bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    if kind == "mutated":
        data = bytearray(weights)
        for pos, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=8)):
            data[pos] = value
        cut = draw(st.none() | st.integers(0, len(data)))
        return bytes(data[:cut] if cut is not None else data) + draw(st.binary(max_size=16))
    if kind == "huge-claim":  # the 8-byte length, or a tensor, claims far more than the file holds
        if draw(st.booleans()):
            return _safetensors_bytes(b"{}", draw(st.binary(max_size=64)), claimed_len=draw(_BIG))
        key = draw(st.sampled_from(sorted(specs)))
        dtype = draw(st.sampled_from(_DTYPES[:4]))
        shape = [draw(_BIG), draw(st.integers(1, 2**20))]
        end = draw(_BIG)
        return _safetensors_bytes({key: {"dtype": dtype, "shape": shape, "data_offsets": [0, end]}},
                                  draw(st.binary(max_size=64)))
    header, offset, blobs = {}, 0, []
    keys = draw(st.lists(st.sampled_from(sorted(specs)) | st.text(max_size=20), min_size=0, max_size=6,
                         unique=True))
    for key in keys:
        dtype = draw(st.sampled_from(_DTYPES))
        real = specs.get(key, ("F32", [2, 16]))[1]
        shape = draw(st.just(real) | st.lists(st.integers(0, 40), max_size=3))
        item = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                "I16": 2, "U16": 2}.get(dtype, 1)
        size = item
        for d in shape:
            size *= d
        size = min(size, 4096) if draw(st.booleans()) else draw(st.integers(0, 4096))
        begin = offset if draw(st.integers(0, 9)) else draw(st.integers(0, 8192))
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}
        blobs.append(draw(st.binary(min_size=size, max_size=size)) if size <= 512
                     else random.Random(draw(st.integers(0, 2**32))).randbytes(size))
        offset = begin + size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.just({"format": "pt"}) | st.dictionaries(st.text(max_size=5),
                                                                                   JSON_VALUES, max_size=2))
    return _safetensors_bytes(header, b"".join(blobs) + draw(st.binary(max_size=8)))


def check_adapter_weights(data: bytes) -> None:
    target = "adapter_weights"
    config, _, _ = reference_adapter()
    folder = workdir() / "adapter_weights"
    folder.mkdir(exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    (folder / WEIGHTS_NAME).write_bytes(data)
    expect_ours(target, read_adapter, folder)
    _load_into_base(target, folder)


# -- target: JSONL data -----------------------------------------------------------------------------------------------
_DATA_KEYS = ["instruction", "input", "output", "messages", "role", "content", "prompt", "completion", "text",
              "label"]
_TEXT = st.text(max_size=30) | st.sampled_from(["", " ", "<|im_end|>", "<|im_start|>assistant\n", "{{ x }}",
                                                "\x00", "é", "\U0001F600"])
_VALUE = _TEXT | st.integers(-2**70, 2**70) | st.booleans() | st.none() | st.floats(allow_nan=True) | JSON_VALUES
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "robot"]) | _VALUE,
                                  "content": _TEXT | _VALUE}) | _VALUE
_RECORD = st.one_of(
    st.fixed_dictionaries({"instruction": _TEXT, "output": _TEXT}, optional={"input": _TEXT | _VALUE}),
    st.fixed_dictionaries({"messages": st.lists(_MESSAGE, max_size=5) | _VALUE}),
    st.fixed_dictionaries({"prompt": _TEXT | _VALUE, "completion": _TEXT | _VALUE}),
    st.fixed_dictionaries({"text": _TEXT | _VALUE}),
    st.fixed_dictionaries({"text": _TEXT, "label": st.sampled_from(["a", "b", 0, 1, 2, 10]) | _VALUE}),
    st.dictionaries(st.sampled_from(_DATA_KEYS) | st.text(max_size=6), _VALUE, max_size=4),
)
_LINE = st.one_of(
    _RECORD.map(lambda r: json.dumps(r).encode()),
    _RECORD.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"   ", b"{", b"}", b'{"text": "a\\ud800"}', b'{"text": 1' + b"0" * 5000 + b"}",
                     b"[" * 5000, b'{"text": "caf\xe9"}', b"\xef\xbb\xbf{}", b"NaN", b'{"text": NaN}']),
    st.binary(max_size=40),
)


@st.composite
def jsonl_files(draw) -> tuple[bytes, int | None, str, int]:
    """(file bytes, max_length, overlong, which tokenizer)."""
    lines = draw(st.lists(_LINE, max_size=6))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = newline.join(lines) + draw(st.sampled_from([b"", newline]))
    return (data, draw(st.none() | st.integers(-1, 80)), draw(st.sampled_from(["truncate", "drop"])),
            draw(st.integers(0, 1)))


def check_jsonl(case: tuple[bytes, int | None, str, int]) -> None:
    from lora.data import load_dataset, prompts_and_answers, read_jsonl

    target = "jsonl"
    data, max_length, overlong, which = case
    path = workdir() / "data.jsonl"
    path.write_bytes(data)
    expect_ours(target, read_jsonl, path)
    result = expect_ours(target, load_dataset, path, tokenizers()[which], max_length=max_length, overlong=overlong,
                         cache=workdir() / "cache")
    if result is not None:
        _check_examples(target, *result, max_length)
    expect_ours(target, prompts_and_answers, path)


def _check_examples(target: str, examples, stats, max_length: int | None) -> None:
    """What load_dataset returned is well formed: ids are ints, within max_length, each with a loss or a label."""
    from lora.data import IGNORE

    for ex in examples:
        ids = ex["input_ids"]
        ok = bool(ids) and all(isinstance(i, int) for i in ids) and (max_length is None or len(ids) <= max_length)
        if "targets" in ex:
            ok = ok and len(ex["targets"]) == len(ids) and any(t != IGNORE for t in ex["targets"])
        else:
            ok = ok and 0 <= ex["label"] < len(stats.labels)
        if not ok:
            raise PropertyFailure(target, "load_dataset: malformed example", repr(ex)[:300])


# -- targets: the other data sources and formats (issue 19) ------------------------------------------------------
@functools.cache
def data_tokenizers():
    """ChatML (no tools), no template (the plain format), and a template that renders tools (Qwen2.5's layout)."""
    from data_templates import TOOL_CHATML

    tools = make_char_tokenizer(chat_template=TOOL_CHATML)
    return make_char_tokenizer(), make_char_tokenizer(chat_template=None), tools


_CELL = _TEXT | st.sampled_from(['"', '""', ",", "\t", "\n", '"a,b"', "0", "-3", "10", "spam", "\r\n", "\x00"])
_HEADER = st.lists(st.sampled_from(_DATA_KEYS + ["chosen", "rejected", "conversations"]) | st.text(max_size=5),
                   max_size=4)


def _mutate(draw, data: bytes) -> bytes:
    """Mostly the bytes as they are; else cut short, or a byte changed (a file broken in transit or by hand)."""
    how = draw(st.sampled_from(["keep", "keep", "keep", "cut", "flip"]))
    if not data or how == "keep":
        return data
    at = draw(st.integers(0, len(data) - 1))
    return data[:at] if how == "cut" else data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]


@st.composite
def data_files(draw) -> tuple[str, bytes, int | None, int]:
    """(suffix, file bytes, max_length, which tokenizer): JSON arrays, CSV/TSV tables, text files."""
    import csv
    import io

    suffix = draw(st.sampled_from([".json", ".csv", ".tsv", ".txt", ".md"]))
    good = draw(st.booleans())  # records of one format (then perhaps damaged), else anything
    if suffix == ".json":
        records = draw(st.lists(_GOOD_RECORD_OF[draw(st.sampled_from(sorted(_GOOD_RECORD_OF)))], min_size=1,
                                max_size=4) if good else st.lists(_RECORD | JSON_VALUES, max_size=5))
        data = json.dumps(records, indent=draw(st.sampled_from([None, 1])), ensure_ascii=draw(st.booleans()))
        data = data.encode("utf-8", "surrogatepass")
    elif suffix in (".csv", ".tsv"):
        if good:
            kind = draw(st.sampled_from(["alpaca", "text", "classification", "preference"]))
            records = draw(st.lists(_GOOD_RECORD_OF[kind], min_size=1, max_size=4))
            header, rows = sorted(records[0]), [[r[k] for k in sorted(r)] for r in records]
        else:
            header = draw(_HEADER)
            rows = draw(st.lists(st.lists(_CELL, max_size=5), max_size=5))
        delimiter = "," if suffix == ".csv" else "\t"
        if draw(st.booleans()):  # as a spreadsheet writes it: quoted where it must be
            out = io.StringIO()
            csv.writer(out, delimiter=delimiter).writerows([header, *rows])
            text = out.getvalue()
        else:  # by hand: cells joined, quotes and delimiters where they fall
            text = "\n".join(delimiter.join(r) for r in [header, *rows])
        data = text.encode("utf-8", "surrogatepass")
    else:
        paragraphs = draw(st.lists(_TEXT | st.sampled_from(["\n", "\n\n\n", " \n \n", "#"]), max_size=6))
        data = "".join(paragraphs).encode("utf-8", "surrogatepass")
    if good:
        return suffix, _mutate(draw, data), draw(st.none() | st.integers(1, 400)), draw(st.integers(0, 2))
    data = _mutate(draw, data) if draw(st.booleans()) else data + draw(st.binary(max_size=8))
    return suffix, data, draw(st.none() | st.integers(-1, 40)), draw(st.integers(0, 2))


def check_data_files(case: tuple[str, bytes, int | None, int]) -> None:
    from lora.data import inspect_data, load_dataset, load_preferences, prompts_and_answers

    target = "data_files"
    suffix, data, max_length, which = case
    path = workdir() / f"data{suffix}"
    path.write_bytes(data)
    tokenizer = data_tokenizers()[which]
    result = expect_ours(target, load_dataset, path, tokenizer, max_length=max_length, cache=workdir() / "cache")
    if result is not None:
        _check_examples(target, *result, max_length)
    expect_ours(target, prompts_and_answers, path)
    expect_ours(target, load_preferences, path, tokenizer, max_length=max_length)
    expect_ours(target, inspect_data, path, tokenizer, max_length=max_length, show=1)


_WORD = st.text(alphabet="abcdefghij klmnop,.\n", min_size=1, max_size=12)
_GOOD_TURNS = st.lists(st.tuples(_WORD, _WORD), min_size=1, max_size=3)
_GOOD_RECORD_OF = {
    "alpaca": st.fixed_dictionaries({"instruction": _WORD, "input": _WORD, "output": _WORD}),
    "text": st.fixed_dictionaries({"text": _WORD}),
    "classification": st.fixed_dictionaries({"text": _WORD, "label": st.sampled_from(["spam", "ham"])}),
    "chat": _GOOD_TURNS.map(lambda turns: {"messages": [m for q, a in turns for m in (
        {"role": "user", "content": q}, {"role": "assistant", "content": a})]}),
    "sharegpt": _GOOD_TURNS.map(lambda turns: {"conversations": [m for q, a in turns for m in (
        {"from": "human", "value": q}, {"from": "gpt", "value": a})]}),
    "preference": st.fixed_dictionaries({"instruction": _WORD, "input": _WORD, "chosen": _WORD, "rejected": _WORD}),
    "tools": st.tuples(_WORD, st.integers(-5, 40)).map(lambda t: tool_conversation(*t)),
}


_PARQUET_COLUMN = st.one_of(
    st.lists(_TEXT | st.none(), min_size=1, max_size=4),
    st.lists(st.integers(-2**62, 2**62) | st.none(), min_size=1, max_size=4),
    st.lists(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                             "content": _TEXT | st.none()}), max_size=3) | st.none(),
             min_size=1, max_size=4),
    st.lists(st.lists(st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "bot"]),
                                             "value": _TEXT}), max_size=3), min_size=1, max_size=4),
)


@st.composite
def parquet_files(draw) -> tuple[bytes, int | None, int, str | None]:
    """(Parquet file bytes, max_length, which tokenizer, columns=): tables of typed columns, sometimes damaged."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    if draw(st.booleans()):  # a table in one of the formats, a cell perhaps emptied: mostly loads
        kind = draw(st.sampled_from(sorted(_GOOD_RECORD_OF)))
        records = draw(st.lists(_GOOD_RECORD_OF[kind], min_size=1, max_size=4))
        kind_keys = sorted(records[0])
        columns = {k: [r[k] for r in records] for k in kind_keys}
        if draw(st.integers(0, 3)) == 0:
            key = draw(st.sampled_from(kind_keys))
            columns[key][0] = draw(st.none() | st.just("") | _TEXT)
    else:
        names = draw(st.lists(st.sampled_from(_DATA_KEYS + ["conversations", "chosen", "rejected", "q", "a"]),
                              min_size=1, max_size=4, unique=True))
        columns = {name: draw(_PARQUET_COLUMN) for name in names}
    rows = min(len(c) for c in columns.values())
    try:
        table = pa.table({name: values[:rows] for name, values in columns.items()})
    except (pa.ArrowException, ValueError, TypeError):  # a column pyarrow cannot type: not an input users have
        table = pa.table({"text": ["fallback"]})
    out = io.BytesIO()
    pq.write_table(table, out)
    mapping = draw(st.none() | st.sampled_from(["prompt:q,completion:a", "text:q", "promt:q", "text:missing", ":"]))
    return _mutate(draw, out.getvalue()), draw(st.none() | st.integers(1, 40)), draw(st.integers(0, 2)), mapping


def check_parquet(case: tuple[bytes, int | None, int, str | None]) -> None:
    from lora.data import load_dataset, load_preferences

    target = "parquet"
    data, max_length, which, columns = case
    path = workdir() / "data.parquet"
    path.write_bytes(data)
    tokenizer = data_tokenizers()[which]
    result = expect_ours(target, load_dataset, path, tokenizer, max_length=max_length, columns=columns, cache=False)
    if result is not None:
        _check_examples(target, *result, max_length)
    expect_ours(target, load_preferences, path, tokenizer, columns=columns)


_ARGUMENTS = st.sampled_from(['{"city": "Paris"}', "{city: Paris", "[1, 2]", "{}", '"x"', "", "null"]) | JSON_VALUES
_TOOL_CALL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", ""]) | _VALUE}, optional={"arguments": _ARGUMENTS})}) | _VALUE
_CHAT_TURN = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "function"]) | _VALUE},
    optional={"content": _TEXT | _VALUE, "tool_calls": st.lists(_TOOL_CALL, max_size=2) | _VALUE,
              "tool_call_id": _TEXT}) | _VALUE
_TOOLS = (st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "x"]) | _VALUE})}) | _VALUE, max_size=2) | _TEXT | _VALUE)
_FORMAT_RECORD = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(_CHAT_TURN, max_size=6)}, optional={"tools": _TOOLS}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "system", "bot", "user"]) | _VALUE, "value": _TEXT | _VALUE})
        | _VALUE, max_size=5) | _VALUE}),
    st.fixed_dictionaries({"instruction": _TEXT | _VALUE, "chosen": _TEXT | _VALUE, "rejected": _TEXT | _VALUE},
                          optional={"input": _TEXT | _VALUE}),
    st.fixed_dictionaries({"prompt": _TEXT, "chosen": _TEXT, "rejected": _TEXT | _VALUE}),
    st.fixed_dictionaries({"q": _TEXT | _VALUE, "a": _TEXT | _VALUE}),
    _RECORD,
)
_COLUMNS = st.none() | st.sampled_from(["prompt:q,completion:a", "prompt:q,chosen:a,rejected:a", "text:q", "q", ":",
                                        "prompt:q,prompt:a", "messages:conversations", ""]) | st.text(max_size=10)


def _edit(draw, value) -> None:
    """Replace one value somewhere inside a record (a dict or list, in place) with a drawn one."""
    while True:
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        if not keys:
            return
        key = draw(st.sampled_from(keys))
        if isinstance(value[key], (dict, list)) and value[key] and draw(st.booleans()):
            value = value[key]
            continue
        value[key] = draw(_VALUE | _TEXT | _ARGUMENTS)
        return


@st.composite
def format_records(draw) -> tuple[list, int | None, int, object]:
    """(records, max_length, which tokenizer, columns=): chat with tool calls, ShareGPT, preference pairs in both
    layouts, renamed columns, as a list source."""
    if draw(st.booleans()):  # good records of one format, a value here and there replaced: past the checks
        kind = draw(st.sampled_from(sorted(_GOOD_RECORD_OF)))
        records = draw(st.lists(_GOOD_RECORD_OF[kind], min_size=1, max_size=3))
        for _ in range(draw(st.integers(0, 2))):
            _edit(draw, records[draw(st.integers(0, len(records) - 1))])
        return records, draw(st.none() | st.integers(1, 400)), draw(st.integers(0, 2)), None
    records = draw(st.lists(_FORMAT_RECORD, min_size=0, max_size=4))
    return records, draw(st.none() | st.integers(1, 60)), draw(st.integers(0, 2)), draw(_COLUMNS)


def check_format_records(case: tuple[list, int | None, int, object]) -> None:
    from lora.data import load_dataset, load_preferences, prompts_and_answers

    target = "formats"
    records, max_length, which, columns = case
    tokenizer = data_tokenizers()[which]
    result = expect_ours(target, load_dataset, records, tokenizer, max_length=max_length, columns=columns,
                         cache=False)
    if result is not None:
        _check_examples(target, *result, max_length)
    expect_ours(target, load_preferences, records, tokenizer, max_length=max_length, columns=columns)
    expect_ours(target, prompts_and_answers, records, columns=columns)


# -- target: recipe settings -------------------------------------------------------------------------------------------
@functools.cache
def recipe_schema() -> tuple[type, list[str]]:
    import sft

    from lora.train import TrainConfig

    keys = sorted({f.name for cls in (LoraConfig, TrainConfig, sft.SFT) for f in dataclasses.fields(cls)})
    return sft.SFT, keys


_SETTING_VALUES = st.sampled_from(["", "0", "1", "-1", "2.5", "1e999", "-1e999", "nan", "inf", "none", "null", "true",
                                   "false", "maybe", "[", "[0,", "[0, 1]", "[]", "{a: 1}", "q_proj,v_proj", "(",
                                   "all-linear", "10000000000000000000000", "!!python/object/apply:os.system [ls]",
                                   "*alias", "&a [1]", "'quoted'", "x=y", "[[[[", "- a", ": b", "\x00"])


@st.composite
def recipe_argvs(draw) -> tuple[list[str], str | None]:
    """(argv, YAML text for --config or None); argv never asks for --help (that exits on purpose)."""
    _, keys = recipe_schema()
    key = st.sampled_from(keys) | st.text(min_size=1, max_size=8).filter(lambda k: "=" not in k)
    value = _SETTING_VALUES | st.text(max_size=12)
    arg = st.builds(lambda k, v: f"{k}={v}", key, value) | st.sampled_from(["--config", "-x", "=", "noequals",
                                                                            "--lr", "r==3"])
    argv = draw(st.lists(arg, max_size=5))
    yaml_text = None
    if draw(st.booleans()):
        import yaml

        kind = draw(st.sampled_from(["mapping", "mapping", "text"]))
        if kind == "mapping":
            mapping = draw(st.dictionaries(st.sampled_from(keys), JSON_VALUES | _SETTING_VALUES, max_size=4))
            yaml_text = yaml.safe_dump(mapping)
        else:
            yaml_text = draw(st.text(max_size=60) | _SETTING_VALUES)
    return argv, yaml_text


def check_recipe_settings(case: tuple[list[str], str | None]) -> None:
    from lora.recipe import parse_settings

    argv, yaml_text = case
    cls, _ = recipe_schema()
    if yaml_text is not None:
        path = workdir() / "settings.yaml"
        path.write_text(yaml_text, encoding="utf-8", errors="surrogatepass")
        argv = ["--config", str(path), *argv]
    expect_ours("recipe_settings", parse_settings, cls, argv)


def describe(name: str, value) -> str:
    """A short text of a generated input, for reports (a mutated config: only what differs from the valid one)."""
    if name == "adapter_config":
        try:
            raw = json.loads(value)
        except (ValueError, UnicodeDecodeError):
            return repr(value)
        if isinstance(raw, dict):
            valid = reference_adapter()[0]
            changed = {k: raw.get(k, "<missing>") for k in sorted(set(raw) | set(valid))
                       if raw.get(k, "<missing>") != valid.get(k, "<missing>")}
            return f"the valid adapter_config.json with {changed!r}"
    return repr(value)


# -- running -----------------------------------------------------------------------------------------------------------
TARGETS: dict[str, tuple[Callable[[], st.SearchStrategy], Callable]] = {
    "adapter_config": (adapter_config_files, check_adapter_config),
    "adapter_weights": (adapter_weight_files, check_adapter_weights),
    "jsonl": (jsonl_files, check_jsonl),
    "data_files": (data_files, check_data_files),
    "parquet": (parquet_files, check_parquet),
    "formats": (format_records, check_format_records),
    "recipe_settings": (recipe_argvs, check_recipe_settings),
}


def run(name: str, cases: int, *, derandomize: bool = False, seed: int | None = None,
        on_failure: Callable[[PropertyFailure, object], None] | None = None) -> int:
    """Check target ``name`` on ``cases`` generated inputs; returns how many inputs were run.

    Without ``on_failure`` the first failure is raised (after Hypothesis shrinks it to a small input); with it,
    every failing input is handed to ``on_failure`` and the run goes on.
    """
    strategy, check = TARGETS[name]
    strategy()  # build the shared fixtures before timing starts
    count = 0

    @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy())
    def case(value):
        nonlocal count
        count += 1
        if on_failure is None:
            check(value)
            return
        try:
            check(value)
        except PropertyFailure as failure:
            on_failure(failure, value)

    if seed is not None:
        from hypothesis import seed as set_seed

        case = set_seed(seed)(case)
    case()
    return count
