"""Many examples at once -> token ids and the labels that keep the loss on answers, through the fast tokenizer.

:func:`lora.data.tokenize_chat` renders a conversation once per assistant turn and tokenizes every rendering apart:
exact, and about six times slower than the tokenizer's own batched call. Here each conversation is rendered to text
by the chat template (the conversation, and the prompt before each assistant turn), which gives every answer's span
of characters; the full texts are then tokenized in one batched call, and a token carries a loss when it starts
inside an answer's span. Where the template marks the assistant's text itself with ``{% generation %}``, its spans
are used instead, token by token as transformers' ``return_assistant_tokens_mask`` does.

The fast path must give what the exact one gives. It is taken only where it can tell that it does: an answer's span
must begin (and end) exactly at a token boundary of the full text, or that conversation is encoded the exact way;
and the first :data:`CHECKED` conversations and texts are encoded both ways, any difference switching the whole set
to the exact way (a tokenizer or template that behaves unlike the usual ones costs speed, never correctness).
"""

from __future__ import annotations

import re

import numpy as np

from .chat import IGNORE, NO_TOOLS_WITHOUT_TEMPLATE, special_prefix, tokenize_chat

CHECKED = 8  # conversations (and texts) encoded both ways at the start of every set
LONG_TEXT = 100_000  # characters: a longer document is tokenized in paragraph-sized pieces (see texts())
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_NO_TOOLS = ("the tokenizer's chat template does not render tools; use a model whose chat template renders tools "
             "(Qwen2.5, Qwen3, Llama 3.1, Mistral ...), or set tokenizer.chat_template to one that does")
_PREFIX_PROBLEM = ("this tokenizer's chat template renders a conversation differently from its prefix, so prompt "
                   "tokens cannot be masked; pass mask_prompt=False")


def template_refuses(e: Exception) -> ValueError | None:
    """The ValueError to show when a chat template raised ``e`` (its ``raise_exception(...)``, or an error inside
    it), or None when ``e`` did not come from the template."""
    module = type(e).__module__
    if module.startswith("jinja2"):
        return ValueError(f"the tokenizer's chat template refuses this conversation ({e}); change the record to what "
                          f"the template accepts")
    if isinstance(e, (TypeError, KeyError, AttributeError, IndexError)) or type(e) is ValueError:
        return ValueError(f"the tokenizer's chat template cannot render this conversation ({type(e).__name__}: "
                          f"{e}); change the record to what the template accepts")
    return None


