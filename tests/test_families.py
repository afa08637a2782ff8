"""The family matrix: every model family people fine-tune trains, loads in PEFT, merges and exports the same model.

Tiny random models from tests/families.py (built offline from transformers' config classes). GGUF export per family
is tested in test_gguf_families.py; the mixture-of-experts families (their experts adapted through target_parameters)
here, where it is refused with the route that works.
"""

import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import lora
from conftest import make_bpe_tokenizer
from families import EXPERTS, FAMILIES, MOE_FAMILIES, make_family
from lora.cli import main
from lora.data import IGNORE, collate, load_dataset, model_inputs

PAIRS = [("the capital of France", "Paris"), ("the quick brown fox", "jumps over the lazy dog"),
         ("order number", "AB-12345"), ("hello", "world"), ("a tiny tokenizer", "for tests"),
         ("Lisbon is", "the capital of Portugal"), ("this is", "a test"), ("the lazy dog", "sleeps")]


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    data, _ = load_dataset(path, tokenizer)
    return data


def logits_loss(model, batch) -> float:
    """Mean token loss straight from the model's own logits: what every training loss must equal."""
    logits = model(**model_inputs(batch)).logits
    return float(F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE))


ALL = list(FAMILIES) + list(MOE_FAMILIES)


def family_config(family: str) -> lora.LoraConfig:
    """All-linear; a mixture-of-experts model's expert stacks too (all-linear alone leaves them out, and says so)."""
    return lora.LoraConfig(r=4, alpha=8, target_parameters=EXPERTS if family in MOE_FAMILIES else ())


@pytest.mark.parametrize("family", ALL)
def test_family_trains_and_its_adapter_loads_merges_and_exports(family, tokenizer, examples, tmp_path):
    base = make_family(family, tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = make_family(family, tokenizer)
    lora.inject(model, family_config(family))
    assert lora.parameter_count(model)["trainable"] > 0
    cfg = lora.TrainConfig(output_dir=str(tmp_path / "out"), max_steps=3, batch_size=4, learning_rate=1e-2,
                           warmup_ratio=0.0, log_every=1, seq_len=64)
    trainer = lora.Trainer(model, cfg, examples)
    # The loss the trainer differentiates is the model's own (Gemma soft-caps its logits, Granite scales them).
    batch = trainer.batches.make(examples[:4])
    model.eval()
    with torch.no_grad():
        ours = float(trainer.objective(batch)) / int((batch["targets"] != IGNORE).sum())
        assert ours == pytest.approx(logits_loss(model, batch), rel=1e-5)
    result = trainer.train()
    assert result.steps == 3 and all(v.abs().sum() > 0 for k, v in lora.adapter_state_dict(model).items()
                                     if "lora_B" in k)
    model.eval()
    ids = torch.tensor([tokenizer("the quick brown fox jumps")["input_ids"]])
    with torch.no_grad():
        expected = model(ids).logits
    lora.save_adapter(model, tmp_path / "adapter")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_family(family, tokenizer), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=1e-5)

    main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
          "--out", str(tmp_path / "merged")])
    # W x + B A x and (W + B A) x differ by fp32 rounding, which scales with the logits (gpt-oss: 1.2e-5 at 5.2)
    atol = 1e-5 * max(1.0, float(expected.abs().max()))
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(loaded(ids).logits, expected, atol=atol, rtol=1e-5)
        torch.testing.assert_close(lora.merge_and_unload(model)(ids).logits, expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("family", ALL)
def test_packing_gives_the_loss_of_padded_rows_or_is_turned_off(family, tokenizer, examples, tmp_path, capsys):
    """With all the data in one step, the first step's loss is the same packed or padded: packing is used only
    where the model keeps packed examples apart (Bloom's ALiBi attention does not, nor gpt-oss's eager attention
    with sinks, which transformers runs without SDPA)."""
    losses, rows = {}, {}
    for packing in (True, False):
        model = make_family(family, tokenizer)
        torch.manual_seed(0)
        lora.inject(model, family_config(family))
        cfg = lora.TrainConfig(output_dir=str(tmp_path / str(packing)), max_steps=1, batch_size=len(examples),
                               log_every=1, seq_len=64, packing=packing)
        trainer = lora.Trainer(model, cfg, examples)
        trainer.train()
        losses[packing], rows[packing] = trainer.history[0]["loss"], len(trainer.rows)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("packing off")]
    if family in ("bloom", "gpt_oss"):
        assert rows[True] == len(examples) and len(notices) == 1 and "does not keep packed examples apart" in notices[0]
    else:
        assert rows[True] < len(examples) and not notices


def test_the_loss_shortcut_is_used_only_where_it_equals_the_model_logits(tokenizer, examples):
    from lora.train.objective import BatchLoss

    batch = collate(examples[:2], tokenizer.pad_token_id)
    decided = {}
    for family in ("llama3", "gemma2", "granite"):
        objective = BatchLoss(make_family(family, tokenizer), "lm", loss_chunk=8)
        decided[family] = objective.check_shortcut(batch)[0]
    assert decided == {"llama3": True, "gemma2": False, "granite": False}


def test_the_packing_probe_sees_a_model_mix_examples_whatever_comes_first(tokenizer, examples, tmp_path, capsys):
    """Two long examples first, which cannot share a row: the probe still packs the shortest ones and finds out."""
    long = {"input_ids": list(range(3, 43)), "targets": list(range(4, 43)) + [IGNORE]}  # 40 of 64 tokens
    data = [long, dict(long)] + list(examples)
    model = make_family("bloom", tokenizer)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    trainer = lora.Trainer(model, lora.TrainConfig(output_dir=str(tmp_path), seq_len=64), data)
    assert trainer.rows is data
    assert "does not keep packed examples apart" in capsys.readouterr().out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_family_gguf_is_refused_naming_the_route_that_works(family, tokenizer, tmp_path):
    """The gguf package has these architectures, but this exporter does not write expert tensors: refused, with the
    route that works (the merged folder, which the test above checks, then llama.cpp's converter)."""
    from families import save_base_and_adapter
    from lora.export import export_gguf

    save_base_and_adapter(tmp_path, make_family(family, tokenizer), tokenizer, target_parameters=EXPERTS)
    with pytest.raises(ValueError, match=rf"{family}' model\. Export a merged folder instead \(lora merge\) and "
                                         rf"convert it with llama.cpp's convert_hf_to_gguf.py"):
        export_gguf(tmp_path / "base", tmp_path / "model.gguf", tmp_path / "adapter", verify=False)
    assert not (tmp_path / "model.gguf").exists()
