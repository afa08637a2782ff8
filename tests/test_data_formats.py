"""The record formats beyond our own: ShareGPT, OpenAI tool calling, preference pairs in Alpaca's layout, and the
columns= mapping; the loss on every assistant turn and nothing else, token by token; the batched encoder agrees with
the one-conversation-at-a-time reference, and a template's {% generation %} marks give transformers' own mask."""

import json

import pytest

from conftest import make_bpe_tokenizer, make_char_tokenizer
from data_templates import GENERATION_CHATML, TOOL_CHATML, tool_conversation
from lora.data import IGNORE, load_dataset, load_preferences, prompts_and_answers, tokenize_chat, to_messages
from lora.data.encode import CHECKED, Encoder


def learned_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["targets"] if t != IGNORE])


def trained_runs(tokenizer, example) -> list[str]:
    """The text of each run of consecutive trained tokens (token i is trained when target i - 1 is set)."""
    ids, targets = example["input_ids"], example["targets"]
    runs, current = [], []
    for i in range(1, len(ids)):
        if targets[i - 1] != IGNORE:
            assert targets[i - 1] == ids[i]
            current.append(ids[i])
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def tool_tokenizer(make=make_char_tokenizer):
    tok = make()
    tok.chat_template = TOOL_CHATML
    return tok


# -- ShareGPT ----------------------------------------------------------------------------------------------------------
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief"}, {"from": "human", "value": "1+1"},
                              {"from": "gpt", "value": "2"}, {"from": "human", "value": "2+2"},
                              {"from": "gpt", "value": "4"}]}


def test_sharegpt_maps_its_roles_and_learns_every_gpt_turn(char_tokenizer):
    (ex,), stats = load_dataset([SHAREGPT], char_tokenizer, cache=False)
    assert stats.format == "sharegpt"
    chat = {"messages": [{"role": r, "content": c} for r, c in (("system", "Be brief"), ("user", "1+1"),
                                                                  ("assistant", "2"), ("user", "2+2"),
                                                                  ("assistant", "4"))]}
    (same,), _ = load_dataset([chat], char_tokenizer, cache=False)
    assert dict(ex) == dict(same)
    assert trained_runs(char_tokenizer, ex) == ["2<|im_end|>\n", "4<|im_end|>\n"]
    assert prompts_and_answers([SHAREGPT])[1] == ["4"]


def test_sharegpt_with_user_and_assistant_names_reads_the_same(char_tokenizer):
    renamed = {"conversations": [{"from": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
                                  "value": t["value"]} for t in SHAREGPT["conversations"]]}
    assert dict(load_dataset([renamed], char_tokenizer, cache=False)[0][0]) == \
        dict(load_dataset([SHAREGPT], char_tokenizer, cache=False)[0][0])


@pytest.mark.parametrize("turn, message", [
    ({"from": "bot", "value": "x"}, r"records\[0\]: conversations\[1\] has the unknown role 'from': 'bot'; "
                                     r"ShareGPT's roles are 'human', 'gpt' and 'system'"),
    ({"from": "gpt", "value": 5}, r"conversations\[1\] must be \{'from'"),
    ({"value": "x"}, r"conversations\[1\] must be \{'from'"),
])
def test_a_bad_sharegpt_turn_is_refused_with_its_index(char_tokenizer, turn, message):
    record = {"conversations": [{"from": "human", "value": "hi"}, turn]}
    with pytest.raises(ValueError, match=message):
        load_dataset([record], char_tokenizer, cache=False)


# -- OpenAI tool calling -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [make_char_tokenizer, make_bpe_tokenizer], ids=["char", "bpe"])
def test_tool_calls_train_on_the_assistant_turns_only(make):
    tok = tool_tokenizer(make)
    (ex,), stats = load_dataset([tool_conversation()], tok, cache=False)
    assert stats.format == "chat"
    text = tok.decode(ex["input_ids"])
    assert '"name": "get_weather"' in text.split("<tools>")[1]  # the tool list is in the prompt
    assert "<|im_start|>tool\n18 C<|im_end|>" in text
    runs = [r.strip() for r in trained_runs(tok, ex)]
    assert runs == ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
                    "18 C in Paris.<|im_end|>", "Bye<|im_end|>"]
    ids, labels = tokenize_chat(tok, to_messages(tool_conversation(), "chat"), tools=tool_conversation()["tools"])
    assert ex["input_ids"] == ids and ex["targets"] == labels[1:] + [IGNORE]  # the one-at-a-time reference


