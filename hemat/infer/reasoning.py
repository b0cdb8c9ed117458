"""Separate a reasoning model's thinking from its answer, DeepSeek-R1 style: `<think>…</think>` at the
start of the response, then the answer. Streaming and whole-text forms give the same split.

Rules: the start tag counts only at the beginning of the response (after optional whitespace, which is
then dropped); after the end tag everything is content, tags included, with the whitespace right after
the end tag dropped. A response with no start tag is all content, unless the chat template's generation
prompt already opened the reasoning (`starts_in_reasoning`). Reasoning text is passed through unchanged."""

from __future__ import annotations

from hemat.errors import HematError

REASONING, CONTENT = "reasoning", "content"


class ReasoningSplitter:
    """feed(piece) -> [(kind, text), ...] with kind "reasoning" or "content"; flush() at the end."""

    def __init__(self, start: str = "<think>", end: str = "</think>", starts_in_reasoning: bool = False) -> None:
        if not start or not end:
            raise HematError(f"reasoning tags must be non-empty, got start={start!r} end={end!r}")
        self.start, self.end = start, end
        # "opening": may still see the start tag; "reasoning"; "closing": dropping whitespace after the end tag
        self.state = REASONING if starts_in_reasoning else "opening"
        self.has_reasoning = starts_in_reasoning
        self.held = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        text = self.held + text
        self.held = ""
        while text:
            if self.state == "opening":
                stripped = text.lstrip()
                if not stripped or (len(stripped) < len(self.start) and self.start.startswith(stripped)):
                    self.held = text  # whitespace or a partial start tag: not decided yet
                    break
                if stripped.startswith(self.start):
                    self.state, self.has_reasoning = REASONING, True
                    text = stripped[len(self.start) :]
                else:
                    self.state = CONTENT
            elif self.state == REASONING:
                at = text.find(self.end)
                if at >= 0:
                    _emit(out, REASONING, text[:at])
                    self.state = "closing"
                    text = text[at + len(self.end) :]
                else:
                    keep = _partial_suffix(text, self.end)
                    _emit(out, REASONING, text[: len(text) - keep])
                    self.held = text[len(text) - keep :]
                    break
            elif self.state == "closing":
                text = text.lstrip()
                if text:
                    self.state = CONTENT
            else:
                _emit(out, CONTENT, text)
                break
        return out

    def flush(self) -> list[tuple[str, str]]:
        """Release what is held: an undecided opening is content, a partial end tag is reasoning."""
        text, self.held = self.held, ""
        out: list[tuple[str, str]] = []
        _emit(out, REASONING if self.state == REASONING else CONTENT, text)
        return out


def _emit(out: list[tuple[str, str]], kind: str, text: str) -> None:
    if not text:
        return
    if out and out[-1][0] == kind:
        out[-1] = (kind, out[-1][1] + text)
    else:
        out.append((kind, text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def split_reasoning(
    text: str, start: str = "<think>", end: str = "</think>", starts_in_reasoning: bool = False
) -> tuple[str | None, str]:
    """(reasoning, content) of a whole response; reasoning is None when the response has none. A response
    cut off before the end tag is all reasoning."""
    splitter = ReasoningSplitter(start, end, starts_in_reasoning)
    parts = splitter.feed(text) + splitter.flush()
    reasoning = "".join(t for kind, t in parts if kind == REASONING)
    content = "".join(t for kind, t in parts if kind == CONTENT)
    return (reasoning if splitter.has_reasoning else None), content
