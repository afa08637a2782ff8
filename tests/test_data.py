"""JSONL formats, prompt masking, over-long policy, and packing that leaves the loss unchanged."""

import json

import pytest
import torch
import torch.nn.functional as F

from lora.data import IGNORE, collate, load_dataset, model_inputs, pack, read_jsonl
from conftest import make_llama_for, make_char_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row, fmt", [
    ({"instruction": "Say hi", "output": "hi"}, "alpaca"),
    ({"instruction": "Echo", "input": "x", "output": "x"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "chat"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"text": "hello world"}, "text"),
    ({"text": "win a prize", "label": "spam"}, "classification"),
])
def test_format_is_detected_from_the_keys(tmp_path, row, fmt):
    assert read_jsonl(write_jsonl(tmp_path / "d.jsonl", [row, row]))[0] == fmt


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a"'], r"d.jsonl:2: not valid JSON"),
    (['{"foo": 1}'], r"d.jsonl:1: cannot tell the format from the keys \['foo'\]; expected"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": 3}'],
     r"d.jsonl:2: 'instruction' and 'output' .* must be strings for the 'alpaca' format"),
    (['[1, 2]'], r"d.jsonl:1: expected a JSON object, found list"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], r"d.jsonl:1: messages\[0\] must be"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], r"d.jsonl:1: 'messages' has no assistant turn"),
    ([''], "holds no examples"),
])
def test_bad_lines_name_file_line_found_and_expected(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        read_jsonl(tmp_path / "x.jsonl", "csv")
    with pytest.raises(ValueError, match="does not exist"):
        read_jsonl(tmp_path / "x.jsonl")


def test_only_the_answer_carries_a_loss(tmp_path, char_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Name a color", "input": "sky", "output": "blue"}])
    (ex,), stats = load_dataset(path, char_tokenizer)
    ids, targets = ex["input_ids"], ex["targets"]
    assert char_tokenizer.decode(ids).startswith("<|im_start|>user\nName a color\n\nsky<|im_end|>")
    learned = [t for t in targets if t != IGNORE]
    assert char_tokenizer.decode(learned) == "blue<|im_end|>\n"
    # targets are the next tokens: wherever a target is set it equals the following input id
    assert all(t == ids[i + 1] for i, t in enumerate(targets) if t != IGNORE)
    assert stats.target_tokens == len(learned)
    (full,), _ = load_dataset(path, char_tokenizer, mask_prompt=False)
    assert sum(t != IGNORE for t in full["targets"]) == len(ids) - 1


def test_multi_turn_chat_learns_every_assistant_turn(tmp_path, char_tokenizer):
    row = {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "1+1"},
                        {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2"},
                        {"role": "assistant", "content": "4"}]}
    (ex,), _ = load_dataset(write_jsonl(tmp_path / "d.jsonl", [row]), char_tokenizer)
    learned = char_tokenizer.decode([t for t in ex["targets"] if t != IGNORE])
    assert learned == "2<|im_end|>\n4<|im_end|>\n"


def test_tokenizer_without_chat_template_uses_the_plain_fallback(tmp_path):
    tok = make_char_tokenizer(chat_template=None)
    (ex,), _ = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}]), tok)
    assert tok.decode(ex["input_ids"]) == "user: p\nassistant: c<|im_end|>"
    assert tok.decode([t for t in ex["targets"] if t != IGNORE]) == " c<|im_end|>"


def test_a_byte_level_bpe_without_chat_template_trains_and_generates_from_the_same_prompt(tmp_path):
    """GPT-2-style: "assistant: " alone ends in [":", "Ġ"] but [":", "Ġc"] with the answer; the plain template
    must keep the prompt a prefix of the example, and generation must see exactly the training prompt."""
    from conftest import make_bpe_tokenizer
    from lora.generate import _encode

    tok = make_bpe_tokenizer()
    tok.chat_template = None
    records = [{"prompt": "the capital of France", "completion": "Paris"},
               {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
                             {"role": "assistant", "content": "the lazy dog"}]}]
    for record in records:
        (ex,), _ = load_dataset(write_jsonl(tmp_path / "d.jsonl", [record]), tok)
        answer = record.get("completion") or record["messages"][-1]["content"]
        first = next(i for i, t in enumerate(ex["targets"]) if t != IGNORE) + 1  # targets are shifted by one
        assert tok.decode(ex["input_ids"][first:]).strip() == answer + tok.eos_token
        prompt = record["messages"][:-1] if "messages" in record else record["prompt"]
        ids, _ = _encode(tok, [prompt], chat=True, device="cpu")
        assert ids[0].tolist() == ex["input_ids"][:first]


