"""Reading a JSON array or JSONL file item by item, with errors that name ``file:line[:column]``.

The array is parsed incrementally from fixed-size windows: a 1 GB file such as LLaVA's mix665k is never held as one
string next to all of its parsed objects (that alone would be several GB per training rank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

_CHUNK_CHARS = 1 << 22  # characters per window read from the file


class MalformedJSONError(ValueError):
    """A file that is not a JSON array (or JSONL); the message starts with ``file:line[:column]``."""


def json_array_items(path: Path) -> Iterator[tuple[int, Any]]:
    """``(index, item)`` of a top-level JSON array, parsed incrementally."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False
        line, base, line_start = 1, 0, 0  # line number at buf[0]; buf[0]'s offset in the file; start of its line

        def fill() -> None:
            nonlocal buf, pos, eof, line, base, line_start
            line += buf.count("\n", 0, pos)
            last_newline = buf.rfind("\n", 0, pos)
            if last_newline >= 0:
                line_start = base + last_newline + 1
            base += pos
            chunk = f.read(_CHUNK_CHARS)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0

        def skip_space() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return
                fill()

        def fail(msg: str, at: int) -> MalformedJSONError:
            at_line = line + buf.count("\n", 0, at)
            newline = buf.rfind("\n", 0, at)
            column = (at - newline if newline >= 0 else base + at - line_start + 1)
            return MalformedJSONError(f"{path}:{at_line}:{column}: malformed JSON: {msg}")

        fill()
        skip_space()
        if pos >= len(buf) or buf[pos] != "[":
            raise fail("expected '[' (a JSON array of samples)", pos)
        pos += 1
        index = 0
        while True:
            skip_space()
            if pos >= len(buf):
                raise fail("the array is not closed with ']'", pos)
            if buf[pos] == "]":
                pos += 1
                skip_space()
                if pos < len(buf):
                    raise fail("extra data after the array", pos)
                return
            if index:
                if buf[pos] != ",":
                    raise fail("expected ',' or ']' between samples", pos)
                pos += 1
                skip_space()
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if eof:
                        raise fail(err.msg, err.pos) from err
                else:
                    # An item ending exactly at the window's edge may be cut (a number): decode it with more text.
                    if end < len(buf) or eof:
                        break
                fill()  # the item continues in the next window
            yield index, item
            pos = end
            index += 1


def jsonl_items(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line index, item)`` of a JSONL file; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise MalformedJSONError(f"{path}:{lineno + 1}: malformed JSON line: {err.msg}") from err
