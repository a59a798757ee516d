"""Line-oriented data files (prompts, preference pairs): every error quotes the file and
the line number, and is raised before anything is trained on the file's data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError


def numbered_lines(path: str | Path, what: str) -> Iterator[tuple[str, str]]:
    """``(where, line)`` for each non-blank line of the UTF-8 text file at ``path``, where
    ``where`` (``"<what> 'path' line N"``) starts the error message of a bad line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found")
    data = path.read_bytes()
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        # the line of the first bad byte, so the message points at it (bytes such as an
        # encoded lone surrogate, \xed\xa0\x80, are not UTF-8)
        lineno = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} {str(path)!r} line {lineno} is not UTF-8 text ({exc.reason}: byte {data[exc.start]:#04x})"
        ) from None
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            yield f"{what} {str(path)!r} line {lineno}", line


def json_line(line: str, where: str) -> Any:
    """The JSON value on one line; malformed JSON is a ConfigError at ``where``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
