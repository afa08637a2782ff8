"""Sampling from a causal LM: temperature, then top-k, then nucleus (top-p), then a draw; greedy at temperature 0."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .data import render_chat
from .inject import row_adapters

Conversation = list[dict]  # chat messages, {"role": ..., "content": ...}


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top ``top_k`` and outside the nucleus of mass ``top_p``.

    Args:
        logits: ``(B, V)``, already divided by the temperature.
        top_k: Keep the k largest (0: no limit).
        top_p: Keep the smallest set of tokens whose probabilities sum to at least ``top_p`` (1.0: no limit).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # (B, V) probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the first token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ``(B, V)``: argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature == 0:
        return logits.argmax(-1)
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_input_embeddings") and hasattr(model, "can_generate")


def _is_conversation(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _can_drop_rows(past) -> bool:
    """Whether rows can be cut from this KV cache: transformers' growing caches of keys and values, whose layers
    all select batch rows (a static, quantized or recurrent-state cache keeps its rows)."""
    layers = getattr(past, "layers", None)
    return bool(layers) and hasattr(past, "batch_select_indices") and all(
        type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer") for layer in layers)


def _encode(tokenizer, prompts: list[str | Conversation], chat: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(B, T)`` ids and attention mask. With ``chat``, a string is a user turn and a conversation is
    taken whole; both are formatted by :func:`lora.data.render_chat`, exactly as training formats them."""
    if chat:
        rows = [render_chat(tokenizer, p if _is_conversation(p) else [{"role": "user", "content": p}],
                            add_generation_prompt=True) for p in prompts]
    elif any(_is_conversation(p) for p in prompts):
        raise ValueError("a conversation prompt needs chat formatting; pass chat=True (or a string prompt)")
    else:
        rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    return pad_left(rows, pad, device)


def pad_left(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as left-padded ``(B, T)`` ids and attention mask: every prompt ends at the last column, where
    the first new token is read off."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str | Conversation | list[str | Conversation] | torch.Tensor,
             max_new_tokens: int = 64,
             temperature: float = 0.7, top_k: int = 50, top_p: float = 0.95, seed: int | None = None,
             chat: bool | None = None, eos_token_id: int | None = None,
             adapter_names: list[str | None] | None = None) -> str | list[str] | torch.Tensor:
    """Continue one prompt or a batch of prompts.

    Args:
        model: A Hugging Face causal LM (uses its KV cache), or any ``nn.Module`` mapping ``(B, T)`` token ids to
            ``(B, T, V)`` logits.
        tokenizer: The model's tokenizer; ``None`` when ``prompt`` is a tensor of token ids.
        prompt: A string, a conversation (a list of ``{"role", "content"}`` messages ending before the answer), a
            list of those (batched, left-padded), or a ``(B, T)`` tensor of token ids.
        max_new_tokens: At most this many tokens are added.
        temperature: Logits are divided by it; 0 means greedy.
        top_k: Sample among the k most likely tokens (0: all).
        top_p: Sample within the nucleus of probability mass ``top_p`` (1.0: all).
        seed: Seed for a private generator, so results repeat without touching the global RNG. (Rows that have
            finished leave the batch, so with several prompts each row's draws depend on when the others end.)
        chat: Format prompts as training does (:func:`lora.data.render_chat`: the chat template, or the plain
            ``role: content`` one for a tokenizer without a template), a string as a user turn (default: when the
            tokenizer has a chat template, or the prompt is a conversation).
        eos_token_id: Stop token (default: the tokenizer's EOS). A finished row is padded with it.
        adapter_names: One adapter name per prompt (None: the base model), all answered in one batch as if each
            ran alone with its adapter active (see :func:`lora.row_adapters`).

    Returns:
        The generated text (a string, or a list for a list of prompts), without the prompt; for a tensor prompt,
        the ``(B, T + n)`` token ids, prompt included.
    """
    if adapter_names is not None:
        rows = 1 if isinstance(prompt, str) or _is_conversation(prompt) else len(prompt)
        if len(adapter_names) != rows:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for {rows} prompts; give one adapter "
                             f"name (or None for the base model) per prompt")
        if rows > 1 and not isinstance(prompt, torch.Tensor) and not _is_hf(model):
            # a plain module reads padding as text (see below): each prompt alone, with its adapter
            return [generate(model, tokenizer, p, max_new_tokens, temperature, top_k, top_p, seed, chat,
                             eos_token_id, [name]) for p, name in zip(prompt, adapter_names)]
        with row_adapters(model, adapter_names):
            return generate(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat,
                            eos_token_id)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 means no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1.0 means no limit), got {top_p}")
    device = next(model.parameters()).device
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 2:
            raise ValueError(f"a tensor prompt must be (batch, T) token ids, got shape {tuple(prompt.shape)}")
        ids, mask = prompt.to(device), torch.ones_like(prompt, device=device)
    else:
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass one, or pass token ids as a (batch, T) tensor")
        single = isinstance(prompt, str) or _is_conversation(prompt)
        prompts = [prompt] if single else list(prompt)
        if chat is None:
            chat = getattr(tokenizer, "chat_template", None) is not None or any(map(_is_conversation, prompts))
        ids, mask = _encode(tokenizer, prompts, chat, device)
        if not _is_hf(model) and not bool(mask.all()):
            # A plain module takes no attention mask and no positions: it would read the left padding as text.
            texts = [generate(model, tokenizer, p, max_new_tokens, temperature, top_k, top_p, seed, chat,
                              eos_token_id) for p in prompts]  # each prompt alone, unpadded
            return texts[0] if single else texts
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    new_tokens = sample_tokens(model, ids, mask, max_new_tokens, temperature, top_k, top_p, generator, eos_token_id)
    if isinstance(prompt, torch.Tensor):
        return torch.cat([ids, new_tokens], dim=1)
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return texts[0] if single else texts


