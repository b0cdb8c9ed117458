"""Reading JSON-lines files of records (problems, chats, multiple-choice questions) with errors that
name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from hemat.errors import HematError


def read_jsonl(path: str | Path, error: type[HematError], kind: str, items: str,
               limit: int | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) for each non-blank line of path, at most limit of them. Raises
    `error`: "{kind} PATH does not exist", "PATH:LINE: not valid JSON (...)", "{kind} PATH has no {items}"."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{kind} {path} does not exist")
    count = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            count += 1
            yield lineno, record
    if not count:
        raise error(f"{kind} {path} has no {items}")
