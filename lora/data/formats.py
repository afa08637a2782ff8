"""The record formats: which keys make which kind of example, how a record is checked, the conversation an
instruction record stands for, and the ``columns=`` mapping from a data set's own column names to ours."""

from __future__ import annotations

import json

FORMATS = {
    "alpaca": "'instruction' and 'output' (optional 'input')",
    "chat": "'messages': a list of {'role', 'content'} (OpenAI tool calling too: 'tools', 'tool_calls', 'tool' turns)",
    "sharegpt": "'conversations': a list of {'from': 'human'|'gpt'|'system', 'value'}",
    "prompt_completion": "'prompt' and 'completion'",
    "text": "'text' (plain text for continued pre-training)",
    "classification": "'text' and 'label'",
    "preference": "'prompt' (or Alpaca's 'instruction' and optional 'input'), 'chosen' and 'rejected' (DPO pairs)",
}
INSTRUCTION_FORMATS = ("alpaca", "chat", "sharegpt", "prompt_completion")  # a prompt and the answers to learn
_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speaker names (and the chat names some exports use in their place) -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# every key a format reads: what a `columns=` mapping may map a data set's column to
FIELDS = ("instruction", "input", "output", "prompt", "completion", "text", "label", "messages", "conversations",
          "tools", "chosen", "rejected")
_COLUMNS_EXAMPLE = "columns=prompt:question,completion:answer"
_TOOLS_EXAMPLE = '[{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]'
_ARGUMENTS_EXAMPLE = '{"city": "Paris"}'


def detect_format(record: dict) -> str | None:
    """The format whose keys ``record`` has, or None."""
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys and ("prompt" in keys or "instruction" in keys):
        return "preference"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def parse_columns(columns: str | dict | None) -> dict[str, str]:
    """``columns=`` as ``{our field: the data set's column}``, from ``"prompt:question,completion:answer"`` or a
    dict.

    Raises:
        ValueError: a malformed mapping, or a field no format reads (the message lists them).
    """
    if columns is None or columns == "" or columns == {}:
        return {}
    if isinstance(columns, str):
        mapping = {}
        for part in columns.split(","):
            ours, sep, theirs = (s.strip() for s in part.partition(":"))
            if not part.strip():
                continue
            if not sep or not ours or not theirs:
                raise ValueError(f"columns={columns!r}: {part.strip()!r} is not 'field:column'; write "
                                 f"{_COLUMNS_EXAMPLE} (our field, a colon, your column)")
            if ours in mapping:
                raise ValueError(f"columns={columns!r} maps {ours!r} twice; give each field one column")
            mapping[ours] = theirs
        columns = mapping
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise ValueError(f"columns must map our field names to your column names (strings), e.g. {_COLUMNS_EXAMPLE} "
                         f"or {{'prompt': 'question'}}; got {columns!r}")
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise ValueError(f"columns: {unknown} {'is' if len(unknown) == 1 else 'are'} not a field of any format; "
                         f"the fields are {list(FIELDS)} (write field:your_column, e.g. {_COLUMNS_EXAMPLE})")
    return dict(columns)


def rename_columns(record: dict, columns: dict[str, str]) -> dict:
    """``record`` with the data set's columns renamed to our fields (a missing column: KeyError of its name)."""
    if not columns:
        return record
    taken = set(columns.values())
    out = {k: v for k, v in record.items() if k not in taken and k not in columns}
    for ours, theirs in columns.items():
        if theirs not in record:
            raise KeyError(theirs)
        out[ours] = record[theirs]
    return out


def _json_value(value, what: str) -> tuple[object, str | None]:
    """A JSON string parsed (datasets often store ``tools`` and tool-call arguments as text), else ``value``; with
    the problem, if the string is not JSON."""
    if not isinstance(value, str):
        return value, None
    try:
        return json.loads(value), None
    except (ValueError, RecursionError) as e:
        example = _TOOLS_EXAMPLE if "tools" in what else _ARGUMENTS_EXAMPLE
        return None, f"{what} is not JSON ({getattr(e, 'msg', e)}): {value[:60]!r}; write it as JSON, e.g. {example}"


