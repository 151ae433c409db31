"""Log-probabilities in the OpenAI formats: completions (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``) and chat (``content``: token, logprob, bytes, top_logprobs).

A token is shown as the tokenizer decodes it alone (special tokens included); alternatives that
decode to the same string share one key of a completions ``top_logprobs`` dict, which keeps the
most likely one's log-probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from transformers import PreTrainedTokenizerBase

from .sampling import TokenLogprob


class TokenStrings:
    """Each token id's text, decoded once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._decode = lru_cache(maxsize=1 << 16)(lambda token: tokenizer.decode([token], skip_special_tokens=False))

    def __call__(self, token: int) -> str:
        return self._decode(token)


def completion_logprobs(tokens: Sequence[int], entries: Sequence[TokenLogprob | None], strings: TokenStrings, offset: int = 0) -> dict[str, Any]:
    """The ``logprobs`` of a completion choice for ``tokens`` (``entries[i]`` None: none, as for a prompt's first token)."""
    texts = [strings(t) for t in tokens]
    offsets, position = [], offset
    for text in texts:
        offsets.append(position)
        position += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob if e is not None else None for e in entries],
        "top_logprobs": [_top(e, strings) if e is not None else None for e in entries],
        "text_offset": offsets,
    }


def _top(entry: TokenLogprob, strings: TokenStrings) -> dict[str, float]:
    """Alternatives by text, most likely first; of several that decode alike, the most likely one's log-probability."""
    top: dict[str, float] = {}
    for token, logprob in entry.top:
        top.setdefault(strings(token), logprob)
    return top


def chat_logprobs(entries: Sequence[TokenLogprob], strings: TokenStrings) -> dict[str, Any]:
    """The ``logprobs`` of a chat choice."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = strings(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries], "refusal": None}
