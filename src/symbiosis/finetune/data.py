"""Fine-tuning data: JSONL files in three schemas, validated completely before training starts.

One JSON object per line (blank lines are ignored), in one of the schemas users already have:

- ``{"text": "..."}``: plain text; loss on every token.
- ``{"prompt": "...", "completion": "..."}``: the two strings are joined as they are; loss on the
  completion (with ``loss_on="all"`` on everything).
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: rendered with
  the tokenizer's chat template; loss on the assistant messages (with ``loss_on="all"`` on
  everything). Messages may also carry ``name``.

Other top-level keys (ids, metadata) are allowed and ignored. Texts and completions end with the
tokenizer's EOS token. Every problem — malformed JSON, an unknown schema, empty text, a wrong chat
schema, a sequence over ``max_length``, an example left without loss tokens — is collected with its
file and line and reported together in one ``DataError``; nothing is skipped silently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from ..errors import SymbiosisError

LossOn = Literal["completion", "all"]

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "name"}
#: At most this many problems are listed in a ``DataError`` message (all are counted).
MAX_LISTED_PROBLEMS = 20


class DataError(SymbiosisError, ValueError):
    """Invalid fine-tuning data; ``problems`` holds one ``file:line: what is wrong`` entry per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        listed = "\n  ".join(self.problems[:MAX_LISTED_PROBLEMS])
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        suffix = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.problems)} problem(s) in the fine-tuning data:\n  {listed}{suffix}")


class _RecordError(ValueError):
    """One record's problem (without its location)."""


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``labels`` is ``input_ids`` with ``IGNORE_INDEX`` where no loss is taken."""

    source: str
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class _Rendered:
    text: str
    loss_spans: list[tuple[int, int]]
    add_special_tokens: bool


def load_examples(
    paths: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    loss_on: LossOn = "completion",
    truncate: bool = False,
) -> list[Example]:
    """Read, validate and tokenize every line of ``paths``; raise ``DataError`` listing all problems.

    ``truncate`` keeps the first ``max_length`` tokens of longer sequences instead of reporting them.
    """
    if loss_on not in ("completion", "all"):
        raise ValueError(f"loss_on must be 'completion' or 'all', got {loss_on!r}")
    if not paths:
        raise DataError(["no data files given"])
    examples, problems = [], []
    for path in map(Path, paths):
        if not path.is_file():
            problems.append(f"{path}: no such file")
            continue
        records = 0
        for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
            if not raw.strip():
                continue
            records += 1
            source = f"{path}:{number}"
            try:
                rendered = _render(_parse(raw), tokenizer, loss_on)
                examples.append(_tokenize(rendered, tokenizer, source, max_length=max_length, truncate=truncate))
            except _RecordError as exc:
                problems.append(f"{source}: {exc}")
        if records == 0:
            problems.append(f"{path}: no examples (the file is empty)")
    if problems:
        raise DataError(problems)
    return examples


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _RecordError(f"not UTF-8 text (bad byte at column {exc.start + 1})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _RecordError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _RecordError(f"expected a JSON object, got {type(record).__name__}")
    return record


def _render(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, loss_on: LossOn) -> _Rendered:
    """The text to tokenize and the character spans that carry loss."""
    schemas = [name for name, keys in (("text", {"text"}), ("prompt/completion", {"prompt", "completion"}), ("chat", {"messages"})) if keys <= record.keys()]
    if len(schemas) != 1:
        found = ", ".join(sorted(record)) or "none"
        reason = "several schemas at once" if schemas else "unknown schema"
        raise _RecordError(
            f'{reason} (keys: {found}); expected {{"text": ...}}, {{"prompt": ..., "completion": ...}} or {{"messages": [...]}}'
        )
    if schemas[0] == "text":
        text = _non_empty_string(record, "text")
        full = text + _eos(tokenizer)
        return _Rendered(full, [(0, len(full))], True)
    if schemas[0] == "prompt/completion":
        prompt = _non_empty_string(record, "prompt")
        full = prompt + _non_empty_string(record, "completion") + _eos(tokenizer)
        return _Rendered(full, [(0 if loss_on == "all" else len(prompt), len(full))], True)
    return _render_chat(record["messages"], tokenizer, loss_on)


def _non_empty_string(record: dict[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise _RecordError(f'"{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise _RecordError(f'"{key}" is empty')
    return value


def _eos(tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.eos_token or ""


def _render_chat(messages: Any, tokenizer: PreTrainedTokenizerBase, loss_on: LossOn) -> _Rendered:
    _check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise _RecordError("chat messages need a tokenizer with a chat template, and this tokenizer has none")
    full = _apply_template(tokenizer, messages, add_generation_prompt=False)
    if loss_on == "all":
        return _Rendered(full, [(0, len(full))], False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:index], add_generation_prompt=True)
        through = _apply_template(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise _RecordError(
                "the chat template does not render conversation prefixes as prefixes of the whole "
                "conversation, so assistant turns cannot be located; use loss on all tokens (--loss-on all)"
            )
        spans.append((len(before), len(through)))
    return _Rendered(full, spans, False)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _RecordError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _RecordError(f"{where} must be an object with role and content, got {type(message).__name__}")
        missing = {"role", "content"} - message.keys()
        if missing:
            raise _RecordError(f"{where} lacks {', '.join(sorted(missing))} (keys: {', '.join(sorted(message)) or 'none'})")
        unknown = message.keys() - MESSAGE_KEYS
        if unknown:
            raise _RecordError(f"{where} has unsupported keys {', '.join(sorted(unknown))} (allowed: role, content, name)")
        if message["role"] not in ROLES:
            raise _RecordError(f"{where} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise _RecordError(f"{where} content must be a non-empty string")
    if not any(m["role"] == "assistant" for m in messages):
        raise _RecordError("the conversation has no assistant message to learn from")


def _apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # the template's own error (e.g. raise_exception on a role order it refuses)
        raise _RecordError(f"the chat template refused this conversation: {exc}") from None


def _tokenize(rendered: _Rendered, tokenizer: PreTrainedTokenizerBase, source: str, *, max_length: int, truncate: bool) -> Example:
    encoding = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    labels = [
        token if start < end and any(lo <= start < hi for lo, hi in rendered.loss_spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoding["offset_mapping"], strict=True)
    ]
    if len(ids) > max_length:
        if not truncate:
            raise _RecordError(f"{len(ids)} tokens, more than the maximum length {max_length} (raise --max-length or pass --truncate)")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise _RecordError("no tokens to learn from" + (" after truncation" if len(encoding["input_ids"]) > max_length else ""))
    return Example(source, ids, labels)
