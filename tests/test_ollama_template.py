"""The Ollama Modelfile shows each system prompt once, and gives the prompt the base model's HF chat template gives.

Ollama fills a TEMPLATE like this (ollama server/routes.go, server/prompt.go, template/template.go):
- ``/api/chat``: the request's messages, with the Modelfile's SYSTEM put first as a system message when the first
  request message is no system message (``ChatHandler``).
- ``/api/generate``: a system message (the request's ``system``, else the Modelfile's SYSTEM, else none), then the
  prompt as a user message (``GenerateHandler``); it takes the same ``chatPrompt`` path as chat.
- A template that names ``.Messages`` is then run with ``.Messages`` = those messages, consecutive messages of one
  role joined by a blank line, system messages kept in, and ``.System`` = all system messages' contents joined by a
  blank line (``Template.Execute`` / ``collate``). So a system prompt is in both, and a template that renders both
  shows it twice (the bug fixed here).

``go_template.render`` stands in for Go's text/template; ``test_renderer_matches_go`` pins it to outputs of Go's own
text/template.
"""

import re
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from lora.export import ollama_modelfile, write_modelfile
from lora.models import DEFAULT_MODEL, converted_folder
from conftest import CHATML, make_char_tokenizer
from go_template import GoTemplateError, render

# A SmolLM2-style template: a default system prompt before a first message that is no system message.
WITH_DEFAULT = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
                "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A Qwen2.5-style template: the default sits in an else branch after a tools branch, a later system message is
# rendered where it stands.
DEFAULT_IN_ELSE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content }}"
    "{%- else %}{{- 'You are Tester.' }}{%- endif %}{{- '\n\n# Tools\n' + (tools | tojson) + '<|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Tester, made for tests.<|im_end|>\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
TEMPLATES = {"chatml": CHATML, "with-default": WITH_DEFAULT, "default-in-else": DEFAULT_IN_ELSE}
DEFAULTS = {"chatml": None, "with-default": "You are a test assistant.",
            "default-in-else": "You are Tester, made for tests."}


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = {  # as a client sends them
    "user": [msg("user", "Hi")],                                                                    # (a), (c)
    "system-first": [msg("system", "Be brief."), msg("user", "Hi")],                                # (b)
    "multi-turn": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "And now?")],         # (d)
    "multi-turn-system": [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello!"),
                          msg("user", "And now?")],
    "system-mid-conversation": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("system", "Use French."),
                                msg("user", "Again?")],
}

# The TEMPLATE this module fixes: it rendered .System and then .Messages, which hold the same system prompt.
OLD_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


# -- Ollama, as its server fills a template ----------------------------------------------------------------------
def read_modelfile(text):
    """TEMPLATE and SYSTEM as Ollama's Modelfile parser reads them: a triple-quoted value keeps its text exactly."""
    values = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.M | re.S))
    return SimpleNamespace(template=values["TEMPLATE"], system=values.get("SYSTEM", ""))


def template_values(messages):
    """What ``Template.Execute`` hands a template that names .Messages (``collate``)."""
    collated = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": collated, "Tools": [], "Response": ""}


def chat_prompt(modelfile, messages):
    """``/api/chat``."""
    if messages[0]["role"] != "system" and modelfile.system:
        messages = [msg("system", modelfile.system)] + messages
    return render(modelfile.template, template_values(messages))


def generate_prompt(modelfile, prompt, system=""):
    """``/api/generate`` with ``prompt`` and the request's ``system``."""
    system = system or modelfile.system
    messages = ([msg("system", system)] if system else []) + [msg("user", prompt)]
    return render(modelfile.template, template_values(messages))


def assert_systems_once(prompt, systems):
    assert prompt.count("<|im_start|>system\n") == len(systems), prompt
    for system in systems:
        assert prompt.count(system) == 1, prompt


def expected_systems(messages, default):
    """The system prompts a conversation should show: its own, with the default first when it starts without one."""
    own = [m["content"] for m in messages if m["role"] == "system"]
    return ([default] if default and messages[0]["role"] != "system" else []) + own


# -- the written Modelfile against the HF template ----------------------------------------------------------------
@pytest.mark.parametrize("family", TEMPLATES)
def test_modelfile_picks_the_default_system_prompt(family):
    modelfile = read_modelfile(ollama_modelfile("m.gguf", TEMPLATES[family], ["<|im_end|>"], 0.7))
    assert modelfile.system == (DEFAULTS[family] or "")
    # Ollama runs the .Messages path only for a template that names .Messages (template.go Execute)
    assert ".Messages" in modelfile.template


@pytest.mark.parametrize("family", TEMPLATES)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_prompt_equals_hf_template_with_each_system_once(family, conversation):
    tokenizer = make_char_tokenizer(TEMPLATES[family])
    modelfile = read_modelfile(ollama_modelfile("m.gguf", TEMPLATES[family], ["<|im_end|>"], 0.7))
    messages = CONVERSATIONS[conversation]
    prompt = chat_prompt(modelfile, messages)
    assert prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert_systems_once(prompt, expected_systems(messages, DEFAULTS[family]))


@pytest.mark.parametrize("family", TEMPLATES)
@pytest.mark.parametrize("system", ["", "Be brief."])
def test_generate_prompt_equals_hf_template_with_the_system_once(family, system):
    tokenizer = make_char_tokenizer(TEMPLATES[family])
    modelfile = read_modelfile(ollama_modelfile("m.gguf", TEMPLATES[family], ["<|im_end|>"], 0.7))
    messages = ([msg("system", system)] if system else []) + [msg("user", "Hi")]
    prompt = generate_prompt(modelfile, "Hi", system)
    assert prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert_systems_once(prompt, expected_systems(messages, DEFAULTS[family]))