def test_tool_arguments_as_objects_read_as_json_strings_do(char_tokenizer):
    tok = tool_tokenizer()
    record = tool_conversation()
    as_object = json.loads(json.dumps(record))
    as_object["messages"][2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    assert dict(load_dataset([as_object], tok, cache=False)[0][0]) == \
        dict(load_dataset([record], tok, cache=False)[0][0])
    as_text = {**record, "tools": json.dumps(record["tools"])}  # datasets often keep the tool list as a string
    assert dict(load_dataset([as_text], tok, cache=False)[0][0]) == \
        dict(load_dataset([record], tok, cache=False)[0][0])


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris}"),
     r"records\[0\]: messages\[2\]\.tool_calls\[0\]\.function\.arguments is not JSON \(Expecting property name"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments='"Paris"'),
     r"arguments must be a JSON object, got 'Paris'"),
    (lambda r: r["messages"][2].update(tool_calls=[{"type": "function", "function": {"arguments": "{}"}}]),
     r"messages\[2\]\.tool_calls\[0\] must be \{'type': 'function', 'function': \{'name': a string"),
    (lambda r: r.update(tools="not json"), r"'tools' is not JSON"),
    (lambda r: r.update(tools=[{"name": "get_weather"}]), r"'tools' must be a list of \{'type': 'function'"),
    (lambda r: r["messages"][3].update(role="function"), r"messages\[3\] must be \{'role': one of"),
])
def test_malformed_tool_records_are_refused_with_where_and_what(edit, message):
    record = tool_conversation()
    edit(record)
    with pytest.raises(ValueError, match=message):
        load_dataset([record], tool_tokenizer(), cache=False)


