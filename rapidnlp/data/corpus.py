"""Reading users' raw text corpora, line by line, into documents made of sentences.

Two formats, told apart by the file name (less a .gz/.zst suffix, see inputs.py):
  *.jsonl / *.json  one JSON object per line, the document's text in a field ("text" by default);
  anything else     plain UTF-8 text, one document per non-blank line.
A reader covers a whole file or a byte range of it (a chunk, inputs.py); line numbers in its
messages are always the file's.
Each document is split into sentences after Chinese and Western terminal punctuation
(。！？!?；; and a '.' followed by whitespace), keeping the punctuation and any closing quotes or
brackets right after it; newlines inside a JSON text also end a sentence.

Lines that are not valid UTF-8 are skipped and counted (CorpusReader.num_skipped and the first
line numbers in .skipped_lines) unless strict_utf8 asks for an error.  The whole file is never
held in memory.  This module knows nothing of tokenizers or of the dataset format.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator

from rapidnlp.data.inputs import base_name, open_binary
from rapidnlp.errors import UserError

_JSON_SUFFIXES = (".jsonl", ".json")
# Terminal punctuation, then closing quotes/brackets that belong to the same sentence.
_BOUNDARY = re.compile(
    r"([。！？!?；;]+[”’\"'」』）)\]】]*"
    r"|\.+[”’\"')\]]*(?=\s))"
)


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, punctuation kept, surrounding whitespace and empty pieces dropped."""
    out = []
    for line in text.splitlines():
        # split() with the group keeps each boundary: [text, boundary, text, boundary, ..., text]
        parts = _BOUNDARY.split(line)
        for k in range(0, len(parts), 2):
            piece = (parts[k] + parts[k + 1] if k + 1 < len(parts) else parts[k]).strip()
            if piece:
                out.append(piece)
    return out