class Encoder:
    """Encodes conversations (with their tools) and plain texts for one tokenizer, many at a time.

    Args:
        tokenizer: The model's tokenizer; a fast one (``tokenizers``) gets the batched path.
        mask_prompt: Take the loss on the assistant's turns only (else on every token).
    """

    def __init__(self, tokenizer, mask_prompt: bool = True):
        self.tokenizer = tokenizer
        self.mask_prompt = mask_prompt
        self.fast = bool(getattr(tokenizer, "is_fast", False)) and hasattr(tokenizer, "backend_tokenizer")
        self.backend = tokenizer.backend_tokenizer if self.fast else None
        template = getattr(tokenizer, "chat_template", None)
        self.has_template = bool(template)
        self.generation = bool(template) and any(_GENERATION_TAG.search(t) for t in (
            template.values() if isinstance(template, dict) else [template]))
        self.template_kwargs = dict(tokenizer.special_tokens_map)
        self._templates: dict[bool, str] = {}  # with tools (False) or without (True): the template to render
        self.eos = tokenizer.eos_token_id
        self._prefix = None
        self.exact = {"chat": not self.fast, "text": False}  # True: encode every record the exact way
        self._checked = {"chat": 0, "text": 0}

    # -- tokenizing ----------------------------------------------------------------------------------------------
    def _ids(self, texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        if self.backend is not None:
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=special)]
        return self.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def prefix(self) -> list[int]:
        if self._prefix is None:
            self._prefix = special_prefix(self.tokenizer)
        return self._prefix

    # -- plain texts ---------------------------------------------------------------------------------------------
    def texts(self, texts: list[str], eos: bool) -> list[np.ndarray]:
        """Token ids of each text, with the tokenizer's special tokens (a BOS), and EOS after it if ``eos``.

        A text longer than :data:`LONG_TEXT` characters (a book) is tokenized in pieces cut after a blank line
        (else a line break, else a space), so that one document does not hold one core while the other idles; the
        ids can differ from one call on the whole text only where a piece ends (a blank line)."""
        short = [i for i, t in enumerate(texts) if len(t) <= LONG_TEXT]
        out: list = [None] * len(texts)
        if self.exact["text"]:
            ids = [self.tokenizer(texts[i])["input_ids"] for i in short]
        else:
            ids = self._ids([texts[i] for i in short], special=True)
            while self._checked["text"] < min(CHECKED, len(short)):
                k = self._checked["text"]
                self._checked["text"] += 1
                if list(ids[k]) != list(self.tokenizer(texts[short[k]])["input_ids"]):
                    self.exact["text"] = True
                    return self.texts(texts, eos)
        for i, row in zip(short, ids):
            out[i] = row
        for i, text in enumerate(texts):
            if out[i] is None:
                pieces = _pieces(text, LONG_TEXT // 4)
                out[i] = self.prefix() + [t for row in self._ids(pieces, special=False) for t in row]
        tail = [self.eos] if eos else []
        return [np.asarray(list(row) + tail, dtype=np.int32) for row in out]

    # -- conversations -------------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], tools: list | None, generation_prompt: bool,
                spans: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The chat template's text of a conversation (and, with ``spans``, its ``{% generation %}`` spans).

        transformers' ``render_jinja_template`` first rebuilds its input out of plain JSON types (callers may pass
        rich objects); records read from data files are plain already, so the compiled template renders them
        directly, several times faster (the first conversations are checked against the tokenizer's own call)."""
        from transformers.utils import chat_template_utils as ctu

        template = self._templates.get(tools is None)
        if template is None:
            template = self._templates[tools is None] = self.tokenizer.get_chat_template(None, tools)
        compiled = getattr(ctu, "_compile_jinja_template", None)
        try:
            if spans or compiled is None:
                texts, indices = ctu.render_jinja_template(
                    [messages], tools=tools, chat_template=template, add_generation_prompt=generation_prompt,
                    return_assistant_tokens_mask=spans, **self.template_kwargs)
                return texts[0], (indices[0] if spans else [])
            alias = getattr(ctu, "_alias_reasoning_fields", None)
            return compiled(template).render(messages=alias(messages) if alias else messages, tools=tools,
                                             documents=None, add_generation_prompt=generation_prompt,
                                             **self.template_kwargs), []
        except Exception as e:
            refused = template_refuses(e)
            if refused is None:
                raise
            raise refused from None

    def _exact(self, messages: list[dict], tools: list | None) -> tuple[list[int], list[int]]:
        """The reference encoding: :func:`tokenize_chat`, or transformers' own assistant mask."""
        try:
            if self.generation and self.mask_prompt:
                out = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                                         return_assistant_tokens_mask=True)
                ids = list(out["input_ids"])
                return ids, [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])]
            return tokenize_chat(self.tokenizer, messages, self.mask_prompt, tools=tools)
        except ValueError:
            raise
        except Exception as e:
            refused = template_refuses(e)
            if refused is None:
                raise
            raise refused from None

    def _spans(self, messages: list[dict], tools: list | None) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of what the loss is taken on."""
        try:
            full, marked = self._render(messages, tools, False, spans=self.generation)
        except ValueError as e:
            if _uses_tools(messages, tools):
                raise ValueError(f"{_NO_TOOLS} (rendering this tool-calling conversation fails: {e})") from None
            raise
        _check_tools_rendered(full, messages, tools)
        if not self.mask_prompt:
            return full, [(0, len(full))]
        if self.generation:
            return full, [tuple(s) for s in marked]
        spans, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], tools, True)[0]
            upto = full if i == len(messages) - 1 else self._render(messages[:i + 1], tools, False)[0]
            if not (prompt.startswith(done) and upto.startswith(prompt) and full.startswith(upto)):
                raise ValueError(_PREFIX_PROBLEM)
            spans.append((len(prompt), len(upto)))
            done = upto
        return full, spans

    def _labels(self, encoding, spans: list[tuple[int, int]], length: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids, labels)`` of a tokenized conversation, or None where an answer's span does not begin and end at
        a token boundary (that conversation is then encoded the exact way)."""
        ids = np.asarray(encoding.ids, dtype=np.int32)
        if not self.mask_prompt:
            return ids, ids.copy()
        keep = np.zeros(len(ids), dtype=bool)
        if self.generation:  # transformers' rule: every token that overlaps a marked span
            bounds = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            for a, b in spans:
                keep |= (bounds[:, 0] < b) & (bounds[:, 1] > a)
            return ids, np.where(keep, ids, IGNORE).astype(np.int32)
        for a, b in spans:  # the tokens that start at a and at b (or the end): found without all the offsets
            first = encoding.char_to_token(a)
            if first is None or encoding.token_to_chars(first)[0] != a:
                return None
            last = len(ids)
            if b < length:
                last = encoding.char_to_token(b)
                if last is None or encoding.token_to_chars(last)[0] != b:
                    return None
            keep[first:last] = True
        return ids, np.where(keep, ids, IGNORE).astype(np.int32)

    def chats(self, conversations: list[tuple[list[dict], list | None]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(input_ids, labels)`` of each ``(messages, tools)``: labels copy the ids on the assistant's turns and
        are ``-100`` elsewhere (everywhere copied with ``mask_prompt=False``).

        Raises:
            ValueError: for the first conversation that cannot be encoded; its index is ``error.index``.
        """
        return self.finish(self.start(conversations))

    def start(self, conversations: list[tuple[list[dict], list | None]]) -> dict:
        """The first half of :meth:`chats`: render the conversations and start tokenizing them in a thread, so
        that the caller can render the next ones meanwhile (the tokenizer releases the GIL while it works)."""
        if self.exact["chat"] or not self.has_template:
            return {"conversations": conversations, "done": self._plain(conversations) if not self.exact["chat"]
                    else [_as_arrays(*_at(k, self._exact, *c)) for k, c in enumerate(conversations)]}
        rendered = [_at(k, self._spans, messages, tools) for k, (messages, tools) in enumerate(conversations)]
        texts = [text for text, _ in rendered]
        return {"conversations": conversations, "rendered": rendered,
                "encoded": _pool().submit(self.backend.encode_batch, texts, add_special_tokens=False)}

    def finish(self, pending: dict) -> list[tuple[np.ndarray, np.ndarray]]:
        """The second half of :meth:`chats`: labels from the tokens, checked against the reference."""
        conversations = pending["conversations"]
        if "done" in pending:
            return pending["done"]
        out: list = [None] * len(conversations)
        for k, ((text, spans), encoding) in enumerate(zip(pending["rendered"], pending["encoded"].result())):
            out[k] = self._labels(encoding, spans, len(text)) or _as_arrays(*_at(k, self._exact, *conversations[k]))
        while self._checked["chat"] < min(CHECKED, len(out)):
            k = self._checked["chat"]
            self._checked["chat"] += 1
            ids, labels = _at(k, self._exact, *conversations[k])
            if ids != out[k][0].tolist() or labels != out[k][1].tolist():
                self.exact["chat"] = True
                return self.chats(conversations)
        return out

    def _plain(self, conversations: list[tuple[list[dict], list | None]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:func:`lora.data.render_chat`'s plain template (no chat template): its pieces, tokenized in one call."""
        pieces, plans = [], []
        for k, (messages, tools) in enumerate(conversations):
            if _uses_tools(messages, tools):
                error = ValueError(NO_TOOLS_WITHOUT_TEMPLATE)
                error.index = k
                raise error
            plan = []
            for m in messages:
                plan.append((len(pieces), False))
                pieces.append(f"{m['role']}:")
                answer = m["role"] == "assistant"
                plan.append((len(pieces), answer))
                pieces.append(f" {m['content']}" if answer else f" {m['content']}\n")
                if answer:
                    plan.append((None, True))
            plans.append(plan)
        ids = self._ids(pieces, special=False)
        out = []
        for plan in plans:
            row, labels = list(self.prefix()), [IGNORE] * len(self.prefix())
            for index, trained in plan:
                part = [self.eos] if index is None else list(ids[index])
                row += part
                labels += part if trained or not self.mask_prompt else [IGNORE] * len(part)
            out.append((np.asarray(row, dtype=np.int32), np.asarray(labels, dtype=np.int32)))
        while self._checked["chat"] < min(CHECKED, len(out)):
            k = self._checked["chat"]
            self._checked["chat"] += 1
            ids_k, labels_k = _at(k, self._exact, *conversations[k])
            if ids_k != out[k][0].tolist() or labels_k != out[k][1].tolist():
                self.exact["chat"] = True  # the same pieces by construction; a tokenizer that breaks that is slow
                return self.chats(conversations)
        return out


_POOL: list = []


def _pool():
    """One worker thread that runs the tokenizer while the caller renders the next conversations."""
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-tokenize"))
    return _POOL[0]


def _at(index: int, call, *args):
    """``call(*args)``, with the index of the conversation on the ValueError it raises."""
    try:
        return call(*args)
    except ValueError as e:
        e.index = index
        raise


def _as_arrays(ids: list[int], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


def _uses_tools(messages: list[dict], tools: list | None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def _check_tools_rendered(text: str, messages: list[dict], tools: list | None) -> None:
    """A template that ignores tools renders the conversation as if they were not there, and the model would learn
    to call tools it was never shown: refuse that."""
    names = [t["function"]["name"] for t in tools or []]
    names += [c["function"]["name"] for m in messages for c in m.get("tool_calls", ())]
    missing = [n for n in names if n not in text]
    results = [m["content"] for m in messages if m["role"] == "tool" and m.get("content")]
    if missing or any(r not in text for r in results):
        what = f"the tool {missing[0]!r}" if missing else "a 'tool' turn's content"
        raise ValueError(_NO_TOOLS.replace("does not render tools", f"does not render tools ({what} does not appear "
                                                                  f"in the rendered conversation)"))


def _pieces(text: str, size: int) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters, each ending after a blank line where there is one
    (else a line break, else a space), concatenating back to ``text``."""
    pieces, start = [], 0
    while len(text) - start > size:
        window = text[start:start + size]
        cut = size
        for mark in ("\n\n", "\n", " "):
            at = window.rfind(mark)
            if at > size // 4:
                cut = at + len(mark)
                break
        pieces.append(text[start:start + cut])
        start += cut
    pieces.append(text[start:])
    return pieces