def _cache_of(out):
    """The KV cache a Hugging Face forward returned (``cache`` since transformers 5.x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``cache`` in newer transformers, else
    ``past_key_values`` (the old name still works there, with a deprecation warning on every load)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_tokens(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                  temperature: float = 0.7, top_k: int = 50, top_p: float = 0.95,
                  generator: torch.Generator | None = None, eos_token_id: int | None = None,
                  num_samples: int = 1) -> torch.Tensor:
    """The sampling loop under :func:`generate`: new token ids for left-padded prompts, with the KV cache.

    Args:
        model: A Hugging Face causal LM, or an ``nn.Module`` mapping ``(B, T)`` ids to logits (then ``mask`` must
            be all ones: such a model reads padding as text).
        ids: ``(B, T)`` left-padded prompt ids (see :func:`pad_left`); ``mask``: their attention mask.
        max_new_tokens, temperature, top_k, top_p, eos_token_id: As for :func:`generate`.
        generator: The random draws' source (None: torch's global one). A caller that checkpoints it, or seeds a
            fresh one per call, gets draws that repeat exactly.
        num_samples: Samples per prompt. The prompts run through the model once and their KV cache is copied
            ``num_samples`` times, so a group of answers to one prompt costs one prompt pass (GRPO's groups).

    Returns:
        ``(B * num_samples, n)`` new ids, ``n <= max_new_tokens`` (the loop ends once every row has ended); row
        ``i * num_samples + j`` is prompt ``i``'s ``j``-th sample; an ended row is padded with ``eos_token_id``.
    """
    device = ids.device
    was_training = model.training
    model.eval()
    hf = _is_hf(model)
    # Only the last position's logits are needed: without this the prompt pass computes (B, T, vocab) of them
    last_only = {"logits_to_keep": 1} if hf and "logits_to_keep" in inspect.signature(model.forward).parameters \
        else {}
    cache_name = cache_argument(model) if hf else None
    # A row that has finished leaves the batch, so the others run on without it. Not with per-row adapters (their
    # rows are fixed while generating) or a cache this cannot cut rows from: then finished rows are padded along.
    per_row = any(getattr(m, "row_adapters", None) is not None for m in model.modules())
    if per_row and num_samples > 1:
        raise ValueError("num_samples > 1 copies each prompt's rows, which per-row adapters (lora.row_adapters) "
                         "cannot follow; repeat the prompts and their adapter names instead")
    rows_total = ids.shape[0] * num_samples
    new_tokens = ids.new_full((rows_total, max_new_tokens), eos_token_id if eos_token_id is not None else 0)
    rows = torch.arange(rows_total, device=device)  # the row of new_tokens each row still in the batch fills
    finished = torch.zeros(rows_total, dtype=torch.bool, device=device)
    past, seen = None, ids
    step_ids, step_pos = ids, (mask.cumsum(-1) - 1).clamp_min(0)
    steps = 0
    try:
        for steps in range(1, max_new_tokens + 1):
            if hf:
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                            **{cache_name: past}, use_cache=True, **last_only)
                past, logits = _cache_of(out), out.logits[:, -1]
            else:
                out = model(seen)
                logits = (out if isinstance(out, torch.Tensor) else out.logits)[:, -1]  # (B, V)
            if steps == 1 and num_samples > 1:  # one prompt pass, then every prompt's rows num_samples times
                logits, mask = logits.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
                step_pos, seen = step_pos.repeat_interleave(num_samples, 0), seen.repeat_interleave(num_samples, 0)
                if hf:
                    past.batch_repeat_interleave(num_samples)
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
            new_tokens[rows, steps - 1] = next_token
            if finished.all():
                break
            if not hf:  # a model without a cache reads the whole sequence again
                seen = torch.cat([seen, next_token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_ids, step_pos = next_token[:, None], step_pos[:, -1:] + 1
            if finished.any() and not per_row and (not hf or _can_drop_rows(past)):
                keep = (~finished).nonzero().squeeze(1)
                if hf:
                    past.batch_select_indices(keep)
                rows, finished, mask = rows[keep], finished[keep], mask[keep]
                seen = seen if hf else seen[keep]
                step_ids, step_pos = step_ids[keep], step_pos[keep]
    finally:
        model.train(was_training)
    return new_tokens[:, :steps]


def exact_match(model, tokenizer, prompts: list[str | Conversation], answers: list[str],
                max_new_tokens: int | None = None, batch_size: int = 32) -> tuple[float, list[str]]:
    """Greedy answers to ``prompts`` and the fraction equal to ``answers`` (whitespace stripped).

    Prompts (strings as user turns, or whole conversations from :func:`lora.data.prompts_and_answers`) are
    formatted as in training. They are answered in batches of similar length, so little of a batch is padding;
    the predictions come back in the order of ``prompts``. ``max_new_tokens`` defaults to the longest answer plus
    4 tokens (its end-of-turn markers): a longer answer cannot match, and generation is the slow part.
    """
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 4
    size = [len(p) if isinstance(p, str) else sum(len(m["content"]) for m in p) for p in prompts]
    order = sorted(range(len(prompts)), key=size.__getitem__)
    predictions: list[str] = [""] * len(prompts)
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        got = generate(model, tokenizer, [prompts[j] for j in rows], max_new_tokens=max_new_tokens,
                       temperature=0, chat=True)
        for j, text in zip(rows, got):
            predictions[j] = text
    correct = sum(p.strip() == a.strip() for p, a in zip(predictions, answers))
    return correct / max(len(answers), 1), predictions


__all__ = ["generate", "exact_match", "sample_tokens", "pad_left", "sample_next_token", "filter_logits"]
