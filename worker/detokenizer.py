"""Incremental detokenization with stop strings.

Decoding token by token breaks multi-byte characters and the spacing rules of most tokenizers,
so the text of new tokens is found as decode(context + new) minus decode(context), where the
context is the few tokens before them; a delta that ends in U+FFFD (an unfinished UTF-8 sequence)
waits for the next token. Stop strings are searched in the output text; the text is cut before
the first one, and a tail that could still grow into a stop string is held back from the stream
until the next token decides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_CONTEXT_TOKENS = 6  # prompt tokens kept as decoding context for the first output tokens
_MAX_HELD_TOKENS = 8  # tokens held without text (an unfinished character takes at most 4 bytes)
_INCOMPLETE = "\ufffd"


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """Text of one request's output tokens, streamed as deltas."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] = ()
    ) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        if tokenizer.decode(context).endswith(_INCOMPLETE):
            # The prompt ends inside a character: as context, its bytes would merge with the
            # first output bytes and show up in the output text. Decode the output on its own.
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0  # start of the decoding context in _ids
        self._read_offset = len(self._ids)  # first token whose text is not in `text` yet
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # the output text so far (cut before a stop string)
        self.stopped = False  # a stop string was found
        self._sent = 0  # characters of `text` already returned by take()

    def add(self, token_ids: Sequence[int]) -> bool:
        """Appends output tokens; True when a stop string has appeared (text is then final)."""
        if self.stopped:
            return True
        searched_from = len(self.text)
        for token in token_ids:
            self._ids.append(int(token))
            self._decode_pending(final=False)
        self._find_stop(searched_from)
        return self.stopped

    def flush(self) -> None:
        """Decodes whatever is pending, unfinished characters included (the request has ended)."""
        if not self.stopped and self._read_offset < len(self._ids):
            searched_from = len(self.text)
            self._decode_pending(final=True)
            self._find_stop(searched_from)

    def take(self, final: bool = False) -> str:
        """The text not returned yet. Unless final, a tail that may start a stop string waits."""
        if final:
            self.flush()
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._stop_prefix_len()
        delta = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta

    def _decode_pending(self, final: bool) -> None:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix_offset : self._read_offset])
        after = decode(self._ids[self._prefix_offset :])
        held = len(self._ids) - self._read_offset  # tokens whose text is not out yet
        grew = len(after) > len(before)
        # An unfinished character waits for its next bytes, but not forever; tokens that decode to
        # nothing become context once more than _MAX_HELD_TOKENS wait. Either way each step decodes
        # a bounded window, not an ever longer tail.
        if grew and (final or not after.endswith(_INCOMPLETE) or held > 2 * _MAX_HELD_TOKENS):
            self.text += after[len(before) :] if after.startswith(before) else after
        elif grew or held <= _MAX_HELD_TOKENS:
            return
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)

    def _find_stop(self, searched_from: int) -> None:
        if not self._stop:
            return
        start = max(0, searched_from - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for k in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0


class NoText:
    """The detokenizer of a request that wants token ids only: no text, no decoding."""

    text = ""
    stopped = False

    def add(self, token_ids: Sequence[int]) -> bool:
        return False

    def flush(self) -> None:
        pass

    def take(self, final: bool = False) -> str:
        return ""
