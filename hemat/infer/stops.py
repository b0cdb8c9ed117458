"""Stop strings over streamed text. Detokenised text arrives in pieces whose borders need not line up with
a stop string, so the matcher holds back any tail that could still grow into one, and it never emits a
stop string or anything after it."""

from __future__ import annotations

from collections.abc import Sequence

from hemat.errors import HematError


class StopMatcher:
    """feed(piece) -> (text safe to emit, stopped); flush() releases the held-back tail at the end.

    When several stop strings occur, the one that is complete first wins (ties: the one starting
    earliest), which is what feeding one character at a time would find, so the result does not
    depend on how the text was split into pieces."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        for i, s in enumerate(stop_strings):
            if not isinstance(s, str) or not s:
                raise HematError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self.stop_strings = list(stop_strings)
        self.held = ""
        self.stopped = False

    def feed(self, new_text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self.held + new_text
        match = self._first_match(text)
        if match is not None:
            self.held, self.stopped = "", True
            return text[:match], True
        keep = self._longest_partial_suffix(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = ("" if self.stopped else self.held), ""
        return text

    def _first_match(self, text: str) -> int | None:
        """Start of the stop string that ends first in text (ties: the earliest start), or None."""
        best: tuple[int, int] | None = None
        for s in self.stop_strings:
            start = text.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        return None if best is None else best[1]

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop_strings:
            for length in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:length]):
                    longest = length
                    break
        return longest
