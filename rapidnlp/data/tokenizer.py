"""The sentencepiece tokenizer: training one on a corpus, and loading it with BERT's special ids.

Every RapidNLP tokenizer is a unigram sentencepiece model with byte fallback and these ids:
[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then the 256 byte pieces <0x00>..<0xFF>, then the
learned pieces.  [CLS]/[SEP]/[MASK] are control symbols: encoding text never yields them, not even
for the literal string "[MASK]", so a corpus cannot inject a mask token; the pretraining code
inserts them by id.  Normalisation is the identity and whitespace is kept, so
decode(encode(s)) == s for every string (fullwidth Chinese punctuation stays fullwidth); with
byte fallback no text ever becomes [UNK].

This module does not read corpora (corpus.py) nor write datasets (prepare.py).
"""
from __future__ import annotations

import collections
import io
import os
import random
import re
import sys
from typing import Callable, Iterable

import numpy as np
import sentencepiece as spm

from rapidnlp.errors import UserError
from rapidnlp.io import atomic_write

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_PIECES = (PAD, UNK, CLS, SEP, MASK)
NUM_BYTE_PIECES = 256
# Specials + bytes + the word-boundary piece '▁' + one character: below this sentencepiece
# cannot build any unigram model (measured with sentencepiece 0.2.3).
MIN_VOCAB_SIZE = len(SPECIAL_PIECES) + NUM_BYTE_PIECES + 2

