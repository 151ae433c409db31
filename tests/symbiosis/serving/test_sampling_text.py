"""Sampling parameters and incremental detokenization with stop sequences."""

from __future__ import annotations

import pytest
import torch

from symbiosis.serving.sampling import SamplingParams, next_token
from symbiosis.serving.text import TextStream
from symbiosis.tiny import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def stream_all(tokenizer, text: str, stop: list[str]) -> tuple[list[str], bool, str]:
    """Push ``text``'s tokens one by one: (pieces released, stopped, rest flushed at the end)."""
    stream, pieces = TextStream(tokenizer, stop), []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        piece, stopped = stream.push(token)
        pieces.append(piece)
        if stopped:
            return pieces, True, ""
    return pieces, False, stream.flush()


def test_pieces_add_up_to_the_text(tokenizer):
    pieces, stopped, rest = stream_all(tokenizer, "The river town woke early, café ☕ and all.", [])
    assert not stopped and "".join(pieces) + rest == "The river town woke early, café ☕ and all."
    assert all("\ufffd" not in piece for piece in pieces)  # half characters are held back


def test_stop_sequence_ends_the_text_before_it_and_is_never_released(tokenizer):
    pieces, stopped, _ = stream_all(tokenizer, "Two plus two is four.\nUser: more", ["\nUser:"])
    assert stopped and "".join(pieces) == "Two plus two is four."
    stream = TextStream(tokenizer, ["\nUser:"])
    released = "".join(stream.push(t)[0] for t in tokenizer("a line\nUse", add_special_tokens=False)["input_ids"])
    assert released == "a line"  # "\nUse" may still become the stop sequence: held back
    assert stream.flush() == "\nUse"


def test_greedy_top_p_and_seeds():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert next_token(logits, SamplingParams(max_tokens=1, temperature=0), torch.Generator()) == 1
    nucleus = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5)
    assert {next_token(logits, nucleus, g) for g in SamplingParams(max_tokens=1, n=50, seed=0).generators()} == {1}
    wide = SamplingParams(max_tokens=1, temperature=2.0, n=200, seed=4)
    draws = [next_token(logits, wide, g) for g in wide.generators()]
    assert set(draws) == {0, 1, 2, 3}
    assert draws == [next_token(logits, wide, g) for g in wide.generators()]  # same seed, same draws
    assert [g.initial_seed() for g in wide.generators(first_choice=5)][:2] == [9, 10]


@pytest.mark.parametrize("bad", [dict(temperature=2.5), dict(top_p=0.0), dict(n=0), dict(max_tokens=0)])
def test_invalid_sampling_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**{"max_tokens": 4, **bad})