def test_the_plain_template_starts_with_the_bos_a_post_processor_adds(tmp_path):
    """Llama-3-style base tokenizers add BOS in their post-processor and do not set add_bos_token."""
    from tokenizers import processors

    from conftest import make_bpe_tokenizer
    from lora.data import render_chat

    tok = make_bpe_tokenizer()
    tok.chat_template = None
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                        special_tokens=[("<|im_start|>", bos)])
    assert not getattr(tok, "add_bos_token", False)
    ids = render_chat(tok, [{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert ids[0] == bos and ids.count(bos) == 1


def test_exact_match_prompts_keep_the_system_prompt_and_earlier_turns(tmp_path, char_tokenizer):
    from lora.data import prompts_and_answers

    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1"},
             {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2"},
             {"role": "assistant", "content": "4"}]
    prompts, answers = prompts_and_answers(write_jsonl(tmp_path / "d.jsonl", [{"messages": turns}]))
    assert prompts == [turns[:-1]] and answers == ["4"]


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, char_tokenizer):
    rows = [{"text": "short"}, {"text": "x" * 50}, {"text": "y" * 60}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, stats = load_dataset(path, char_tokenizer, max_length=20)
    assert [len(e["input_ids"]) for e in examples] == [6, 20, 20]
    assert (stats.truncated, stats.dropped) == (2, 0)
    examples, stats = load_dataset(path, char_tokenizer, max_length=20, overlong="drop")
    assert len(examples) == 1 and (stats.truncated, stats.dropped) == (0, 2)
    assert "1/3 examples kept (0 truncated, 2 dropped as too long)" in stats.describe()
    # an instruction whose answer would be cut away entirely has nothing to learn: dropped, and counted
    long_prompt = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "z" * 40, "output": "ok"}] * 2
                              + [{"instruction": "q", "output": "ok"}])
    examples, stats = load_dataset(long_prompt, char_tokenizer, max_length=30)
    assert len(examples) == 1 and stats.dropped == 2
    with pytest.raises(ValueError, match="overlong must be one of"):
        load_dataset(path, char_tokenizer, overlong="wrap")


def test_classification_labels_become_class_indices(tmp_path, char_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "spam"}, {"text": "b", "label": "ham"}])
    examples, stats = load_dataset(path, char_tokenizer)
    assert stats.labels == ["ham", "spam"] and [e["label"] for e in examples] == [1, 0]
    with pytest.raises(ValueError, match=r"labels \['spam'\] are not among the classes \['ham'\]"):
        load_dataset(path, char_tokenizer, label_names=["ham"])


def test_integer_labels_sort_as_numbers(tmp_path, char_tokenizer):
    rows = [{"text": t, "label": label} for t, label in (("a", 10), ("b", 2), ("c", 1), ("d", 2))]
    examples, stats = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), char_tokenizer)
    assert stats.labels == [1, 2, 10]  # as strings they would sort 1, 10, 2
    assert [e["label"] for e in examples] == [2, 1, 0, 1]


def test_mixed_integer_and_string_labels_are_refused_with_the_line(tmp_path, char_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1},
                                              {"text": "c", "label": "2"}])
    with pytest.raises(ValueError, match=r"d.jsonl:3: label '2' is string, but line 1 has the integer label 1; "
                                         r"use one kind for every label"):
        load_dataset(path, char_tokenizer)


def _write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"d.jsonl:2: not UTF-8 text \(byte 0xe9 .*save the file as UTF-8"),
    (b'{"text": "ok"}\n{"text": 1' + b"0" * 5000 + b'}\n', r"d.jsonl:2: the JSON cannot be read .*one JSON object"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", r"d.jsonl:1: the JSON cannot be read"),
    (b'{"text": "a\\ud800b"}\n', r"d.jsonl:1: the string 'a\\ud800b' holds an unpaired surrogate"),
    (b'{"instruction": "a", "output": "b"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n',
     r"d.jsonl:2: this record is in the 'chat' format .* but line 1 is 'alpaca'; one file holds one format"),
    (b'{"text": "a", "label": "x"}\n{"text": "b"}\n', r"d.jsonl:2: this record is in the 'text' format"),
    (b'{"text": "", "label": "x"}\n', r"d.jsonl:1: 'text' must be a non-empty string"),
    (b"{bad\n", r"d.jsonl:1: not valid JSON \(.* at column 2\): '\{bad'; each line must be one JSON object"),
], ids=["latin-1", "huge-int", "deep-nesting", "lone-surrogate", "mixed-formats", "label-missing", "empty-text",
        "bad-json"])
def test_unreadable_content_names_file_line_and_fix(tmp_path, content, message):
    path = _write_bytes(tmp_path / "d.jsonl", content)
    with pytest.raises(ValueError, match=message) as info:
        read_jsonl(path)
    assert type(info.value) is ValueError and info.value.__cause__ is None


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = _write_bytes(tmp_path / "d.jsonl", b'\xef\xbb\xbf{"text": "hi"}\n')
    assert read_jsonl(path) == ("text", [{"text": "hi"}])