# Tried in order until the characters needed to cover this share of the text fit in the
# vocabulary; sentencepiece refuses coverage below 0.98.
COVERAGE_STEPS = (0.9995, 0.999, 0.995, 0.99, 0.98)
# sentencepiece silently drops training sentences longer than max_sentence_length (4192 bytes);
# 1000 characters are at most 4000 UTF-8 bytes.
_MAX_TRAIN_CHARS = 1000
_REQUIRED_CHARS = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _training_sample(sentences: Iterable[str], max_sentences: int, seed: int) -> list[str]:
    """A deterministic reservoir sample of at most max_sentences pieces of text."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for sentence in sentences:
        sentence = sentence.strip()
        for start in range(0, len(sentence), _MAX_TRAIN_CHARS):
            piece = sentence[start:start + _MAX_TRAIN_CHARS]
            seen += 1
            if len(sample) < max_sentences:
                sample.append(piece)
            else:
                j = rng.randrange(seen)
                if j < max_sentences:
                    sample[j] = piece
    return sample


def _restrict_alphabet(sentences: list[str], keep_chars: int) -> list[str]:
    """Cut sentences at every character outside the keep_chars most frequent ones.

    For a vocabulary too small for the corpus' alphabet even at the lowest coverage: rare
    characters are left to byte fallback, exactly as sentencepiece does for uncovered ones.
    """
    counts = collections.Counter(c for s in sentences for c in s if c != " ")
    # Ties broken by the character itself so that the result never depends on input order.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    keep = {c for c, _ in ranked[:keep_chars]}
    keep.add(" ")
    out = []
    for s in sentences:
        fragment: list[str] = []
        for c in s:
            if c in keep:
                fragment.append(c)
            elif fragment:
                text = "".join(fragment)
                if text.strip():
                    out.append(text)
                fragment = []
        text = "".join(fragment)
        if text.strip():
            out.append(text)
    return out


def _train_proto(sentences: list[str], vocab_size: int, coverage: float, seed: int,
                 verbose: bool, char_level: bool = False) -> bytes:
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        # A soft limit: a corpus too small for vocab_size gets the largest vocabulary it supports
        # instead of an error; the caller reports the size it got.
        hard_vocab_limit=False,
        character_coverage=coverage,
        byte_fallback=True,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
        pad_piece=PAD, unk_piece=UNK,
        control_symbols=[CLS, SEP, MASK],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        # One thread and no sampling inside sentencepiece: the same corpus gives the same bytes.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=0 if verbose else 2,
        # Character level: every piece one character (as Chinese BERTs have it), no '▁' prefix, so a
        # character's id never depends on its neighbours.  Unset, sentencepiece's defaults (bytes
        # identical to models trained before the option existed).
        **({"max_sentencepiece_length": 1, "add_dummy_prefix": False, "split_by_whitespace": False}
           if char_level else {}),
    )
    return model.getvalue()


def train_tokenizer(sentences: Iterable[str], model_prefix: str, vocab_size: int, *,
                    seed: int = 0, max_sentences: int = 2_000_000, verbose: bool = False,
                    log: Callable[[str], None] | None = None, char_level: bool = False) -> "Tokenizer":
    """Train a unigram tokenizer on `sentences` and write MODEL_PREFIX.model (atomically).

    Always succeeds for vocab_size >= MIN_VOCAB_SIZE: the character coverage is lowered step by
    step until the alphabet fits, then rare characters are left to byte fallback; a corpus too
    small for vocab_size yields a smaller vocabulary.  The coverage used and the final size are
    logged (`log`, stderr by default).  At most max_sentences sentences (a seeded sample) are used.
    char_level: one piece per character (the most frequent ones that fit; rarer ones fall back
    to bytes), the vocabulary Chinese BERTs use.
    """
    log = log or _stderr_log
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab size {vocab_size} is too small: 5 special tokens, 256 byte "
                        f"pieces, '\u2581' and one character need at least {MIN_VOCAB_SIZE}; "
                        f"set --vocab-size to {MIN_VOCAB_SIZE} or more")
    sample = _training_sample(sentences, max_sentences, seed)
    if not any(s.strip() for s in sample):
        raise UserError("no text to train the tokenizer on: the corpus has no non-blank sentence")

    proto = None
    coverage_used = ""
    for coverage in COVERAGE_STEPS:
        try:
            proto = _train_proto(sample, vocab_size, coverage, seed, verbose, char_level)
            coverage_used = f"character coverage {coverage}"
            break
        except RuntimeError as e:
            if not _REQUIRED_CHARS.search(str(e)):
                raise
    if proto is None:
        # Even 98% of the text needs more distinct characters than the vocabulary holds.
        keep = vocab_size - MIN_VOCAB_SIZE + 1
        while proto is None:
            try:
                proto = _train_proto(_restrict_alphabet(sample, keep), vocab_size, 1.0, seed,
                                     verbose, char_level)
                coverage_used = (f"the {keep} most frequent characters "
                                 f"(rarer ones fall back to bytes)")
            except RuntimeError as e:
                m = _REQUIRED_CHARS.search(str(e))
                if not m or keep <= 1:
                    raise
                keep -= max(1, int(m.group(2)) - int(m.group(1)))
                keep = max(keep, 1)

    path = os.fspath(model_prefix) + ".model"
    atomic_write(path, proto)
    tok = Tokenizer(path)
    note = "" if tok.vocab_size == vocab_size else \
        f" (asked for {vocab_size}; the corpus supports no more)"
    kind = "character-level" if char_level else "unigram"
    log(f"tokenizer: {path}, {kind}, vocab size {tok.vocab_size}{note}, {coverage_used}, "
        f"trained on {len(sample)} sentences")
    return tok


class Tokenizer:
    """A trained RapidNLP sentencepiece model with BERT's special ids."""

    pad_id = 0
    unk_id = 1
    cls_id = 2
    sep_id = 3
    mask_id = 4

    def __init__(self, model_path: str):
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise UserError(f"{self.model_path}: tokenizer model not found; train one with "
                            f"`rapidnlp prepare` or fix the path")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_file=self.model_path)
        except (RuntimeError, OSError):
            raise UserError(f"{self.model_path}: not a sentencepiece model (cannot parse it); "
                            f"point at the .model file written by `rapidnlp prepare`") from None
        got = tuple(self._sp.id_to_piece(i) for i in range(min(5, self._sp.vocab_size())))
        if got != SPECIAL_PIECES:
            raise UserError(f"{self.model_path}: ids 0-4 are {list(got)}, expected "
                            f"{list(SPECIAL_PIECES)}; use a tokenizer trained by RapidNLP")

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts in one call into sentencepiece (much faster than a Python loop)."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def word_start_mask(self) -> np.ndarray:
        """True for pieces that begin a word ('▁...'), special pieces and leading byte pieces.

        Whole-word masking masks a word-start piece together with the non-start pieces after it.
        A rare character falls back to 2-4 byte pieces: its UTF-8 lead byte counts as a start and
        its continuation bytes (0x80-0xBF) do not, so such a character is masked whole, never
        cut into a byte soup.  Chinese text has no spaces, so there a "word" is a whole run of
        text between spaces: Chinese whole-word masking needs a word segmenter instead.
        """
        sp = self._sp
        mask = np.zeros(sp.vocab_size(), dtype=bool)
        for i in range(sp.vocab_size()):
            if sp.is_byte(i):
                mask[i] = not 0x80 <= int(sp.id_to_piece(i)[1:-1], 16) <= 0xBF
            else:
                mask[i] = (sp.is_control(i) or sp.is_unknown(i)
                           or sp.id_to_piece(i).startswith("\u2581"))
        return mask

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"