def test_a_tokenizer_without_chat_template_gets_the_plain_format_it_trained_on():
    """No chat template: training used render_chat's plain "role: content" format, so Ollama must send that."""
    from lora.data import render_chat

    tokenizer = make_char_tokenizer(None)
    modelfile = read_modelfile(ollama_modelfile("m.gguf", None, [tokenizer.eos_token], 0.7))
    for messages in CONVERSATIONS.values():
        trained = tokenizer.decode(render_chat(tokenizer, messages, add_generation_prompt=True))
        assert chat_prompt(modelfile, messages) == trained
    assert generate_prompt(modelfile, "Hi") == tokenizer.decode(render_chat(tokenizer, [msg("user", "Hi")], True))


def test_smollm2_modelfile_matches_its_own_chat_template(tmp_path):
    """The embedded SmolLM2's real template, through write_modelfile (the `lora export gguf` path)."""
    tokenizer = AutoTokenizer.from_pretrained(converted_folder(DEFAULT_MODEL), local_files_only=True)
    modelfile = read_modelfile(write_modelfile(DEFAULT_MODEL, tmp_path / "model.gguf").read_text())
    assert modelfile.system.startswith("You are a helpful AI assistant named SmolLM")
    for messages in CONVERSATIONS.values():
        prompt = chat_prompt(modelfile, messages)
        assert prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert_systems_once(prompt, expected_systems(messages, modelfile.system))
    for system in ("", "Be brief."):
        messages = ([msg("system", system)] if system else []) + [msg("user", "Hi")]
        prompt = generate_prompt(modelfile, "Hi", system)
        assert prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert_systems_once(prompt, expected_systems(messages, modelfile.system))


# -- the renderer against Go's text/template ----------------------------------------------------------------------
TURNS = [{"Role": "system", "Content": "Be brief."}, {"Role": "user", "Content": "Hi"},
         {"Role": "assistant", "Content": "Hello!"}, {"Role": "user", "Content": "More?"}]
# (template, data, output of Go 1.19's text/template with Option("missingkey=zero"), as Ollama parses templates)
GO_OUTPUTS = [
    ("a \n\t {{- .X -}} \n\t b", {"X": "x"}, "axb"),  # trim markers take every space, tab and newline
    ("a \n {{- .X }} \n b", {"X": "x"}, "ax \n b"),
    ("a \n {{ .X -}} \n b", {"X": "x"}, "a \n xb"),
    ("{{ .A -}}  \n  {{- .B }}", {"A": "a", "B": "b"}, "ab"),
    ("{{.X}}|{{ .X }}", {"X": "x"}, "x|x"),
    ("{{ if .S }}yes{{ else }}no{{ end }}", {"S": ""}, "no"),  # an empty string is false
    ("{{ if .S }}yes{{ else }}no{{ end }}", {"S": "s"}, "yes"),
    ("{{ if .L }}yes{{ else }}no{{ end }}", {"L": []}, "no"),
    ("{{ range .L }}<{{ . }}>{{ else }}empty{{ end }}", {"L": []}, "empty"),
    ("{{ range .L }}<{{ . }}>{{ else }}empty{{ end }}", {"L": ["a", "b"]}, "<a><b>"),
    ("{{- range .Messages }}{{ .Role }}:{{ $.System }};{{ end }}", {"System": "S", "Messages": TURNS[:2]},
     "system:S;user:S;"),  # . is the element inside range, $ the root
    ('{{ range .Messages }}{{ if eq .Role "user" }}U{{ else }}O{{ end }}{{ end }}', {"Messages": TURNS}, "OUOU"),
    ('{{ range .Messages }}{{ if eq .Role "system" "user" }}Y{{ else }}N{{ end }}{{ end }}', {"Messages": TURNS},
     "YYNY"),  # eq with several arguments: equal to any
    ('{{ eq "a" "a" }} {{ eq .X "b" }}', {"X": "a"}, "true false"),
    ('{{ range .Messages }}\n  {{- if eq .Role "user" }}\n[{{ .Content }}]\n  {{- end }}\n{{- end }}\n',
     {"Messages": TURNS}, "\n[Hi]\n[More?]\n"),
    ('{{ "say \\"hi\\"\\n" }}', {}, 'say "hi"\n'),
    (OLD_TEMPLATE, {"System": "Be brief.", "Messages": TURNS},
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>system\nBe brief.<|im_end|>\n"
     "<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n"),
    (read_modelfile(ollama_modelfile("m.gguf", CHATML, [], 0.7)).template, {"System": "Be brief.", "Messages": TURNS},
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("template,data,expected", GO_OUTPUTS)
def test_renderer_matches_go(template, data, expected):
    assert render(template, data) == expected


@pytest.mark.parametrize("template", [
    "{{-3}}",                                  # Go: the number -3, not a trim marker
    "{{ with .X }}w{{ end }}",
    "{{ .X | printf }}",
    "{{ $x := .X }}",
    "{{ range $i, $m := .L }}{{ end }}",
    "{{ len .L }}",
    "{{ slice .L 1 }}",
    "{{/* a comment */}}",
    "{{ if .X }}a{{ else if .Y }}b{{ end }}",
    "{{ .Nope }}",                              # Go prints <no value> for a missing map key
    "{{ .X.Y }}",
    "{{ range .X }}{{ end }}",                  # a string, not a list
    "{{ if .X }}unclosed",
    "stray {{ end }}",
    "{{ .X ",
    "{{ }}",
    '{{ eq .X 1 }}',
])
def test_renderer_refuses_what_it_does_not_implement(template):
    with pytest.raises(GoTemplateError):
        render(template, {"X": "x", "Y": "y", "L": ["a", "b"]})
