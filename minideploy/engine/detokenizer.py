"""Incremental, UTF-8-safe detokenization for streaming.

Decoding token by token breaks in two ways: a multi-byte character split over
several byte-level tokens decodes to U+FFFD until its last byte arrives, and
SentencePiece-style tokenizers decide a token's leading space from its left
neighbour. So each step decodes a short window [prefix_offset, end) and emits
only what grew past the previous window, and only once it no longer ends in
an incomplete character. Stop strings are held back until they can no longer
start inside the unsent tail.
"""
from __future__ import annotations

from typing import Sequence

# Prompt tokens kept as left context so the first output token decodes with its spacing.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop_words: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_words = [w for w in stop_words if w]
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all output text decoded so far
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text that is safe to show (may be "")."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is left (an incomplete tail included)."""
        full = self._decode(self.ids[self.prefix_offset:])
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        if len(full) > len(prefix):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        for word in self.stop_words:
            at = self.text.find(word, max(0, self.sent - len(word) + 1))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        end = len(self.text)
        if not (final or self.stopped) and self.stop_words:
            end = self._longest_safe_end()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _longest_safe_end(self) -> int:
        """Hold back a tail that might be the start of a stop word."""
        end = len(self.text)
        for word in self.stop_words:
            for n in range(min(len(word) - 1, len(self.text)), 0, -1):
                if word.startswith(self.text[-n:]):
                    end = min(end, len(self.text) - n)
                    break
        return max(end, self.sent)
