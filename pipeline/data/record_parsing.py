"""Parsing a chunk of input into documents, and validating each record on the way.

Every record that does not become a document is counted under one reason, with its `file:line`
(`file:row` for parquet and HF datasets):

- malformed_json: the line is not valid JSON, or not a JSON object
- missing_field: the text field is absent or null
- not_string: the text field is not a string (number, list, ...)
- invalid_utf8: the bytes are not UTF-8, or the text holds lone surrogates ("\\ud800" escapes)
- empty: the text is empty or whitespace only (a blank jsonl line counts here)
- too_long: the text has more than `max_chars` characters
- unreadable_file: a file could not be opened or read (counted once per file)
- corrupt_file: a compressed file is truncated or its data is damaged (counted once per file; the
  records read before the damage are kept)

A parquet file or HF dataset without the text column counts once, as missing_field, with the columns
it has. The processes that tokenize the documents are in pipeline.data.tokenize_workers.
"""

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

REASONS = (
    "malformed_json",
    "missing_field",
    "not_string",
    "invalid_utf8",
    "empty",
    "too_long",
    "unreadable_file",
    "corrupt_file",
)
MAX_EXAMPLES = 5
"""Locations kept per reason."""
MAX_FIELDS_SHOWN = 10
JSON_SPACE = " \t\n\r"
_scan_json = json.JSONDecoder().scan_once
"""The C scanner behind json.loads: called directly for the common line (`_parse_jsonl`)."""


@dataclass
class Parsed:
    """The documents of a chunk and what was skipped."""

    texts: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    first_bad: Optional[str] = None
    """`reason at file:line (detail)` of the first skipped record, for fail-fast mode."""

    def skip(self, reason: str, location: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(location)
        if self.first_bad is None:
            self.first_bad = f"{reason} at {location}" + (f" ({detail})" if detail else "")


def parse_chunk(chunk, text_key: str = "text", max_chars: int = 0) -> Parsed:
    """Valid document texts of `chunk` (a sources.Chunk) in order; `max_chars` 0 means no limit."""
    parsed = Parsed()
    if chunk.kind == "error":
        parsed.skip(chunk.reason, f"{chunk.path}:{chunk.first}", chunk.data)
    elif chunk.kind == "jsonl":
        _parse_jsonl(chunk, text_key, max_chars, parsed)
    elif chunk.kind == "values":
        for row, value in enumerate(chunk.data, start=chunk.first):
            location = f"{chunk.path}:{row}"
            if isinstance(value, bytes):
                value = _decoded(value, location, parsed)
                if value is None:
                    continue
            _add_value(value, location, max_chars, parsed)
    else:
        for path, data in chunk.data:
            text = _decoded(data, path, parsed, whole_file=True)
            if text is not None:
                _add_text(text, f"{path}:1", max_chars, parsed)
    return parsed


def _parse_jsonl(chunk, text_key: str, max_chars: int, parsed: Parsed) -> None:
    """The documents of a jsonl chunk. A line that is a JSON object with a valid text takes a fast path
    (the scanner json.loads uses without its Python wrappers, no location string, one call of checks);
    every other line goes through `_parse_line`, which decides what it is exactly as json.loads and
    `_add_text` do, so the result is the same either way."""
    data = chunk.data
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the chunk ends with a newline
    append = parsed.texts.append
    for offset, line in enumerate(lines):
        if type(line) is str and line[:1] == "{":
            try:
                record, end = _scan_json(line, 0)
            except Exception:  # noqa: BLE001 - whatever it is, _parse_line reports it as json.loads would
                record, end = None, 0
            if type(record) is dict and (end == len(line) or not line[end:].strip(JSON_SPACE)):
                text = record.get(text_key)
                if (type(text) is str and text and not text.isspace() and not (max_chars and len(text) > max_chars)
                        and _utf8(text)):
                    append(text)
                    continue
        _parse_line(line, f"{chunk.path}:{chunk.first + offset}", text_key, max_chars, parsed)


def _parse_line(line, location: str, text_key: str, max_chars: int, parsed: Parsed) -> None:
    """One jsonl line (str, or bytes that are not UTF-8): its document, or why it is skipped."""
    if isinstance(line, bytes):
        line = _decoded(line, location, parsed)
        if line is None:
            return
    if not line.strip():
        parsed.skip("empty", location, "blank line")
        return
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as error:
        parsed.skip("malformed_json", location, str(error))
        return
    if not isinstance(record, dict):
        parsed.skip("malformed_json", location, f"a JSON {type(record).__name__}, not an object")
        return
    if text_key not in record:
        parsed.skip("missing_field", location, missing_field_detail(text_key, list(record), "field"))
        return
    _add_value(record[text_key], location, max_chars, parsed)


def _decoded(data: bytes, location: str, parsed: Parsed, whole_file: bool = False) -> Optional[str]:
    """`data` as UTF-8 text, or None once counted as invalid_utf8 at `location` (for a `whole_file`,
    its path: the line of the first bad byte is added)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if whole_file:
            line = data[: error.start].count(b"\n") + 1
            location = f"{location}:{line}"
        parsed.skip("invalid_utf8", location, str(error))
        return None


def missing_field_detail(text_key: str, present: list[str], kind: str) -> str:
    """Why a record has no text: the fields (or columns) it does have, and the flag that picks one."""
    shown = ", ".join(present[:MAX_FIELDS_SHOWN]) + (" ..." if len(present) > MAX_FIELDS_SHOWN else "")
    return f"no {kind} {text_key!r}; {kind}s present: {shown or 'none'}; choose the text {kind} with --text-key"


def _add_value(value, location: str, max_chars: int, parsed: Parsed) -> None:
    if value is None:
        parsed.skip("missing_field", location, "null")
    elif not isinstance(value, str):
        parsed.skip("not_string", location, f"a {type(value).__name__}")
    else:
        _add_text(value, location, max_chars, parsed)


def _utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (no lone surrogate, which a \\ud800 escape makes)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _add_text(text: str, location: str, max_chars: int, parsed: Parsed) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            parsed.skip("invalid_utf8", location, str(error))
            return
    if not text.strip():
        parsed.skip("empty", location)
    elif max_chars and len(text) > max_chars:
        parsed.skip("too_long", location, f"{len(text)} > {max_chars} characters")
    else:
        parsed.texts.append(text)
