"""The training loss keeps no (tokens, vocab) logits for the backward pass (issue 25), and is still exact."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import lora
from lora.data import IGNORE, collate
from lora.train.objective import BatchLoss


def make_model(vocab: int, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def batch_of(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for length in (24, 17):
        ids = torch.randint(1, vocab, (length + 1,), generator=g).tolist()
        targets = ids[1:]
        targets[:5] = [IGNORE] * 5  # a masked prompt
        rows.append({"input_ids": ids[:-1], "targets": targets})
    return collate(rows, pad_id=0)


def objective_for(model, chunk: int) -> BatchLoss:
    objective = BatchLoss(model, "lm", loss_chunk=chunk)
    objective.parts = objective.candidate  # the label-only shortcut, as the probe turns it on for Llama
    return objective


def reference_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum")


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_the_loss_and_its_gradients_equal_full_logit_cross_entropy(chunk, tie):
    model, batch = make_model(64, tie), batch_of(64)
    expected = reference_loss(model, batch)
    (expected * 0.37).backward()  # a scale, as the trainer's 1 / target tokens
    want = lora_grads(model)
    model.zero_grad(set_to_none=True)
    got = objective_for(model, chunk)(batch)
    (got * 0.37).backward()
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    for name, g in lora_grads(model).items():
        torch.testing.assert_close(g, want[name], atol=1e-6, rtol=1e-5, msg=name)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def kept_bytes(fn, model) -> int:
    """Bytes that the graph of ``fn()``'s output keeps for the backward pass, parameters left out (tensors saved
    only by a graph that is gone by then, such as one chunk's, do not count)."""
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    params = {p.data_ptr() for p in model.parameters()}
    alive = {t.data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in saved) if t is not None}
    del out
    return sum(n for ptr, n in alive.items() if ptr not in params)


def test_what_training_keeps_for_the_backward_pass_does_not_grow_with_the_vocabulary():
    kept = {}
    for vocab in (256, 8192):
        model, batch = make_model(vocab), batch_of(vocab)
        objective = objective_for(model, chunk=8)
        kept[vocab] = kept_bytes(lambda: objective(batch), model)
    targets = int((batch["targets"] != IGNORE).sum())
    # 32 times the vocabulary, and not a byte more kept (the logits alone would be targets x vocab x 4 bytes)
    assert kept[8192] == kept[256], kept
    # the path a trainable head takes keeps them, which the measure sees
    model.lm_head.weight.requires_grad_(True)
    assert kept_bytes(lambda: objective(batch), model) > kept[8192] + targets * 8192 * 4


def test_a_trainable_head_keeps_the_chunked_autograd_path():
    """A head that trains (modules_to_save) needs its own weight gradient, which the fused path does not form: the
    loss still matches, through autograd."""
    model, batch = make_model(64, tie=False), batch_of(64)
    model.lm_head.weight.requires_grad_(True)
    expected = reference_loss(model, batch)
    expected.backward()
    want = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    objective_for(model, chunk=5)(batch).backward()
    torch.testing.assert_close(model.lm_head.weight.grad, want, atol=1e-6, rtol=1e-5)


def test_evaluation_under_no_grad_gives_the_same_loss():
    model, batch = make_model(64), batch_of(64)
    with torch.no_grad():
        assert float(objective_for(model, 5)(batch)) == pytest.approx(float(reference_loss(model, batch)), rel=1e-6)
