"""Fuzzing the parsers of user input (adapter folders, JSONL data, recipe settings): only our own clear ValueError
may escape, in time and without a large allocation. The properties live in fuzz_targets.py; bench/fuzz.py runs the
same ones with 10,000+ cases each."""

import time

import pytest

import fuzz_targets
from fuzz_targets import PropertyFailure, expect_ours, is_ours

# A few hundred cases in all, derandomized so CI is reproducible; bench/fuzz.py explores with fresh seeds.
CI_CASES = {"adapter_config": 80, "adapter_weights": 120, "jsonl": 150, "recipe_settings": 150, "data_files": 150,
            "parquet": 80, "formats": 150}


@pytest.mark.parametrize("name", sorted(fuzz_targets.TARGETS))
def test_only_our_clear_errors_escape(name):
    ran = fuzz_targets.run(name, CI_CASES[name], derandomize=True)
    assert ran >= CI_CASES[name] // 2  # the strategy really produced inputs


def _fake_package(tmp_path, monkeypatch):
    """A module inside a stand-in for the lora package, to show what the property accepts and refuses."""
    import importlib.util

    pkg = tmp_path / "lora"
    pkg.mkdir()
    (pkg / "fake.py").write_text(
        "def ours():\n    raise ValueError(\n        'adapter x is bad; re-save it')\n\n"
        "def foreign():\n    return int('x')\n\n"
        "def wrong_type():\n    return {}['missing']\n\n"
        "def silent():\n    raise ValueError('')\n")
    spec = importlib.util.spec_from_file_location("fake_lora_module", pkg / "fake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(fuzz_targets, "LORA_DIR", pkg.resolve())
    return module


def test_the_property_tells_our_errors_from_foreign_ones(tmp_path, monkeypatch):
    fake = _fake_package(tmp_path, monkeypatch)
    assert expect_ours("t", fake.ours) is None
    for call, kind in ((fake.foreign, "ValueError"), (fake.wrong_type, "KeyError"), (fake.silent, "ValueError")):
        with pytest.raises(PropertyFailure, match=kind):
            expect_ours("t", call)
    import json

    with pytest.raises(ValueError) as info:
        json.loads("{")
    assert not is_ours(info.value)  # a JSONDecodeError is a ValueError subclass, and not ours


def test_the_property_catches_a_hang_and_a_big_allocation(monkeypatch):
    monkeypatch.setattr(fuzz_targets, "TIME_LIMIT_S", 0.2)
    start = time.perf_counter()
    with pytest.raises(PropertyFailure, match="hang"):
        expect_ours("t", time.sleep, 30)
    assert time.perf_counter() - start < 5
    # the allocation below must be judged by its memory, not cut short by the hang alarm on a busy machine
    monkeypatch.setattr(fuzz_targets, "TIME_LIMIT_S", 30)
    monkeypatch.setattr(fuzz_targets, "MEMORY_LIMIT_BYTES", 64 * 1024**2)

    def allocate():
        block = bytearray(256 * 1024**2)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it counts in the RSS
        return len(block)

    with pytest.raises(PropertyFailure, match="peak memory grew"):
        expect_ours("t", allocate)


def test_a_header_claiming_a_terabyte_is_refused_before_allocation(monkeypatch):
    import struct

    monkeypatch.setattr(fuzz_targets, "MEMORY_LIMIT_BYTES", 64 * 1024**2)  # expect_ours judges each case by this
    for claim in (2**40, 2**62):
        data = struct.pack("<Q", claim) + b"{}"
        fuzz_targets.check_adapter_weights(data)  # raises PropertyFailure on an allocation or a foreign error
        header = ('{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": '
                  f'[{claim}, 16], "data_offsets": [0, {claim * 64}]}}}}').encode()
        fuzz_targets.check_adapter_weights(struct.pack("<Q", len(header)) + header + b"\0" * 64)
