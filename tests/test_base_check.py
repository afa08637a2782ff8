"""An adapter is refused by every path that applies it to a base other than its own (issue 9): load_adapter,
merge_state_dict, `lora merge` and `lora export gguf` — on tiny models and on the real embedded model against a copy
of it fine-tuned for three steps, which sampled values within a loose tolerance could not tell apart."""

import json

import pytest
import torch

import lora
from lora.cli import main
from lora.export import export_adapter_gguf, export_gguf, export_merged
from conftest import make_bpe_tokenizer, make_llama_for, randomize_adapters


def fine_tune_in_full(model, steps: int = 3, lr: float = 1e-5, vocab: int | None = None) -> None:
    """A few AdamW steps on every weight: what a user's full fine-tune of the base does first."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab or model.config.vocab_size, (1, 16), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def adapter_for(model, path):
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    randomize_adapters(model)
    lora.save_adapter(model, path)
    return lora.merge_and_unload(model)


def test_every_path_refuses_a_tiny_fine_tuned_copy_and_accepts_the_base(tmp_path, capsys):
    tok = make_bpe_tokenizer()
    for name in ("base", "tuned"):
        model = make_llama_for(tok)
        if name == "tuned":
            fine_tune_in_full(model)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    adapter_for(make_llama_for(tok), tmp_path / "ad")
    tuned = make_llama_for(tok)
    fine_tune_in_full(tuned)

    different = "trained on a different base model.*check_base=False"
    with pytest.raises(ValueError, match=different):
        lora.load_adapter(tuned, tmp_path / "ad")
    with pytest.raises(ValueError, match=different):
        lora.merge_state_dict(tuned.state_dict(), tmp_path / "ad")
    with pytest.raises(ValueError, match=different):
        export_merged(tmp_path / "tuned", tmp_path / "ad", tmp_path / "merged")
    with pytest.raises(ValueError, match=different):
        export_gguf(tmp_path / "tuned", tmp_path / "model.gguf", tmp_path / "ad")
    with pytest.raises(ValueError, match=different):
        export_adapter_gguf(tmp_path / "tuned", tmp_path / "ad", tmp_path / "ad.gguf")
    assert main(["merge", "--model", str(tmp_path / "tuned"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "merged")]) == 2
    assert "trained on a different base model" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob("*.gguf"))  # nothing half-written

    # the base it was trained on passes, in its own dtype and as a bf16 copy; the check can be skipped
    export_merged(tmp_path / "base", tmp_path / "ad", tmp_path / "merged")
    lora.merge_state_dict({k: v.to(torch.bfloat16) for k, v in make_llama_for(tok).state_dict().items()},
                          tmp_path / "ad")
    lora.load_adapter(make_llama_for(tok).to(torch.float16), tmp_path / "ad")
    lora.merge_state_dict(tuned.state_dict(), tmp_path / "ad", check_base=False)


def test_fingerprints_written_before_the_dtype_was_recorded_still_work(tmp_path):
    tok = make_bpe_tokenizer()
    adapter_for(make_llama_for(tok), tmp_path / "ad")
    config_file = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    # version 1 wrote {path: values rounded to 6 significant digits}
    config["base_model_fingerprint"] = {p: [float(f"{v:.6g}") for v in values]
                                        for p, values in config["base_model_fingerprint"]["values"].items()}
    config_file.write_text(json.dumps(config))
    lora.load_adapter(make_llama_for(tok), tmp_path / "ad")
    with pytest.raises(ValueError, match="different base model"):
        lora.load_adapter(make_llama_for(tok, seed=1), tmp_path / "ad")


def test_the_embedded_model_refuses_an_adapter_of_its_fine_tuned_copy(tmp_path):
    """The real pair: SmolLM2-135M and the same model after three full fine-tuning steps at lr 1e-5."""
    model, tokenizer = lora.load_model("smollm2-135m")
    tuned, _ = lora.load_model("smollm2-135m")
    fine_tune_in_full(tuned)
    moved = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), tuned.state_dict().values()))
    assert 0 < moved < 1e-3  # a small move: a relative tolerance of a few percent would not see it
    tuned_weights = {k: v.clone() for k, v in tuned.state_dict().items()}
    lora.inject(tuned, lora.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize_adapters(tuned)
    lora.save_adapter(tuned, tmp_path / "ad")

    with pytest.raises(ValueError, match="trained on a different base model"):
        lora.load_adapter(model, tmp_path / "ad")
    with pytest.raises(ValueError, match="trained on a different base model"):
        export_merged("smollm2-135m", tmp_path / "ad", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    lora.merge_state_dict(tuned_weights, tmp_path / "ad")  # its own base passes
