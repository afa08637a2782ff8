"""QLoRA (issue 12): a 4-bit NF4 base trains; merging and export use the full-precision base, never the 4-bit copy."""

import pytest
import torch

import lora
from lora.data import load_dataset
from lora.export import export_merged
from lora.inject import lora_layers
from lora.train import TrainConfig, Trainer
from conftest import make_char_tokenizer, make_llama_for
from test_trainer import write_task


def weight_bytes(model):
    total = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and w is not None:
            inner = [getattr(w, n) for n in ("quantized_data", "quantized_scalers", "quantization_factor")
                     if hasattr(w, n)]
            total += sum(t.numel() * t.element_size() for t in inner) or w.numel() * w.element_size()
    return total


def test_nf4_base_trains_and_merges_into_the_full_precision_base(tmp_path):
    tok = make_char_tokenizer()
    full = make_llama_for(tok)
    full.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, _ = lora.load_model(tmp_path / "base", quantize="nf4")
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "NF4Tensor"
    assert weight_bytes(model.model.layers) < 0.2 * weight_bytes(full.model.layers)  # ~4 bits a weight, not 32
    ids = torch.tensor([[5, 9, 14, 20, 33]])
    with torch.no_grad():
        reference, quantized = full(ids).logits, model(ids).logits
    w = full.model.layers[0].mlp.up_proj.weight.detach()
    dequantized = model.model.layers[0].mlp.up_proj.weight.get_original_weight()
    assert 0 < float((dequantized - w).norm() / w.norm()) < 0.15  # NF4's rounding: close, not equal
    assert float((quantized - reference).norm() / reference.norm()) < 0.3

    with pytest.raises(ValueError, match=r"init='pissa' rewrites the base weight.*4-bit base \(quantize='nf4'\)"):
        lora.inject(model, lora.LoraConfig(r=4, alpha=8, init="pissa"))
    assert not list(lora_layers(model))  # nothing left half-wrapped
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    examples, _ = load_dataset(write_task(tmp_path / "task.jsonl"), tok)
    trainer = Trainer(model, TrainConfig(output_dir=str(tmp_path / "run"), max_steps=12, batch_size=4,
                                         learning_rate=1e-2, seq_len=96), examples, eval_data=examples[:8])
    before = trainer.evaluate()["eval_loss"]
    assert trainer.train().eval_loss < 0.8 * before
    lora.save_adapter(model, tmp_path / "adapter")

    with pytest.raises(ValueError, match="4-bit.*Merge into the full-precision base"):
        lora.merge(model)
    # the adapter carries the full-precision base's fingerprint, so the original base takes it without override
    merged = export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    expected = lora.load_model(tmp_path / "base")[0]
    lora.load_adapter(expected, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(ids).logits, expected(ids).logits,
                                   atol=1e-5, rtol=0)


def test_unknown_quantization_is_refused(tmp_path):
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        lora.load_model("smollm2-135m", quantize="int3")


def test_nf4_on_a_model_without_nn_linear_layers_is_refused(tmp_path):
    from conftest import make_gpt2

    make_gpt2().save_pretrained(tmp_path / "gpt2")
    make_char_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"found no nn.Linear layer.*\['Conv1D'\].*load it without quantize"):
        lora.load_model(tmp_path / "gpt2", quantize="nf4")