def test_an_overlong_line_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    import lora.data.sources

    monkeypatch.setattr(lora.data.sources, "MAX_LINE_BYTES", 1024**2)
    path = _write_bytes(tmp_path / "d.jsonl", b'{"text": "ok"}\n{"text": "' + b"x" * (3 * 1024**2) + b'"}\n')
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ValueError, match=r"d.jsonl:2: the line is longer than 1 MiB; a JSONL file holds one"):
        read_jsonl(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2.5 * 1024**2  # at most one limit's worth of the line was read


def test_a_folder_or_a_missing_file_says_what_to_pass(tmp_path):
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match=r"the data folder .* holds no data files \(\.jsonl, .*\); pass a data file"):
        read_jsonl(tmp_path)
    with pytest.raises(ValueError, match=r"x.jsonl does not exist; pass the path of a JSONL file"):
        read_jsonl(tmp_path / "x.jsonl")


def test_chat_template_and_tokenization_errors_name_the_line(tmp_path):
    tok = make_char_tokenizer(chat_template="{{ raise_exception('roles must alternate') }}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}] * 2)
    with pytest.raises(ValueError, match=r"d.jsonl:1: the tokenizer's chat template refuses this conversation "
                                         r"\(roles must alternate\)"):
        load_dataset(path, tok)


def test_exact_match_needs_a_prompt_before_the_answer(tmp_path):
    from lora.data import prompts_and_answers

    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "p"},
                                                           {"role": "assistant", "content": "c"}]},
                                              {"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: exact-match evaluation needs a conversation that ends with a "
                                         r"prompt turn and then the assistant's answer in text; found the roles "
                                         r"\['assistant'\]"):
        prompts_and_answers(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_length": 0}, "max_length must be None or an integer >= 1, got 0"),
    ({"max_length": "64"}, "max_length must be None or an integer >= 1, got '64'"),
    ({"label_names": "spam"}, "label_names must be a list of class labels"),
])
def test_bad_load_arguments(tmp_path, char_tokenizer, kwargs, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "spam"}])
    with pytest.raises(ValueError, match=message):
        load_dataset(path, char_tokenizer, **kwargs)


def _summed_loss(model, batch):
    logits = model(**model_inputs(batch)).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum")


def test_packed_loss_equals_unpacked_loss(tmp_path, char_tokenizer):
    rows = [{"instruction": f"Repeat {w}", "output": w} for w in ("cat", "horse", "a", "elephant", "dog", "ox")]
    examples, stats = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), char_tokenizer)
    model = make_llama_for(char_tokenizer)
    pad = char_tokenizer.pad_token_id
    packed = pack(examples, seq_len=80, pad_id=pad)
    assert len(packed) < len(examples)  # several examples share a row
    assert all(r["input_ids"].shape == (80,) for r in packed)
    with torch.no_grad():
        unpacked_loss = sum(_summed_loss(model, collate([e], pad)) for e in examples)
        packed_loss = _summed_loss(model, collate(packed, pad))
        padded_loss = _summed_loss(model, collate(examples, pad))  # right-padded batch with attention_mask
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(padded_loss, unpacked_loss, atol=1e-4, rtol=1e-5)
    assert int((collate(packed, pad)["targets"] != IGNORE).sum()) == stats.target_tokens


def test_packed_examples_do_not_see_each_other(char_tokenizer):
    model = make_llama_for(char_tokenizer)
    a = {"input_ids": [10, 11, 12, 13], "targets": [11, 12, 13, IGNORE]}
    b = {"input_ids": [20, 21, 22], "targets": [21, 22, IGNORE]}
    a2 = {"input_ids": [30, 31, 32, 33], "targets": [31, 32, 33, IGNORE]}
    with torch.no_grad():
        first = model(**model_inputs(collate(pack([a, b], 8, 0), 0))).logits
        second = model(**model_inputs(collate(pack([a2, b], 8, 0), 0))).logits
        alone = model(torch.tensor([b["input_ids"]])).logits
    torch.testing.assert_close(first[0, 4:7], second[0, 4:7])
    torch.testing.assert_close(first[0, 4:7], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit a packed row of 3"):
        pack([a], 3, 0)


def test_packing_fills_rows_best_fit_and_keeps_every_example_whole_once():
    lengths = [6, 5, 4, 5]  # in file order these fill 3 rows of 10 ([6], [5, 4], [5]); 6+4 and 5+5 fill 2
    examples = [{"input_ids": [100 * (i + 1) + j for j in range(n)], "targets": [IGNORE] * (n - 1) + [7]}
                for i, n in enumerate(lengths)]
    rows = pack(examples, seq_len=10, pad_id=0)
    assert len(rows) == 2 and all(r["real_tokens"] == 10 for r in rows)
    found = []
    for row in rows:
        ids, positions = row["input_ids"].tolist(), row["position_ids"].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        found += [ids[s:e] for s, e in zip(starts, starts[1:])]
    assert sorted(found) == sorted(e["input_ids"] for e in examples)  # each example once, whole, positions from 0
    assert [r["input_ids"][0].item() for r in rows] == [100, 200]  # inside a row, file order
