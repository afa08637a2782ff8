"""Every merge and GGUF export checks what it wrote: right ones pass with their max |dlogit|, wrong ones are refused
and leave the previous output in place."""

import hashlib
import json
import re
import shutil

import pytest
import torch

import lora
import lora.export
from lora.cli import main
from lora.export import export_gguf, export_merged
from lora.export.verify import TOLERANCES, artifact_dtype, round_as, stored_as, verify_export
from conftest import make_bpe_tokenizer, make_gpt2, make_llama_for, randomize_adapters

FIGURE = re.compile(r"checked (?P<name>\S+).*: max \|dlogit\| (?P<error>\S+) against the (?P<what>adapter|base) "
                    r"model(, (?P<rounded>\S+) against it rounded as stored)? "
                    r"\(tolerance (?P<tolerance>\S+) for (?P<dtype>\w+)\)")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a shared two-core machine OpenMP's second one mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_base_and_adapter(folder, model, tokenizer=None, std=0.2):
    """``model`` saved as ``folder/base``, a trained-looking adapter as ``adapter``, the same with its scale doubled
    (alpha x 2: the classic wrong merge) as ``adapter_x2``."""
    model.save_pretrained(folder / "base")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / "base")
    model = model.float()
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    randomize_adapters(model, std=std)
    lora.save_adapter(model, folder / "adapter")
    shutil.copytree(folder / "adapter", folder / "adapter_x2")
    config = json.loads((folder / "adapter_x2" / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (folder / "adapter_x2" / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tokenizer = make_bpe_tokenizer()
    return save_base_and_adapter(tmp_path_factory.mktemp("llama"), make_llama_for(tokenizer), tokenizer)


def figure(out: str) -> dict:
    """The check's printed figures; ``held`` is the one held to the tolerance."""
    match = FIGURE.search(out)
    assert match, out
    return {**match.groupdict(), "held": float(match["rounded"] or match["error"])}


def digest(path):
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def no_leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_a_right_merge_passes_and_prints_its_figure(llama, tmp_path, capsys):
    export_merged(llama / "base", llama / "adapter", tmp_path / "merged")
    got = figure(capsys.readouterr().out)
    assert got["name"] == str(tmp_path / "merged") and got["dtype"] == "f32" and got["what"] == "adapter"
    assert float(got["error"]) < float(got["tolerance"])
    check = verify_export(llama / "base", llama / "adapter", tmp_path / "merged")
    assert check.max_dlogit < check.tolerance < check.adapter_effect / 100  # the check would see the adapter missing


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_a_right_gguf_passes_and_prints_its_figure(llama, tmp_path, capsys, dtype):
    path = export_gguf(llama / "base", tmp_path / "model.gguf", llama / "adapter", dtype=dtype)
    got = figure(capsys.readouterr().out)
    assert got["name"] == str(path) and got["dtype"] == dtype and artifact_dtype(path) == dtype
    assert got["held"] < float(got["tolerance"])
    if dtype != "f32":  # rounding moves logits, but the reference rounded the same way matches to float32 rounding
        assert float(got["error"]) > 1e-3 and got["held"] < 1e-4
    assert no_leftovers(tmp_path)


def test_q8_0_rounding_does_not_hide_a_small_adapter_with_its_scale_doubled(tmp_path, monkeypatch, capsys):
    """An adapter that moves logits about as much as q8_0's rounding does (like smollm2-135m's after 3 steps): the
    figure against the adapter model cannot tell a right export from a doubled scale; against the adapter model
    rounded as stored it can."""
    tokenizer = make_bpe_tokenizer()
    small = save_base_and_adapter(tmp_path, make_llama_for(tokenizer, seed=2), tokenizer, std=0.02)
    check = verify_export(small / "base", small / "adapter",
                          export_gguf(small / "base", tmp_path / "right.gguf", small / "adapter", "q8_0"))
    assert check.max_dlogit > check.adapter_effect / 2 and check.rounded_dlogit < check.tolerance
    merge_with(small / "adapter_x2", monkeypatch)
    with pytest.raises(ValueError) as caught:
        export_gguf(small / "base", tmp_path / "x2.gguf", small / "adapter", "q8_0")
    error, held, tolerance = map(float, re.search(r"up to (\S+) away .*, (\S+) once .* > tolerance (\S+),",
                                                  str(caught.value)).groups())
    assert error < 2 * check.max_dlogit and held > 10 * tolerance


def test_how_a_weight_was_stored_is_read_off_its_values():
    import gguf

    weight = torch.randn(64, 96)
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    as_q8_0 = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), q8_0), q8_0))
    assert [stored_as(w) for w in (weight, weight.half().float(), weight.bfloat16().float(), as_q8_0,
                                   as_q8_0.T.contiguous())] == ["f32", "f16", "bf16", "q8_0", "q8_0_t"]
    for how in ("f16", "bf16", "q8_0"):
        assert torch.equal(round_as(weight, how), {"f16": weight.half().float(), "bf16": weight.bfloat16().float(),
                                                   "q8_0": as_q8_0}[how])
    assert torch.equal(round_as(weight.T, "q8_0_t"), as_q8_0.T)