def test_a_template_that_cannot_render_tools_is_refused(char_tokenizer):
    """The ChatML test template knows role and content only: tool calls break it, tool lists it leaves out."""
    with pytest.raises(ValueError, match=r"records\[0\]: the tokenizer's chat template does not render tools"):
        load_dataset([tool_conversation()], char_tokenizer, cache=False)
    listed = {"tools": tool_conversation()["tools"],
              "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(ValueError, match=r"does not render tools \(the tool 'get_weather' does not appear"):
        load_dataset([listed], char_tokenizer, cache=False)
    with pytest.raises(ValueError, match=r"this tokenizer has no chat template, so tool definitions"):
        load_dataset([tool_conversation()], make_char_tokenizer(chat_template=None), cache=False)


# -- preferences in Alpaca's layout ------------------------------------------------------------------------------------
def test_alpaca_layout_preferences_are_dpo_pairs(tmp_path, char_tokenizer):
    alpaca = [{"instruction": "Say a color", "input": "sky", "chosen": "blue", "rejected": "red"},
              {"instruction": "Say hi", "chosen": "hi", "rejected": "no"}]
    prompt = [{"prompt": "Say a color\n\nsky", "chosen": "blue", "rejected": "red"},
              {"prompt": "Say hi", "chosen": "hi", "rejected": "no"}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(alpaca))
    pairs, stats = load_preferences(path, char_tokenizer)
    reference, _ = load_preferences(prompt, char_tokenizer)
    assert pairs == reference and stats.examples == 2
    assert learned_text(char_tokenizer, pairs[0]["chosen"]) == "blue<|im_end|>\n"
    assert learned_text(char_tokenizer, pairs[0]["rejected"]) == "red<|im_end|>\n"
    # as JSONL too: with chosen/rejected beside instruction it is a pair, not an Alpaca record missing its output
    lines = tmp_path / "p.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    assert load_preferences(lines, char_tokenizer)[0] == reference
    with pytest.raises(ValueError, match=r"holds preference pairs .* recipes/dpo\.py"):
        load_dataset(lines, char_tokenizer, cache=False)


# -- columns= ----------------------------------------------------------------------------------------------------------
def test_columns_map_a_data_sets_names_to_ours(tmp_path, char_tokenizer):
    theirs = [{"question": "Name a color", "answer": "blue", "id": 7}]
    ours = [{"prompt": "Name a color", "completion": "blue"}]
    for columns in ("prompt:question,completion:answer", {"prompt": "question", "completion": "answer"},
                    " prompt : question , completion:answer ,"):
        (ex,), stats = load_dataset(theirs, char_tokenizer, columns=columns, cache=False)
        assert stats.format == "prompt_completion" and dict(ex) == dict(load_dataset(ours, char_tokenizer)[0][0])
    assert prompts_and_answers(theirs, columns="prompt:question,completion:answer") == \
        ([[{"role": "user", "content": "Name a color"}]], ["blue"])
    pairs = [{"q": "Say hi", "good": "hi", "bad": "no"}]
    assert load_preferences(pairs, char_tokenizer, columns="prompt:q,chosen:good,rejected:bad")[0] == \
        load_preferences([{"prompt": "Say hi", "chosen": "hi", "rejected": "no"}], char_tokenizer)[0]


@pytest.mark.parametrize("columns, message", [
    ("prompt:question,completion", r"'completion' is not 'field:column'"),
    ("prompt:question,prompt:title", r"maps 'prompt' twice"),
    ({"prompt": 3}, r"columns must map our field names to your column names"),
    ("answer:question", r"columns: \['answer'\] is not a field of any format"),
])
def test_bad_columns_are_refused(char_tokenizer, columns, message):
    with pytest.raises(ValueError, match=message):
        load_dataset([{"question": "q", "answer": "a"}], char_tokenizer, columns=columns, cache=False)


# -- multi-turn masks, and the batched encoder against the reference ---------------------------------------------------
CHATS = [
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1"},
                  {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2"},
                  {"role": "assistant", "content": "4, of course"}, {"role": "user", "content": "ok"},
                  {"role": "assistant", "content": " spaced  out "}]},
    {"messages": [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": ""},
                  {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the lazy dog"}]},
    {"instruction": "Paris is", "input": "the capital of", "output": "France"},
    {"prompt": "order number AB-12345", "completion": " from Lisbon\n"},
]


@pytest.mark.parametrize("make, template", [
    (make_char_tokenizer, "chatml"), (make_bpe_tokenizer, "chatml"), (make_char_tokenizer, None),
    (make_bpe_tokenizer, None), (make_bpe_tokenizer, "tools")], ids=["char", "bpe", "char-plain", "bpe-plain",
                                                                    "bpe-tools"])
@pytest.mark.parametrize("mask_prompt", [True, False])
def test_the_batched_encoder_gives_the_reference_encoding_token_by_token(make, template, mask_prompt):
    tok = make()
    tok.chat_template = {"chatml": tok.chat_template, None: None, "tools": TOOL_CHATML}[template]
    records = [r for r in CHATS for _ in range(3)]  # more than the CHECKED conversations encoded both ways
    encoder = Encoder(tok, mask_prompt)
    from lora.data.formats import detect_format

    conversations = [(to_messages(r, detect_format(r)), None) for r in records]
    encoded = encoder.chats(conversations)
    assert not encoder.exact["chat"] and len(records) > CHECKED  # the fast path ran, and agreed where checked
    for (messages, _), (ids, labels) in zip(conversations, encoded):
        ref_ids, ref_labels = tokenize_chat(tok, messages, mask_prompt)
        assert ids.tolist() == ref_ids and labels.tolist() == ref_labels


def test_every_assistant_turn_and_nothing_else_carries_the_loss(char_tokenizer):
    examples, _ = load_dataset(CHATS[1:2], char_tokenizer, cache=False)
    assert trained_runs(char_tokenizer, examples[0]) == ["2<|im_end|>\n", "4, of course<|im_end|>\n",
                                                         " spaced  out <|im_end|>\n"]


def test_an_encoder_that_disagrees_with_the_reference_falls_back_to_it(monkeypatch, char_tokenizer):
    """The fast path is a shortcut: where it would differ, the reference's encoding is what the examples get."""
    import lora.data.encode as encode

    def shifted(self, encoding, spans, length):  # a stand-in for a tokenizer whose offsets mislead
        got = original(self, encoding, spans, length)
        return None if got is None else (got[0], got[1][::-1].copy())

    original = encode.Encoder._labels
    monkeypatch.setattr(encode.Encoder, "_labels", shifted)
    encoder = encode.Encoder(char_tokenizer)
    conversations = [(to_messages(r, "chat"), None) for r in CHATS[:3]]
    encoded = encoder.chats(conversations)
    assert encoder.exact["chat"]
    for (messages, _), (ids, labels) in zip(conversations, encoded):
        assert labels.tolist() == tokenize_chat(char_tokenizer, messages)[1]


@pytest.mark.parametrize("make", [make_char_tokenizer, make_bpe_tokenizer], ids=["char", "bpe"])
def test_generation_marks_give_transformers_assistant_mask(make):
    tok = make()
    tok.chat_template = GENERATION_CHATML
    records = [r for r in CHATS if "messages" in r] * 4
    examples, _ = load_dataset(records, tok, cache=False)
    for record, ex in zip(records, examples):
        ref = tok.apply_chat_template(record["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ours = [0] + [int(t != IGNORE) for t in ex["targets"][:-1]]  # token i is trained when target i - 1 is
        assert ex["input_ids"] == list(ref["input_ids"])
        assert ours[1:] == list(ref["assistant_masks"])[1:]  # the first token is never a target
    assert trained_runs(tok, examples[1]) == ["2<|im_end|>", "4, of course<|im_end|>", " spaced  out <|im_end|>"]


def test_a_chat_template_error_names_the_record(char_tokenizer):
    tok = make_char_tokenizer(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match=r"records\[0\]: the tokenizer's chat template refuses this conversation "
                                         r"\(roles must alternate\)"):
        load_dataset(CHATS[:1], tok, cache=False)
