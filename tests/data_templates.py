"""Chat templates written for the data tests (the tiny tokenizers of conftest.py have none of these): one that renders
OpenAI-style tools as the Qwen2.5/Qwen3 family does, and ChatML whose assistant turns are marked with
``{% generation %}`` (what ``return_assistant_tokens_mask`` reads)."""

import copy

# Tools go into the system turn as JSON lines; an assistant's tool calls follow its text as <tool_call> JSON; a tool's
# result is a turn of its own. The layout of Qwen2.5's template, written small.
TOOL_CHATML = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{ '# Tools\n<tools>\n' }}{%- for tool in tools %}{{ tool | tojson }}{{ '\n' }}{%- endfor %}"
    "{{ '</tools><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' or (m['role'] == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{%- if m.content %}{{ m.content }}{%- endif %}"
    "{%- for call in m.tool_calls or [] %}"
    "{{ '<tool_call>{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{{ call.function.arguments | tojson }}"
    "{{ '}</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif m['role'] == 'tool' %}"
    "{{ '<|im_start|>tool\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

# ChatML with each assistant turn's text (and its end marker) inside {% generation %}: the newline after the end
# marker is outside, unlike what the prefix method of lora.data.encode would train on.
GENERATION_CHATML = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tool_conversation(city: str = "Paris", degrees: int = 18) -> dict:
    """A multi-turn OpenAI-style tool-calling record: a call, its result, the answer, and a follow-up turn. Its
    tool is a copy: the fuzzing edits records in place, and must not reach the next test's tool."""
    return {"tools": [copy.deepcopy(WEATHER_TOOL)], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": f"{degrees} C"},
        {"role": "assistant", "content": f"{degrees} C in {city}."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Bye"}]}
