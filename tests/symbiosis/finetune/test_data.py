"""Fine-tuning data: the three schemas, loss masks, and bad data reported by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from symbiosis.finetune import DataError, load_examples
from symbiosis.finetune.data import IGNORE_INDEX
from symbiosis.tiny import train_tiny_tokenizer

from ..usermodels import EXAMPLE_DATA


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return path


def learned_text(tokenizer, example) -> str:
    """The text of the tokens that carry loss."""
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def test_plain_text_learns_every_token_and_ends_with_eos(tmp_path, tokenizer):
    [example] = load_examples([write_jsonl(tmp_path / "d.jsonl", [{"text": "The river town woke early.", "id": 7}])], tokenizer, max_length=64)
    assert example.input_ids[0] == tokenizer.bos_token_id and example.labels[0] == IGNORE_INDEX
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert learned_text(tokenizer, example) == "The river town woke early.<|eos|>"
    assert example.source == f"{tmp_path / 'd.jsonl'}:1"


def test_prompt_completion_learns_the_completion_only_unless_asked(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Question: What is two plus two?\nAnswer:", "completion": " Two plus two is four."}])
    [example] = load_examples([path], tokenizer, max_length=64)
    assert learned_text(tokenizer, example) == " Two plus two is four.<|eos|>"
    [everything] = load_examples([path], tokenizer, max_length=64, loss_on="all")
    assert everything.input_ids == example.input_ids
    assert learned_text(tokenizer, everything) == "Question: What is two plus two?\nAnswer: Two plus two is four.<|eos|>"


def test_chat_uses_the_template_and_learns_assistant_turns_only(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six."},
    ]
    [example] = load_examples([write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])], tokenizer, max_length=128)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert learned_text(tokenizer, example) == "Four.<|im_end|>\nSix.<|im_end|>\n"


def test_blank_lines_are_not_examples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, "", "   ", {"text": "two"}])
    assert [e.source.rsplit(":", 1)[1] for e in load_examples([path], tokenizer, max_length=16)] == ["1", "4"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "unterminated', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ({"text": "   "}, '"text" is empty'),
        ({"text": 3}, '"text" must be a string'),
        ({"prompt": "only a prompt"}, "unknown schema (keys: prompt)"),
        ({"prompt": "Q", "completion": ""}, '"completion" is empty'),
        ({"text": "a", "messages": []}, "several schemas at once"),
        ({"messages": []}, '"messages" must be a non-empty list'),
        ({"messages": [{"from": "human", "value": "hi"}]}, "messages[0] lacks content, role (keys: from, value)"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] has role 'robot'"),
        ({"messages": [{"role": "user", "content": "hi", "weight": 0}]}, "unsupported keys weight"),
        ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}, "messages[0] content must be a non-empty string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"text": "word " * 40}, "more than the maximum length 16 (raise --max-length or pass --truncate)"),
    ],
)
def test_bad_record_is_reported_with_file_and_line(tmp_path, tokenizer, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a fine first line"}, line])
    with pytest.raises(DataError) as info:
        load_examples([path], tokenizer, max_length=16)
    assert info.value.problems == [f"{path}:2: " + info.value.problems[0].split(": ", 1)[1]]
    assert message in str(info.value)


def test_every_problem_in_every_file_is_reported_at_once(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": "good"}, "{oops"])
    second = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    empty = write_jsonl(tmp_path / "c.jsonl", [])
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        load_examples([first, second, empty, tmp_path / "bad.jsonl", tmp_path / "missing.jsonl"], tokenizer, max_length=32)
    sources = [p.split(": ", 1)[0] for p in info.value.problems]
    assert sources == [f"{first}:1", f"{first}:3", f"{second}:1", f"{empty}", f"{tmp_path / 'bad.jsonl'}:1", f"{tmp_path / 'missing.jsonl'}"]
    assert "not UTF-8" in info.value.problems[4]


def test_truncation_keeps_the_head_and_needs_something_left_to_learn(tmp_path, tokenizer):
    long_text = {"text": "word " * 40}
    [example] = load_examples([write_jsonl(tmp_path / "a.jsonl", [long_text])], tokenizer, max_length=16, truncate=True)
    assert len(example.input_ids) == 16
    long_prompt = {"prompt": "word " * 40, "completion": " end"}
    with pytest.raises(DataError, match="no tokens to learn from after truncation"):
        load_examples([write_jsonl(tmp_path / "b.jsonl", [long_prompt])], tokenizer, max_length=16, truncate=True)


def test_chat_data_needs_a_chat_template(tmp_path):
    plain = train_tiny_tokenizer()
    plain.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        load_examples([path], plain, max_length=32)


@pytest.mark.parametrize("name", ["chat", "qa", "text"])
def test_shipped_example_datasets_are_valid(tokenizer, name):
    examples = load_examples([EXAMPLE_DATA / f"{name}.jsonl"], tokenizer, max_length=256)
    assert len(examples) >= 200
