"""The Ollama ``Modelfile`` beside a GGUF file: the chat template in Go's syntax, stop tokens, temperature."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_file
from .base import resolve_base_folder

# -- Ollama ---------------------------------------------------------------------------------------------------------
# Ollama hands a template both `.System` (every system message, joined) and `.Messages` (all messages, the system
# ones included: `collate` in ollama's template/template.go), and puts the Modelfile's SYSTEM into `.Messages` as a
# first system message when a request brings none (server/routes.go). So the template renders `.Messages` alone:
# each system prompt once, where the conversation has it, as the Hugging Face ChatML templates do. Rendering
# `.System` as well showed it twice.
_CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
_PROBE = "lora-probe-7f3a"  # a user message no template adds anything to


def _plain_template(eos_token: str) -> str:
    """The plain ``role: content`` format :func:`lora.data.render_chat` trains a tokenizer without a chat template
    on, as Ollama's Go template: each turn ``"role: content"``, a newline after a prompt turn, EOS after an answer,
    then ``"assistant:"``. Those piece boundaries fall where byte-level BPE splits anyway, so Ollama tokenizing the
    whole text gives the ids training saw."""
    return ('{{- range .Messages }}{{ .Role }}: {{ .Content }}{{ if eq .Role "assistant" }}' + eos_token
            + '{{ else }}\n{{ end }}{{ end }}assistant:')


def _default_system_prompt(chat_template: str) -> str | None:
    """The system prompt a ChatML ``chat_template`` adds when the conversation brings none, else None.

    Found by rendering the template (with transformers' own renderer) on a one-message conversation, so a default
    behind any Jinja logic is found (Qwen2.5 keeps it in an ``else`` branch) and template text that is no default
    is not taken for one.
    """
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template([[{"role": "user", "content": _PROBE}]], chat_template=chat_template)
    except (TemplateError, TypeError, ValueError):  # needs more than a plain conversation: no default to offer
        return None
    head, found, _ = rendered[0].partition(f"<|im_start|>user\n{_PROBE}<|im_end|>\n")
    opening, closing = "<|im_start|>system\n", "<|im_end|>\n"
    if not found or not head.startswith(opening) or not head.endswith(closing):
        return None
    system = head[len(opening):-len(closing)]
    # one ChatML block, and text that fits in the Modelfile's """...""" quotes
    return system if system and "<|im_start|>" not in system and '"""' not in system else None


def ollama_modelfile(gguf_file: str, chat_template: str | None, stop_tokens: list[str], temperature: float,
                     adapter_file: str | None = None) -> str:
    """The text of an Ollama Modelfile for ``gguf_file`` (paths relative to the Modelfile).

    ChatML templates (SmolLM, Qwen, ...) are converted to Ollama's Go template, with the system prompt the template
    adds to a conversation that has none as ``SYSTEM`` (Ollama too injects it only when a request brings no system
    prompt first), so Ollama's prompt equals ``apply_chat_template(messages, add_generation_prompt=True)``. A
    tokenizer without a chat template gets the plain format training used (:func:`lora.data.render_chat`). Other
    templates are left out: Ollama then falls back to the GGUF's own chat template.
    """
    lines = [f"FROM ./{gguf_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if not chat_template and stop_tokens:
        lines.append(f'TEMPLATE """{_plain_template(stop_tokens[0])}"""')
    elif chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
        default_system = _default_system_prompt(chat_template)
        if default_system:
            lines.append(f'SYSTEM """{default_system}"""')
    for token in stop_tokens:
        lines.append(f'PARAMETER stop "{token}"')
    lines.append(f"PARAMETER temperature {temperature}")
    return "\n".join(lines) + "\n"


def write_modelfile(model: str | os.PathLike, gguf_path: str | os.PathLike, temperature: float = 0.7,
                    adapter_gguf: str | os.PathLike | None = None) -> Path:
    """Write an Ollama ``Modelfile`` beside ``gguf_path`` (``ollama create NAME -f Modelfile`` in that folder).

    The chat template and stop token come from the base model's tokenizer; ``adapter_gguf`` (in the same folder)
    adds an ``ADAPTER`` line for the adapter-only route.
    """
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_folder(model), local_files_only=True)
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    text = ollama_modelfile(gguf_path.name, tokenizer.chat_template, stops, temperature,
                            Path(adapter_gguf).name if adapter_gguf else None)
    path = gguf_path.parent / "Modelfile"
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path