def test_a_right_bf16_merge_and_a_tokenizerless_gpt2_merge_pass(tmp_path, capsys, monkeypatch):
    tokenizer = make_bpe_tokenizer()
    bf16 = save_base_and_adapter(tmp_path / "bf16", make_llama_for(tokenizer).to(torch.bfloat16), tokenizer)
    export_merged(bf16 / "base", bf16 / "adapter", tmp_path / "merged_bf16")  # keeps the base's bf16
    assert figure(capsys.readouterr().out)["dtype"] == "bf16"
    export_gguf(bf16 / "base", tmp_path / "bf16.gguf", bf16 / "adapter", "q8_0")  # rounded twice: bf16, then q8_0
    assert figure(capsys.readouterr().out)["held"] == 0
    gpt2 = save_base_and_adapter(tmp_path / "gpt2", make_gpt2())  # Conv1D; no tokenizer: fixed ids instead
    export_merged(gpt2 / "base", gpt2 / "adapter", tmp_path / "merged_gpt2")
    assert figure(capsys.readouterr().out)["dtype"] == "f32"
    merge_with(gpt2 / "adapter_x2", monkeypatch)
    with pytest.raises(ValueError, match="export check failed"):
        export_merged(gpt2 / "base", gpt2 / "adapter", tmp_path / "x2")
    assert not (tmp_path / "x2").exists()


def merge_with(adapter, monkeypatch):
    """Make the exporters merge ``adapter`` whatever adapter they are given: a wrong export to catch."""
    merged_tensors = lora.export.merged_tensors
    for writer in (lora.export.merged, lora.export.gguf_writer):  # each streams the base through it
        monkeypatch.setattr(writer, "merged_tensors",
                            lambda folder, _, check_base=True, merger=None: merged_tensors(folder, adapter, check_base))


def test_a_merge_with_the_scale_doubled_is_refused_and_the_previous_output_stays(llama, tmp_path, monkeypatch):
    out = export_merged(llama / "base", llama / "adapter", tmp_path / "merged")
    before = digest(out)
    merge_with(llama / "adapter_x2", monkeypatch)
    with pytest.raises(ValueError) as caught:
        export_merged(llama / "base", llama / "adapter", out)
    message = str(caught.value)
    assert message.startswith(f"export check failed: {out} (f32)")
    error, tolerance = re.search(r"max \|dlogit\| (\S+) > tolerance (\S+),", message).groups()
    assert float(error) > 100 * float(tolerance)
    assert "not kept: an earlier output under that name is untouched" in message and "--no-verify" in message
    assert digest(out) == before and no_leftovers(tmp_path)


@pytest.mark.parametrize("dtype, broken", [("f32", "no Q/K permutation"), ("q8_0", "no Q/K permutation"),
                                           ("q8_0", "scale doubled")])
def test_a_wrong_gguf_is_refused_and_the_previous_file_stays(llama, tmp_path, monkeypatch, dtype, broken):
    path = export_gguf(llama / "base", tmp_path / "model.gguf", llama / "adapter", dtype=dtype)
    before = digest(path)
    if broken == "scale doubled":
        merge_with(llama / "adapter_x2", monkeypatch)
    else:
        monkeypatch.setattr(lora.export.gguf_writer, "permute_for_llama_cpp", lambda weight, n_head: weight)
    with pytest.raises(ValueError, match=rf"export check failed: {re.escape(str(path))} \({dtype}\) .*max \|dlogit\| "
                                         rf"\S+ > tolerance \S+, which is {TOLERANCES[dtype]:g} x the largest"):
        export_gguf(llama / "base", path, llama / "adapter", dtype=dtype)
    assert digest(path) == before and no_leftovers(tmp_path)
    export_gguf(llama / "base", path, llama / "adapter", dtype=dtype, verify=False)  # unchecked, it is written
    assert digest(path) != before


