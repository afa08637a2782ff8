"""Conversations -> token ids: the chat template (or a plain one), and the mask that keeps the loss on answers."""

from __future__ import annotations

IGNORE = -100  # the target of a position that carries no loss (prompt tokens, padding, an example's last token)
NO_TOOLS_WITHOUT_TEMPLATE = ("this tokenizer has no chat template, so tool definitions, tool calls and 'tool' turns "
                             "cannot be rendered; use a model whose chat template renders tools (Qwen2.5, Qwen3, "
                             "Llama 3.1, Mistral ...), or set tokenizer.chat_template to one that does")


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (a BOS, for Llama-style tokenizers; none for GPT-2),
    found by what it does rather than by ``add_bos_token``, which tokenizers that add BOS in their post-processor
    do not set."""
    marked = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start:start + len(plain)] == plain:
            return marked[:start]
    return []


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation: the one place prompts are formatted, for training, evaluation and generation.

    A tokenizer with a chat template uses it. Without one (base models, GPT-2), a plain template: each turn is
    ``"role:"`` then ``" content"``, tokenized as separate pieces and joined as ids, with EOS closing each assistant
    turn. Tokenizing the pieces apart is what keeps a prompt's ids a prefix of the same prompt with its answer: one
    string ``"assistant: c"`` would let a byte-level BPE merge the space into the answer (``":", "Ġc"``) while the
    prompt alone ends in ``":", "Ġ"``. ``tools`` (OpenAI-style definitions) need a chat template that renders them.
    """
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, return_dict=True)["input_ids"])
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise ValueError(NO_TOOLS_WITHOUT_TEMPLATE)

    def piece(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = special_prefix(tokenizer)
    for m in messages:
        ids += piece(f"{m['role']}:")
        if m["role"] == "assistant":
            ids += piece(f" {m['content']}") + [tokenizer.eos_token_id]
        else:
            ids += piece(f" {m['content']}\n")
    if add_generation_prompt:
        ids += piece("assistant:")
    return ids


def tokenize_chat(tokenizer, messages: list[dict], mask_prompt: bool = True,
                  tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: labels copy the ids on assistant turns and are ``-100`` elsewhere if ``mask_prompt``.

    Each assistant turn's tokens are found as the difference between the conversation rendered up to that turn and
    the prompt that precedes it, which needs a prefix-stable template (true of ChatML, Llama, Mistral, ...).
    """
    labels: list[int] = []
    done: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        upto = render_chat(tokenizer, messages[: i + 1], tools=tools)
        if prompt[: len(done)] != done or upto[: len(prompt)] != prompt:
            raise ValueError("this tokenizer's chat template renders a conversation differently from its prefix, so "
                             "prompt tokens cannot be masked; pass mask_prompt=False")
        labels += [IGNORE] * (len(prompt) - len(done)) + upto[len(prompt):]
        done = upto
    ids = render_chat(tokenizer, messages, tools=tools)
    labels += [IGNORE] * (len(ids) - len(done))
    return ids, (labels if mask_prompt else list(ids))
