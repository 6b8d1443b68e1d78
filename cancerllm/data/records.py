"""Reading the records of cancerllm's text inputs, shared by `prepare` and `tasks.build`: a strict CSV reader and
one JSONL line's object.

The CSV reader is strict so that a malformed record is named instead of silently swallowing the rows after it.

Python's csv module, left lenient, reads an unclosed quote as a field that runs on to the next quote or the end of
the file: one stray quote can turn a hundred rows into three, and another patient's id and report into one
patient's text. Here every record is parsed with `strict=True` and must have the header's number of fields. A record
that fails is a `MalformedRow` naming the line it starts on. When its quoting is broken its true end is unknown, so
reading resumes on the line after its start: a stray quote costs its own row (and any continuation lines that do not
parse on their own), never the rest of the file. Quoted fields with embedded commas, doubled quotes and newlines
parse as usual. Bytes that are not UTF-8 make their record malformed too (the file is decoded with
surrogateescape, so they cannot stop the reading of the rows after them).
"""
import csv
import gzip
import json
from collections import deque
from pathlib import Path


class MalformedRow(ValueError):
    """A CSV record that cannot be read: the message is `file:line: reason`."""

    def __init__(self, path, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.line, self.reason = line, reason


def open_csv(path):
    """Open a CSV file (gzipped when its name ends in .gz) for CsvReader."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")


class Lines:
    """A file's lines, numbered from 1, that can be pushed back to be read again after a malformed record."""

    def __init__(self, f):
        self.f, self.count, self.pending, self.taken = f, 0, deque(), []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.pending:
            number, line = self.pending.popleft()
        else:
            line = next(self.f)                 # StopIteration ends the csv reader's record
            self.count += 1
            number = self.count
        self.taken.append((number, line))
        return line

    def begin_record(self) -> int:
        """Forget the lines read so far; returns the number of the line the next record starts on."""
        self.taken = []
        return self.pending[0][0] if self.pending else self.count + 1

    def reread_after_first(self):
        """The record just read is broken: read its lines again, from its second one."""
        self.pending.extendleft(reversed(self.taken[1:]))


class CsvReader:
    """Rows of a CSV file with a header row: iterating yields (line, row), row being a dict of the header's
    columns, or a MalformedRow for a record that cannot be read (reading goes on after it). The header itself must
    parse, name each column once and include `required`, else a ValueError naming the file."""

    def __init__(self, f, path, required=()):
        csv.field_size_limit(2**31 - 1)     # clinical notes can exceed csv's default 128 KiB per field
        self.path, self.lines = path, Lines(f)
        self.records = csv.reader(self.lines, strict=True)
        try:
            header = next(self.records, None)
        except csv.Error as e:
            raise ValueError(f"{path}:1: malformed CSV header ({e})") from None
        if not header:
            raise ValueError(f"{path}: empty file: no header row")
        duplicated = sorted({c for c in header if header.count(c) > 1})
        if duplicated:
            raise ValueError(f"{path}:1: column(s) {', '.join(map(repr, duplicated))} named more than once")
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; columns are {header}")
        self.fieldnames = header

    def __iter__(self):
        while True:
            line = self.lines.begin_record()
            try:
                fields = next(self.records)
            except StopIteration:
                return
            except csv.Error as e:
                self.lines.reread_after_first()
                yield line, MalformedRow(self.path, line, describe(e))
                continue
            if fields:                      # a blank line is no record
                yield line, self.row(line, fields)

    def row(self, line: int, fields: list):
        if len(fields) != len(self.fieldnames):
            return MalformedRow(self.path, line, f"{len(fields)} field(s), the header has {len(self.fieldnames)}")
        for name, value in zip(self.fieldnames, fields):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return MalformedRow(self.path, line, f"undecodable bytes in {name}")
        return dict(zip(self.fieldnames, fields))


def describe(error: csv.Error) -> str:
    if "unexpected end of data" in str(error):
        return "unclosed quote: the quoted field runs to the end of the file"
    return f"malformed CSV ({error})"


def json_object(raw: str) -> dict:
    """One JSONL line's object. A truncated or otherwise invalid line raises a ValueError saying what is wrong;
    the caller adds the file and line."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
    return obj
