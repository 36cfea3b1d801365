import json

import pytest

from lorakit.train.data import IGNORE, build_examples, collate, load_rows, prompt_and_answer, tokenize_row


class CharTok:
    """A real (if tiny) tokenizer: one id per character, no chat template."""
    chat_template = None
    eos_token_id = 1
    pad_token_id = 0
    bos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 120 for c in text]}


def write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_formats_detected(tmp_path):
    assert load_rows(write(tmp_path, [{"prompt": "a", "completion": "b"}]))[1] == "prompt/completion"
    assert load_rows(write(tmp_path, [{"instruction": "a", "input": "", "output": "b"}]))[1] == "alpaca"
    assert load_rows(write(tmp_path, [{"text": "abc"}]))[1] == "text"
    msgs = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert load_rows(write(tmp_path, [msgs]))[1] == "messages"
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\nhello,world\n")
    assert load_rows(csv) == ([{"prompt": "hello", "completion": "world"}], "prompt/completion")


@pytest.mark.parametrize("rows,msg", [
    ([{"prompt": "a", "completion": "b"}, "{oops"], r"d\.jsonl:2: not valid JSON"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], r"d\.jsonl:2: missing key\(s\) \['completion'\]"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}], r":2: 'completion' must be a string"),
    ([{"foo": 1}], r":1: row has keys \['foo'\], which match no format"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], r":1: messages\[0\] must be"),
    ([{"messages": [{"role": "user", "content": "x"}]}], r":1: messages has no assistant turn"),
    ([{"text": "a"}, {"text": "b", "extra": 1}], r":2: unexpected key\(s\) \['extra'\]"),
    (["[1, 2]"], r":1: expected a JSON object, got list"),
])
def test_malformed_rows_name_line_and_expectation(tmp_path, rows, msg):
    with pytest.raises(ValueError, match=msg):
        load_rows(write(tmp_path, rows))


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="is empty"):
        load_rows(write(tmp_path, ["", "  "]))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(tmp_path / "nope.jsonl")


def test_labels_only_on_completion_plain():
    tok = CharTok()
    ids, labels = tokenize_row(tok, {"prompt": "Q:", "completion": "ok"}, "plain", 100)
    assert len(ids) == 5 and labels[:2] == [IGNORE, IGNORE] and labels[2:] == ids[2:]  # 'o','k',eos
    assert ids[-1] == tok.eos_token_id
    ids, labels = tokenize_row(tok, {"instruction": "do", "input": "x", "output": "y"}, "plain", 100)
    assert [i for i, l in zip(ids, labels) if l != IGNORE] == [2 + ord("y") % 120, 1]
    ids, labels = tokenize_row(tok, {"text": "abc"}, "plain", 100)
    assert labels == ids


def test_truncation_and_collate():
    tok = CharTok()
    ex = build_examples(tok, [{"prompt": "abc", "completion": "de"}, {"prompt": "a", "completion": "b"}], "plain",
                        max_len=4)
    assert len(ex[0].input_ids) == 4
    b = collate(ex, pad_id=0)
    assert b["input_ids"].shape == (2, 4) and b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"][1, 3] == IGNORE
    with pytest.raises(ValueError, match="no target tokens"):
        build_examples(tok, [{"prompt": "abcdef", "completion": "x"}], "plain", max_len=3)


def test_chat_template_labels_assistant_turns_only(embedded):
    _, tok = embedded
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                        {"role": "assistant", "content": "ciao"}]}
    ids, labels = tokenize_row(tok, row, "chat", 512)
    target = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])
    assert target == "hello<|im_end|>ciao<|im_end|>"
    prompt, answer = prompt_and_answer(row)
    assert answer == "ciao" and prompt[-1]["content"] == "bye"
    ids, labels = tokenize_row(tok, {"prompt": "2+2?", "completion": "4"}, "chat", 512)
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE]) == "4<|im_end|>"
    assert "<|im_start|>user\n2+2?<|im_end|>" in tok.decode(ids)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:3: not UTF-8 text \(byte b'\\xe9'"):
        load_rows(p)
    c = tmp_path / "latin1.csv"
    c.write_bytes(b"prompt,completion\nhello,world\nna\xefve,x\n")
    with pytest.raises(ValueError, match=r"latin1\.csv:3: not UTF-8"):
        load_rows(c)
    c.write_bytes(b"\xef\xbb\xbfprompt,completion\n\"two\nlines\",ok\n")  # a BOM and a quoted newline are fine
    assert load_rows(c) == ([{"prompt": "two\nlines", "completion": "ok"}], "prompt/completion")