def _check_tool_calls(i: int, m: dict) -> str | None:
    calls = m.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return f"messages[{i}].tool_calls must be a non-empty list of {{'type': 'function', 'function': {{'name', " \
               f"'arguments'}}}}, got {calls!r}"
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"messages[{i}].tool_calls[{j}] must be {{'type': 'function', 'function': {{'name': a string, " \
                   f"'arguments': a JSON object}}}}, got {call!r}"
        args, problem = _json_value(fn.get("arguments", {}), f"messages[{i}].tool_calls[{j}].function.arguments")
        if problem:
            return problem
        if not isinstance(args, dict):
            return f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object, got {args!r}; write " \
                   f"the arguments as an object, e.g. {{\"city\": \"Paris\"}}"
    return None


def _check_messages(messages, key: str = "messages") -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{key}' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            return f"messages[{i}] must be {{'role': one of {list(_ROLES)}, 'content': a string}}, got {m!r}"
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            problem = _check_tool_calls(i, m)
            if problem:
                return problem
            if m.get("content") is not None and not isinstance(m["content"], str):
                return f"messages[{i}]: 'content' must be a string (or left out beside 'tool_calls'), got {m!r}"
        elif not isinstance(m.get("content"), str):
            return f"messages[{i}] must be {{'role': one of {list(_ROLES)}, 'content': a string}}, got {m!r}"
    if not any(m["role"] == "assistant" for m in messages):
        return f"'{key}' has no assistant turn, so there is nothing to learn"
    return None


def _check_tools(tools) -> str | None:
    tools, problem = _json_value(tools, "'tools'")
    if problem:
        return problem
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools):
        return ("'tools' must be a list of {'type': 'function', 'function': {'name', 'description', 'parameters'}} "
                f"(OpenAI's layout), got {str(tools)[:120]}")
    return None


def check_record(record: dict, fmt: str) -> str | None:
    """What is wrong with ``record`` for ``fmt`` (None if it is fine)."""
    def is_str(key):
        return isinstance(record.get(key), str)

    if fmt == "alpaca":
        if not (is_str("instruction") and is_str("output")) or not isinstance(record.get("input", ""), str):
            return "'instruction' and 'output' (and 'input' if present) must be strings"
    elif fmt == "prompt_completion":
        if not (is_str("prompt") and is_str("completion")):
            return "'prompt' and 'completion' must be strings"
    elif fmt == "preference":
        if "prompt" in record or "instruction" not in record:
            if not (is_str("prompt") and is_str("chosen") and is_str("rejected")):
                return "'prompt', 'chosen' and 'rejected' must be strings"
        elif not (is_str("instruction") and is_str("chosen") and is_str("rejected")) \
                or not isinstance(record.get("input", ""), str):
            return "'instruction', 'chosen' and 'rejected' (and 'input' if present) must be strings"
    elif fmt == "text":
        if not is_str("text") or not record["text"]:
            return "'text' must be a non-empty string"
    elif fmt == "classification":
        if not is_str("text") or not record["text"] or not isinstance(record.get("label"), (str, int)) \
                or isinstance(record["label"], bool):
            return "'text' must be a non-empty string and 'label' a string or an integer"
    elif fmt == "chat":
        problem = _check_messages(record.get("messages"))
        if problem is None and record.get("tools") is not None:
            problem = _check_tools(record["tools"])
        return problem
    elif fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            return "'conversations' must be a non-empty list of {'from', 'value'}"
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
                return f"conversations[{i}] must be {{'from': 'human'|'gpt'|'system', 'value': a string}}, got {turn!r}"
            if turn["from"] not in SHAREGPT_ROLES:
                return (f"conversations[{i}] has the unknown role 'from': {turn['from']!r}; ShareGPT's roles are "
                        f"'human', 'gpt' and 'system' (or 'user', 'assistant'): rename it to one of them")
        if not any(SHAREGPT_ROLES[t["from"]] == "assistant" for t in turns):
            return "'conversations' has no 'gpt' turn, so there is nothing to learn"
    return None


def _clean_message(m: dict) -> dict:
    """A chat message as chat templates read it: no None values (columnar sources fill missing keys with None),
    tool-call arguments as objects (templates write them with ``tojson``)."""
    m = {k: v for k, v in m.items() if v is not None}
    if "tool_calls" in m:
        calls = []
        for call in m["tool_calls"]:
            fn = dict(call["function"])
            fn["arguments"] = _json_value(fn.get("arguments", {}), "")[0]
            calls.append({**{k: v for k, v in call.items() if v is not None}, "type": call.get("type") or "function",
                          "function": fn})
        m["tool_calls"] = calls
    return m


def tools_of(record: dict, fmt: str) -> list[dict] | None:
    """The tool definitions a chat record offers the model (None if none)."""
    if fmt != "chat" or record.get("tools") is None:
        return None
    tools = _json_value(record["tools"], "")[0]
    return [{k: v for k, v in t.items() if v is not None} for t in tools] or None


def _alpaca_prompt(record: dict) -> str:
    return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


def preference_prompt(record: dict) -> str:
    """The prompt of a preference record: ``prompt``, or Alpaca's instruction and input."""
    return record["prompt"] if "prompt" in record else _alpaca_prompt(record)


def to_messages(record: dict, fmt: str) -> list[dict]:
    """The conversation an instruction record stands for (the answer as the last assistant turn)."""
    if fmt == "chat":
        return [_clean_message(m) for m in record["messages"]]
    if fmt == "sharegpt":
        return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    if fmt == "alpaca":
        return [{"role": "user", "content": _alpaca_prompt(record)}, {"role": "assistant", "content": record["output"]}]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise ValueError(f"the {fmt!r} format has no prompt/answer structure")
