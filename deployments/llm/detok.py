"""Incremental detokenization with stop strings, for engines that don't do it themselves.

Text is emitted only once it can't change: a trailing partial UTF-8 character ("\ufffd") and a
tail that could still grow into a stop string are held back; the last delta flushes the rest.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.text = ""  # decoded text so far, cut at a stop string once one is found
        self.emitted = 0  # chars of `text` already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text that became final."""
        self.token_ids.append(token_id)
        text = self._tok.decode(self.token_ids, skip_special_tokens=True)
        cut = self._find_stop(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return ""
        self.text = text
        safe = len(text) - self._held_back(text)
        if safe <= self.emitted:
            return ""
        out, self.emitted = text[self.emitted:safe], safe
        return out

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out

    def _find_stop(self, text: str) -> int | None:
        # Only the unemitted tail can hold a new match (emitted text held no stop prefix).
        start = max(0, self.emitted - max((len(s) for s in self._stop), default=0))
        hits = [i for s in self._stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        held = 1 if text.endswith("\ufffd") else 0
        body = text[: len(text) - held]
        for s in self._stop:
            for k in range(min(len(s) - 1, len(body)), 0, -1):
                if body.endswith(s[:k]):
                    held = max(held, k + (len(text) - len(body)))
                    break
        return held
