"""Sampling: greedy equivalences, frequencies that match softmax(logits / T), the nucleus bound, batching, EOS."""

import pytest
import torch
from torch import nn

import lora
from lora.generate import filter_logits, generate
from conftest import make_llama_for, randomize_adapters
from tiny_gpt import TinyGPT


class FixedLogits(nn.Module):
    """Returns the same next-token logits at every position, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32), requires_grad=False)

    def forward(self, ids):
        return self.logits.expand(ids.shape[0], ids.shape[1], -1)


def greedy_by_hand(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_temperature_zero_and_top_k_one_are_greedy():
    torch.manual_seed(0)
    model = TinyGPT().eval()
    prompt = torch.randint(0, 64, (3, 5))
    expected = greedy_by_hand(model, prompt, 6)
    assert torch.equal(lora.generate(model, None, prompt, max_new_tokens=6, temperature=0), expected)
    assert torch.equal(lora.generate(model, None, prompt, max_new_tokens=6, temperature=1.3, top_k=1, seed=3),
                       expected)


def test_sampled_frequencies_match_softmax_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    model = FixedLogits(logits)
    n, temperature = 40_000, 0.8
    out = lora.generate(model, None, torch.zeros(n, 1, dtype=torch.long), max_new_tokens=1,
                        temperature=temperature, top_k=0, top_p=1.0, seed=0)
    freq = torch.bincount(out[:, 1], minlength=5).float() / n
    # binomial standard error is below 0.0025 here; 0.01 is four of those
    torch.testing.assert_close(freq, (logits / temperature).softmax(-1), atol=0.01, rtol=0)


def test_top_p_never_samples_outside_the_nucleus():
    probs = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05])
    model = FixedLogits(probs.log())
    out = lora.generate(model, None, torch.zeros(5000, 1, dtype=torch.long), max_new_tokens=1, temperature=1.0,
                        top_k=0, top_p=0.6, seed=0)
    drawn = set(out[:, 1].tolist())
    assert drawn == {0, 1}  # 0.45 < 0.6 <= 0.45 + 0.25: the nucleus is the two most likely tokens
    kept = filter_logits(probs.log()[None], top_k=2, top_p=1.0)
    assert torch.isinf(kept[0, 2:]).all() and torch.isfinite(kept[0, :2]).all()


def test_seed_makes_sampling_repeatable():
    model = FixedLogits(torch.zeros(10))
    prompt = torch.zeros(50, 1, dtype=torch.long)
    a = lora.generate(model, None, prompt, max_new_tokens=3, temperature=1.0, seed=7)
    b = lora.generate(model, None, prompt, max_new_tokens=3, temperature=1.0, seed=7)
    assert torch.equal(a, b)


def test_generation_stops_at_eos_and_pads_finished_rows():
    logits = torch.full((10,), -10.0)
    logits[4] = 10.0  # the model always says token 4
    out = lora.generate(FixedLogits(logits), None, torch.zeros(2, 3, dtype=torch.long), max_new_tokens=5,
                        temperature=0, eos_token_id=4)
    assert out.shape == (2, 4) and out[:, 3].tolist() == [4, 4]


def test_batched_text_prompts_equal_one_by_one_on_a_hf_model(char_tokenizer):
    model = make_llama_for(char_tokenizer)
    prompts = ["hi", "a much longer prompt"]
    batched = lora.generate(model, char_tokenizer, prompts, max_new_tokens=8, temperature=0)
    single = [lora.generate(model, char_tokenizer, p, max_new_tokens=8, temperature=0) for p in prompts]
    assert isinstance(batched, list) and batched == single
    assert all(isinstance(s, str) and s for s in single)
    # the KV-cached loop produces what a full re-computation would
    ids = char_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    by_hand = greedy_by_hand(lambda x: model(x).logits, ids, 8)
    assert lora.generate(model, char_tokenizer, ids, max_new_tokens=8, temperature=0).tolist() == by_hand.tolist()


def test_batched_text_prompts_of_different_lengths_equal_one_by_one_on_a_plain_module(char_tokenizer):
    torch.manual_seed(0)
    model = TinyGPT(vocab=len(char_tokenizer), block_size=64).eval()  # takes no attention mask
    prompts = ["hi", "a longer prompt"]
    single = [lora.generate(model, char_tokenizer, p, max_new_tokens=6, temperature=0, chat=False) for p in prompts]
    assert lora.generate(model, char_tokenizer, prompts, max_new_tokens=6, temperature=0, chat=False) == single
    for name in ("a", "b"):  # and with an adapter per prompt
        lora.inject(model, lora.LoraConfig(r=4), adapter=name)
    randomize_adapters(model, std=0.5)
    alone = []
    for prompt, name in zip(prompts, ("b", "a")):
        lora.set_active(model, name)
        alone.append(lora.generate(model, char_tokenizer, prompt, max_new_tokens=6, temperature=0, chat=False))
    assert lora.generate(model, char_tokenizer, prompts, max_new_tokens=6, temperature=0, chat=False,
                         adapter_names=["b", "a"]) == alone


def test_a_finished_row_leaves_the_batch_and_the_others_answer_as_they_would_alone(char_tokenizer):
    model = make_llama_for(char_tokenizer, seed=2)
    prompts = torch.randint(3, len(char_tokenizer), (4, 5), generator=torch.Generator().manual_seed(0))
    free = lora.generate(model, None, prompts, max_new_tokens=10, temperature=0, eos_token_id=-1)[:, 5:]
    first = [{int(t): i for i, t in reversed(list(enumerate(row)))} for row in free]  # token -> first step
    # an EOS that row 0 says before some other row does (or that row never says): rows finish apart
    eos = next(t for t in first[0] if any(first[0][t] < f.get(t, 99) for f in first[1:]))
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        batched = lora.generate(model, None, prompts, max_new_tokens=10, temperature=0, eos_token_id=eos)
    finally:
        hook.remove()
    assert sizes[0] == 4 and min(sizes) < 4  # finished rows were cut from the batch
    for i in range(4):
        alone = lora.generate(model, None, prompts[i:i + 1], max_new_tokens=10, temperature=0, eos_token_id=eos)[0]
        assert batched[i, :len(alone)].tolist() == alone.tolist()
        assert (batched[i, len(alone):] == eos).all()  # finished rows are padded with EOS, as before


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora.generate(TinyGPT(), None, torch.zeros(1, 2, dtype=torch.long), **kwargs)


def test_text_prompt_without_tokenizer_is_refused():
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        lora.generate(TinyGPT(), None, "hello")


def test_exact_match_answers_in_the_order_of_the_prompts_though_it_batches_them_by_length(char_tokenizer):
    """Prompts are sorted by length into batches; each answer must still land on its own prompt, and equal the
    answer the prompt gets alone."""
    from lora.generate import exact_match

    model = make_llama_for(char_tokenizer, seed=3)
    prompts = ["a much longer prompt than the others", "hi", [{"role": "system", "content": "S"},
                                                               {"role": "user", "content": "mid length"}], "abc"]
    alone = [generate(model, char_tokenizer, p, max_new_tokens=5, temperature=0, chat=True) for p in prompts]
    assert len(set(alone)) > 1  # the prompts get different answers, so a mix-up would show
    accuracy, predictions = exact_match(model, char_tokenizer, prompts, alone, max_new_tokens=5, batch_size=2)
    assert predictions == alone and accuracy == 1.0