def test_cli_prints_the_figure_and_no_verify_skips_the_check(llama, tmp_path, monkeypatch, capsys):
    base, adapter, out = str(llama / "base"), str(llama / "adapter"), tmp_path / "merged"
    assert main(["merge", "--model", base, "--adapter", adapter, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert figure(printed)["held"] < 1e-4 and "merged model written to" in printed
    before = digest(out)
    merge_with(llama / "adapter_x2", monkeypatch)
    assert main(["merge", "--model", base, "--adapter", adapter, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lora merge: error: export check failed: {out} (f32)") and len(err.splitlines()) == 1
    assert digest(out) == before
    assert main(["merge", "--model", base, "--adapter", adapter, "--out", str(out), "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert "max |dlogit|" not in printed and "not checked (--no-verify)" in printed
    assert digest(out) != before  # the wrong merge went through unchecked
    gguf = tmp_path / "model.gguf"
    assert main(["export", "gguf", "--model", base, "--adapter", adapter, "--out", str(gguf), "--dtype", "f32",
                 "--no-verify"]) == 0
    assert "max |dlogit|" not in capsys.readouterr().out and gguf.is_file()


def test_cli_adapter_only_checks_the_base_gguf_with_the_adapter_gguf(llama, tmp_path, monkeypatch, capsys):
    args = ["export", "gguf", "--model", str(llama / "base"), "--adapter", str(llama / "adapter"), "--adapter-only",
            "--out", str(tmp_path / "model.gguf"), "--dtype", "q8_0"]
    assert main(args) == 0
    lines = [figure(line) for line in capsys.readouterr().out.splitlines() if "max |dlogit|" in line]
    assert [(line["name"], line["what"], line["dtype"]) for line in lines] == [
        (str(tmp_path / "model.gguf"), "base", "q8_0"), (str(tmp_path / "model.gguf"), "adapter", "q8_0")]
    assert all(line["held"] < float(line["tolerance"]) for line in lines)
    adapter_file = tmp_path / "model.adapter.gguf"
    before = digest(adapter_file)
    export_adapter_gguf = lora.export.export_adapter_gguf  # now write the adapter GGUF with its scale doubled
    monkeypatch.setattr(lora.export.checked, "export_adapter_gguf", lambda model, _, out, check_base=True:
                        export_adapter_gguf(model, llama / "adapter_x2", out, check_base))
    assert main(args) == 2
    assert "export check failed: " + str(tmp_path / "model.gguf") + " + model.adapter.gguf" in capsys.readouterr().err
    assert digest(adapter_file) == before and no_leftovers(tmp_path)


def test_an_adapter_gguf_that_cannot_be_applied_is_refused(llama, tmp_path):
    """Checking the base alone would pass whatever the adapter file holds."""
    import gguf

    base_gguf = export_gguf(llama / "base", tmp_path / "model.gguf", dtype="f32", verify=False)
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "llama")  # an update for a layer the model does not have
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 4.0)
    writer.add_tensor("blk.7.attn_q.weight.lora_a", torch.zeros(4, 32).numpy())
    writer.add_tensor("blk.7.attn_q.weight.lora_b", torch.zeros(32, 4).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match=r"the adapter GGUF could not be applied .*\(no layer .*--no-verify"):
        verify_export(llama / "base", llama / "adapter", base_gguf, adapter_gguf=tmp_path / "odd.gguf")


def test_a_gpt2_adapter_gguf_is_applied_to_its_conv1d_layers_and_checked(tmp_path):
    from lora.export import export_adapter_gguf

    gpt2 = save_base_and_adapter(tmp_path / "gpt2", make_gpt2())
    base_gguf = export_gguf(gpt2 / "base", tmp_path / "model.gguf", dtype="f32", verify=False)
    for adapter, right in (("adapter", True), ("adapter_x2", False)):
        adapter_gguf = export_adapter_gguf(gpt2 / "base", gpt2 / adapter, tmp_path / f"{adapter}.gguf")
        if right:
            check = verify_export(gpt2 / "base", gpt2 / "adapter", base_gguf, adapter_gguf=adapter_gguf)
            assert check.compared_with == "the adapter model" and check.max_dlogit < check.tolerance
        else:
            with pytest.raises(ValueError, match="export check failed"):
                verify_export(gpt2 / "base", gpt2 / "adapter", base_gguf, adapter_gguf=adapter_gguf)


