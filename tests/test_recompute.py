"""Gradient checkpointing for any nn.Module (issue 25): the repeated blocks are found by structure, recomputed in the
backward pass, and the loss and gradients equal those of the run without it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora
from lora.train import TrainConfig, Trainer
from lora.train.recompute import enable_gradient_checkpointing, recompute_blocks, repeated_blocks, stop_recomputing
from conftest import VOCAB, make_llama
from tiny_gpt import Block, TinyGPT


def tiny_gpt(dropout: float = 0.0) -> TinyGPT:
    torch.manual_seed(0)
    model = TinyGPT(vocab=VOCAB, dim=32, heads=2, n_layers=3, block_size=32)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, dropout=dropout))
    with torch.no_grad():  # B = 0 would leave every gradient but B's zero: make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def loss_and_grads(model: nn.Module, ids: torch.Tensor, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    out = model(ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids)
    (out if isinstance(out, torch.Tensor) else out.logits).sum().backward()
    return total[0]


IDS = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def test_the_repeated_blocks_of_a_hand_written_gpt_are_found_by_structure():
    model = tiny_gpt()
    assert repeated_blocks(model) == list(model.blocks)
    # the outermost repeated blocks only: a list inside a block is recomputed with it
    inner = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    outer = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), inner), nn.Sequential(nn.Linear(4, 4))])
    assert repeated_blocks(outer) == list(outer)
    # neither single linear layers (an MLP's) nor parameter-free activations are blocks
    assert repeated_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())) == []


def test_a_sequential_of_unlike_layers_has_no_blocks_and_is_refused():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8))
    assert repeated_blocks(mlp) == []
    with pytest.raises(ValueError, match="no repeated blocks"):
        enable_gradient_checkpointing(mlp)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recomputed_hand_written_gpt_has_the_same_loss_and_gradients(dropout):
    model = tiny_gpt(dropout)
    expected_loss, expected = loss_and_grads(model, IDS)
    assert enable_gradient_checkpointing(model) == "blocks"
    loss, got = loss_and_grads(model, IDS)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_recomputation_really_happens_and_keeps_less():
    model = tiny_gpt()
    plain = saved_bytes(model, IDS)
    calls = []
    model.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    recompute_blocks(model)
    kept = saved_bytes(model, IDS)
    assert len(calls) == 2  # the forward, and again in the backward pass
    assert kept < 0.5 * plain, (kept, plain)
    # no_grad (evaluation) runs the block once and saves nothing either way
    calls.clear()
    with torch.no_grad():
        model(IDS)
    assert len(calls) == 1
    stop_recomputing(model)
    assert saved_bytes(model, IDS) == plain
    assert "forward" not in vars(model.blocks[0])


def test_recomputing_keeps_module_paths_and_adapter_keys(tmp_path):
    model = tiny_gpt()
    before = list(lora.adapter_state_dict(model))
    names = [n for n, _ in model.named_modules()]
    recompute_blocks(model)
    recompute_blocks(model)  # idempotent: wrapped once
    assert [n for n, _ in model.named_modules()] == names
    assert list(lora.adapter_state_dict(model)) == before
    assert isinstance(model.blocks[1], Block)


def test_a_hugging_face_model_gives_the_same_gradients_both_ways():
    """Its own switch and the structural one both equal the run without checkpointing: HF models keep their own
    (it also turns off the KV cache), the structural one is exact on them too."""
    results = []
    for how in ("none", "hf", "blocks"):
        model = make_llama(tie=True).train()
        model.config.use_cache = False
        torch.manual_seed(0)
        lora.inject(model, lora.LoraConfig(r=4, alpha=8, dropout=0.1))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        if how == "hf":
            assert enable_gradient_checkpointing(model) == "hf"
        elif how == "blocks":
            assert repeated_blocks(model) == list(model.model.layers)
            recompute_blocks(model)
        results.append(loss_and_grads(model, IDS))
    (loss0, g0), *others = results
    for loss, g in others:
        assert loss == pytest.approx(loss0, rel=1e-6)
        for name in g0:
            torch.testing.assert_close(g[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_trainer_checkpoints_a_hand_written_gpt(tmp_path):
    """TrainConfig(gradient_checkpointing=True) on a model with no gradient_checkpointing_enable: the same steps."""
    starts = torch.randint(0, VOCAB, (8, 1), generator=torch.Generator().manual_seed(2))
    rows = ((starts + torch.arange(17)) % VOCAB).tolist()
    examples = [{"input_ids": r[:-1], "targets": r[1:]} for r in rows]
    adapters = []
    for checkpointing in (False, True):
        model = tiny_gpt(dropout=0.1)
        cfg = TrainConfig(output_dir=str(tmp_path / str(checkpointing)), batch_size=4, max_steps=2, seq_len=32,
                          gradient_checkpointing=checkpointing, log_every=1)
        result = Trainer(model, cfg, examples).train()
        assert result.steps == 2
        adapters.append(lora.adapter_state_dict(model))
    assert any(getattr(m, "_lora_recomputed", False) for m in model.modules())
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, atol=1e-6, rtol=1e-5, msg=key)