class CorpusReader:
    """An iterable over a corpus' documents (lists of sentences) that keeps reading statistics.

    Iterating again rereads the file and resets the statistics.  After a full pass:
    num_documents, num_sentences, num_skipped (lines dropped as invalid UTF-8) and
    skipped_lines (the first `max_reported` of their 1-based line numbers).
    """

    def __init__(self, path: str, *, strict_utf8: bool = False, text_key: str = "text",
                 max_reported: int = 10, start: int = 0, end: int = -1):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise UserError(f"{self.path}: corpus file not found; fix the input path")
        if not os.path.isfile(self.path):
            raise UserError(f"{self.path}: corpus is not a regular file; pass one text or "
                            f".jsonl file")
        self.strict_utf8 = strict_utf8
        self.text_key = text_key
        self.max_reported = max_reported
        self.is_jsonl = base_name(self.path).lower().endswith(_JSON_SUFFIXES)
        self.start, self.end = start, end
        self._first_line: int | None = 0 if start == 0 else None
        self._reset()

    def first_line(self) -> int:
        """Lines of the file before this reader's range (counted only when a message needs it)."""
        if self._first_line is None:
            count, left = 0, self.start
            with open(self.path, "rb") as f:
                while left:
                    block = f.read(min(left, 1 << 24))
                    count += block.count(b"\n")
                    left -= len(block)
            self._first_line = count
        return self._first_line

    def _reset(self) -> None:
        self.num_documents = 0
        self.num_sentences = 0
        self.num_skipped = 0
        self.skipped_lines: list[int] = []
        self.bytes_read = 0  # of the file on disk (compressed bytes for .gz/.zst)

    def skipped_summary(self) -> str:
        """One line about skipped non-UTF-8 lines, or '' if none were skipped."""
        if not self.num_skipped:
            return ""
        more = ", ..." if self.num_skipped > len(self.skipped_lines) else ""
        lines = ", ".join(str(n) for n in self.skipped_lines)
        return (f"{self.path}: skipped {self.num_skipped} line(s) that are not valid UTF-8 "
                f"(line {lines}{more})")

    def _lines(self) -> Iterator[bytes]:
        stream, raw = open_binary(self.path)
        with stream, raw:
            if stream is raw:
                raw.seek(self.start)
                left = (self.end if self.end >= 0 else os.path.getsize(self.path)) - self.start
                for line in raw:
                    left -= len(line)
                    self.bytes_read += len(line)
                    yield line
                    if left <= 0:
                        return
            else:
                for k, line in enumerate(stream):
                    if k % 1024 == 0:
                        self.bytes_read = raw.tell()
                    yield line
                self.bytes_read = raw.tell()

    def __iter__(self) -> Iterator[list[str]]:
        self._reset()
        for lineno, raw in enumerate(self._lines(), 1):
            try:
                # utf-8-sig on the first line drops a byte-order mark some editors write.
                line = raw.decode("utf-8-sig" if lineno == 1 and self.start == 0 else "utf-8")
            except UnicodeDecodeError as e:
                lineno += self.first_line()
                if self.strict_utf8:
                    raise UserError(
                        f"{self.path}:{lineno}: not valid UTF-8 (byte offset {e.start} in "
                        f"the line); convert the file (e.g. `iconv -f GBK -t UTF-8`) or "
                        f"turn strict UTF-8 off to skip such lines") from None
                self.num_skipped += 1
                if len(self.skipped_lines) < self.max_reported:
                    self.skipped_lines.append(lineno)
                continue
            if not line.strip():
                continue
            text = self._json_text(line, lineno) if self.is_jsonl else line
            sentences = split_sentences(text)
            if not sentences:
                continue
            self.num_documents += 1
            self.num_sentences += len(sentences)
            yield sentences
        if self.num_documents == 0 and self.start == 0 and self.end < 0:
            raise UserError(empty_corpus_message(self.path, self.num_skipped, self.is_jsonl,
                                                 self.text_key))

    def _json_text(self, line: str, lineno: int) -> str:
        try:
            return self._json_field(line)
        except ValueError as e:
            raise UserError(f"{self.path}:{lineno + self.first_line()}: {e}") from None

    def _json_field(self, line: str) -> str:
        example = f'each line must be one JSON object like {{"{self.text_key}": "..."}}'
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed JSON ({e.msg} at column {e.colno}); {example}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}; {example}")
        if self.text_key not in obj:
            keys = ", ".join(sorted(map(str, obj))) or "none"
            raise ValueError(f'no "{self.text_key}" field (fields: {keys}); '
                             f"set the text key to the field that holds the text")
        text = obj[self.text_key]
        if not isinstance(text, str):
            raise ValueError(f'field "{self.text_key}" is {type(text).__name__}, not a string; '
                             f"store the text as a string")
        return text


def empty_corpus_message(where: str, skipped: int, jsonl: bool, text_key: str = "text") -> str:
    why = f" ({skipped} line(s) skipped as not valid UTF-8)" if skipped else ""
    fmt = (f'one JSON object per line with a "{text_key}" field' if jsonl
           else "one document per line")
    return f"{where}: corpus is empty{why}; it needs text, {fmt}"


def iter_documents(path: str, *, strict_utf8: bool = False,
                   text_key: str = "text") -> Iterator[list[str]]:
    """Documents of a corpus as lists of sentences; use CorpusReader to also get its statistics."""
    return iter(CorpusReader(path, strict_utf8=strict_utf8, text_key=text_key))


def document_batches(documents: Iterable[list[str]], sentences: int) -> Iterator[list[list[str]]]:
    """Whole documents grouped into batches of at least `sentences` sentences (the last one may
    hold fewer): the unit in which corpora are tokenized and linked."""
    batch: list[list[str]] = []
    count = 0
    for doc in documents:
        batch.append(doc)
        count += len(doc)
        if count >= sentences:
            yield batch
            batch, count = [], 0
    if batch:
        yield batch
