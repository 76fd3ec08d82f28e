"""Find data files and read them record by record, each with the line it starts on.

Readers never raise on bad content: they yield `(line, value, problem)`, with `value` None when `problem` says why
the record could not be read (invalid JSON, bytes that are not UTF-8), so one bad line leaves the others readable.
Validation of what was read is `medicalgpt.data.validate`'s job.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re

from medicalgpt.errors import InputNotFoundError

EXTENSIONS = {
    "pt": (".txt", ".json", ".jsonl"),
    "sft": (".json", ".jsonl"),
    "preference": (".json", ".jsonl"),
    "kto": (".json", ".jsonl"),
}
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON whitespace


def find_data_files(paths: str | list[str], stage: str | None) -> list[str]:
    """Data files among `paths` (files, or directories searched recursively, each sorted), without duplicates.
    stage None accepts every stage's extensions."""
    if stage not in EXTENSIONS and stage is not None:
        raise ValueError(f"unknown stage {stage!r} (expected one of: {', '.join(EXTENSIONS)})")
    extensions = EXTENSIONS[stage] if stage else EXTENSIONS["pt"]
    files, seen = [], set()
    for path in [paths] if isinstance(paths, str) else paths:
        if os.path.isdir(path):
            pattern = os.path.join(glob.escape(path), "**", "*")
            found = glob.glob(pattern, recursive=True)
            found = sorted(f for f in found if f.lower().endswith(extensions) and os.path.isfile(f))
            if not found:
                raise InputNotFoundError(f"{path}: no {' '.join(extensions)} files in this directory or below")
        elif os.path.isfile(path):
            if not path.lower().endswith(extensions):
                raise ValueError(f"{path}: not a {stage or 'data'} file (expected {' '.join(extensions)})")
            found = [path]
        else:
            raise InputNotFoundError(f"{path}: no such file or directory")
        files += [f for f in found if f not in seen]
        seen.update(found)
    return files


def _utf8_error(text: str, start: int, end: int) -> tuple[int, str] | None:
    """(newlines before the first byte that is not UTF-8 in text[start:end], message), or None."""
    bad = _NOT_UTF8.search(text, start, end)
    if bad is None:
        return None
    line_start = text.rfind("\n", 0, bad.start()) + 1
    offset = len(text[line_start : bad.start()].encode("utf-8", "surrogateescape"))
    return text.count("\n", start, bad.start()), f"not valid UTF-8 at byte offset {offset}"


def _json_array(text: str):
    """Yield (line, value, problem) per element of a whole-file JSON array; line is where the element starts."""
    decoder, pos, line, counted = json.JSONDecoder(), text.index("[") + 1, 1, 0
    while True:
        pos = _SPACE.match(text, pos).end()
        line, counted = line + text.count("\n", counted, pos), pos
        if text.startswith("]", pos):
            break
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno}); the rest of the array is not read"
            return
        bad = _utf8_error(text, pos, end)
        yield (line + bad[0], None, bad[1]) if bad else (line, value, None)
        pos = _SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            line += text.count("\n", counted, pos)
            yield line, None, "invalid JSON: expected ',' or ']' after an array element; the rest is not read"
            return
    extra = _SPACE.match(text, pos + 1).end()
    if extra < len(text):
        yield line + text.count("\n", counted, extra), None, "invalid JSON: extra data after the array's closing ']'"


def read_units(path: str, f, file_type: str | None = None):
    """Yield (line, value, problem) per record of binary file `f`: {"text": line} for .txt, parsed JSON otherwise
    (a .json file holds one JSON array or JSON lines). `file_type` ("txt", "json", "jsonl") overrides the
    extension. Lines are decoded one by one, so a line that is not UTF-8 leaves the others readable."""
    file_type = file_type or os.path.splitext(path)[1].lower().lstrip(".")
    lines, is_txt = f, file_type == "txt"
    if file_type == "json":
        data = f.read()
        if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            yield from _json_array(data.decode("utf-8", "surrogateescape").removeprefix("\ufeff"))
            return
        lines = io.BytesIO(data)
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff" if number == 1 else "").removesuffix("\n")
        except UnicodeDecodeError as e:
            yield number, None, f"not valid UTF-8 at byte offset {e.start}"
            continue
        if not line.strip():
            continue
        if is_txt:
            yield number, {"text": line.removesuffix("\r")}, None
        else:
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as e:
                yield number, None, f"invalid JSON: {e.msg} (column {e.colno})"


def read_table(path: str, delimiter: str | None = None):
    """Yield (line, cells, problem) per row of a CSV or TSV file; `line` is where the row starts (a quoted cell may
    span lines). The delimiter is "\\t" for .tsv, else "," unless the first line has tabs and no commas."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        text = f.read()
    if delimiter is None:
        first = text.split("\n", 1)[0]
        delimiter = TABLE_DELIMITERS.get(os.path.splitext(path)[1].lower(), ",")
        delimiter = "\t" if "\t" in first and "," not in first else delimiter
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long answers: the default cell limit is 128 KiB
    reader, previous = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True), 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield previous + 1, None, f"invalid {'TSV' if delimiter == chr(9) else 'CSV'}: {e}; the rest is not read"
            return
        line, previous = previous + 1, reader.line_num
        if any(_NOT_UTF8.search(cell) for cell in cells):
            yield line, None, "not valid UTF-8"
        elif any(cell.strip() for cell in cells):
            yield line, cells, None
