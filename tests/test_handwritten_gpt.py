"""LoRA on a GPT written with plain torch.nn: inject, train until the loss falls, merge."""

import torch
import torch.nn.functional as F

import lora
from tiny_gpt import TinyGPT


def test_inject_train_and_merge_a_plain_gpt(tmp_path):
    torch.manual_seed(0)
    model = TinyGPT(vocab=64, dim=32, n_layers=2, block_size=32)
    lora.inject(model, lora.LoraConfig(r=8, alpha=16))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    # a learnable pattern: each sequence counts upwards modulo 64
    starts = torch.randint(0, 64, (16, 1))
    data = (starts + torch.arange(17)) % 64
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def loss_fn():
        return F.cross_entropy(model(x).reshape(-1, 64), y.reshape(-1))

    first = loss_fn().item()
    model.train()
    for _ in range(60):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    last = loss_fn().item()
    assert last < 0.5 * first, (first, last)
    for n, p in model.named_parameters():  # the base did not move
        if n in frozen:
            assert torch.equal(p, frozen[n]), n

    expected = model(x)
    lora.save_adapter(model, tmp_path / "ad")
    merged = lora.merge_and_unload(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x), expected, atol=1e-4, rtol=0)
