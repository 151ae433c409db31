"""Generated tokens to text, piece by piece, with stop sequences.

Text is released only when it is final: never half of a multi-byte character (a trailing U+FFFD
from an incomplete byte sequence is held back), and never the start of what may become a stop
sequence. A stop sequence ends the text just before it; it is not part of the output.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

_INCOMPLETE = "\ufffd"


class TextStream:
    """Incremental detokenizer of one choice; ``push`` returns newly final text and whether a stop matched.

    Without a tokenizer (an engine serving token ids only) it releases no text and has no stop sequences.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: Sequence[str] = ()) -> None:
        if tokenizer is None and any(stop):
            raise ValueError("stop sequences need a tokenizer")
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self._sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add ``token``; return (text that became final, True if a stop sequence was reached)."""
        self.ids.append(token)
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._release(len(self.text)), True
        self.text = text
        end = len(text.rstrip(_INCOMPLETE))
        held = (k for stop in self.stop for k in range(1, min(len(stop), end + 1)) if text[:end].endswith(stop[:k]))
        return self._release(end - max(held, default=0)), False

    def flush(self) -> str:
        """Everything not yet released (when the choice ends without a stop sequence)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        end = max(end, self._sent)
        piece = self.text[self._sent : end]
        self._sent = end
        return piece
