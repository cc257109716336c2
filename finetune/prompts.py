"""Templates and verbalizers: from examples to input ids with [MASK] slots and continuous-prompt slots.

A template is text with placeholders: `{text}`, `{text_b}`, `{mask}` (the slot the label word
fills; a label word of n tokens gets n [MASK] tokens) and `{p}` (one continuous-prompt token,
whose embedding a method supplies). Example: "{text}总之很{mask}。".

A verbalizer maps each label to one or more words ("negative:差|糟,positive:好|棒"); several
words per label is Fuzzy-PET. `check_realisable` proves that the tokenizer can realise each
word next to the template's literal neighbours: a word it would merge with them (a sentencepiece
vocabulary may hold 很好 as one token, so 很[MASK] would be a context pretraining never saw)
is a one-line error naming the merge.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rapidnlp.errors import UserError

_PLACEHOLDER = re.compile(r"(\{text\}|\{text_b\}|\{mask\}|\{p\})")


def parse_template(template: str) -> list[str]:
    parts = [p for p in _PLACEHOLDER.split(template) if p]
    if "{mask}" not in parts:
        raise UserError(f"template '{template}': needs a {{mask}} slot")
    if parts.count("{mask}") > 1:
        raise UserError(f"template '{template}': has more than one {{mask}} slot")
    if "{text}" not in parts:
        raise UserError(f"template '{template}': needs {{text}}")
    leftover = [p for p in parts if p not in ("{text}", "{text_b}", "{mask}", "{p}") and re.search(r"\{\w*\}", p)]
    if leftover:
        raise UserError(f"template '{template}': unknown placeholder in '{leftover[0]}' "
                        "(known: {text}, {text_b}, {mask}, {p})")
    return parts


def parse_verbalizer(spec: str) -> dict[str, list[str]]:
    """'neg:差|糟,pos:好' -> {'neg': ['差', '糟'], 'pos': ['好']}."""
    out: dict[str, list[str]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        label, sep, words = item.partition(":")
        words_list = [w for w in words.split("|") if w]
        if not sep or not label or not words_list:
            raise UserError(f"verbalizer '{spec}': expected LABEL:WORD[|WORD...],LABEL:WORD...")
        out[label] = words_list
    if len(out) < 2:
        raise UserError(f"verbalizer '{spec}': needs at least two labels")
    return out


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@dataclass
class Verbalizer:
    labels: list[str]
    words: list[str]
    word_label: torch.Tensor           # (W,) label index per word
    word_ids: dict[int, torch.Tensor]  # token length n -> (W_n, n) ids
    word_index: dict[int, torch.Tensor]  # n -> (W_n,) positions of those words in `words`

    @classmethod
    def build(cls, tok, mapping: dict[str, list[str]], labels: list[str]) -> "Verbalizer":
        missing = [lab for lab in labels if lab not in mapping]
        if missing:
            raise UserError(f"verbalizer: no words for label(s) {missing} of the data (has {sorted(mapping)})")
        words, word_label, tokens = [], [], []
        for c, label in enumerate(labels):
            for w in mapping[label]:
                ids = _ids(tok, w)
                if not ids:
                    raise UserError(f"verbalizer: word '{w}' tokenizes to nothing")
                if tok.unk_token_id is not None and tok.unk_token_id in ids:
                    raise UserError(f"verbalizer: word '{w}' is [UNK] for this tokenizer: choose a word it knows")
                words.append(w)
                word_label.append(c)
                tokens.append(ids)
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(tokens):
            by_len.setdefault(len(ids), []).append(i)
        return cls(labels, words, torch.tensor(word_label),
                   {n: torch.tensor([tokens[i] for i in idx]) for n, idx in by_len.items()},
                   {n: torch.tensor(idx) for n, idx in by_len.items()})


def check_realisable(tok, parts: list[str], verbalizer: Verbalizer) -> None:
    """Each label word, tokenized between the template's literal neighbours of {mask}, must come out
    as its own tokens; otherwise the [MASK] slots stand for a tokenization never seen."""
    k = parts.index("{mask}")
    left = parts[k - 1] if k > 0 and not parts[k - 1].startswith("{") else ""
    right = parts[k + 1] if k + 1 < len(parts) and not parts[k + 1].startswith("{") else ""
    for p in parts:
        if not p.startswith("{") and tok.unk_token_id is not None and tok.unk_token_id in _ids(tok, p):
            raise UserError(f"template text '{p}' has characters this tokenizer does not know ([UNK]); reword it")
    for w in verbalizer.words:
        joint = _ids(tok, left + w + right)
        piecewise = (_ids(tok, left) if left else []) + _ids(tok, w) + (_ids(tok, right) if right else [])
        if joint != piecewise:
            raise UserError(
                f"label word '{w}' merges with the template: '{left}{w}{right}' tokenizes as "
                f"{tok.convert_ids_to_tokens(joint)}, not {tok.convert_ids_to_tokens(piecewise)}, so "
                f"'{left}[MASK]{right}' is a context pretraining never saw; choose other words or template")


@dataclass
class Encoded:
    ids: torch.Tensor        # (B, L)
    mask: torch.Tensor       # (B, L) attention mask
    types: torch.Tensor      # (B, L)
    mask_pos: torch.Tensor   # (B, n) positions of the [MASK] slots
    soft_pos: torch.Tensor   # (B, P) positions of the {p} slots (P may be 0)


def encode(tok, parts: list[str], examples, n_mask: int, max_len: int) -> Encoded:
    """[CLS] + the template with texts, n [MASK]s and {p} slots filled + [SEP], texts truncated
    (longest first) to fit max_len, right-padded."""
    texts = [e.text for e in examples]
    text_ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]  # truncated below
    b_ids = tok([e.text_b or "" for e in examples], add_special_tokens=False, verbose=False)["input_ids"] \
        if "{text_b}" in parts else [[] for _ in examples]
    literal = {p: _ids(tok, p) for p in parts if not p.startswith("{")}
    fixed = 2 + sum(len(literal[p]) for p in parts if p in literal) + n_mask + parts.count("{p}")
    budget = max_len - fixed
    if budget < 1:
        raise UserError(f"template needs {fixed} tokens, max length {max_len}: raise --max-len")
    rows, mpos, spos = [], [], []
    for a, b in zip(text_ids, b_ids):
        a, b = list(a), list(b)
        while len(a) + len(b) > budget:
            (a if len(a) >= len(b) else b).pop()
        ids, m, s = [tok.cls_token_id], [], []
        for p in parts:
            if p == "{text}":
                ids += a
            elif p == "{text_b}":
                ids += b
            elif p == "{mask}":
                m += range(len(ids), len(ids) + n_mask)
                ids += [tok.mask_token_id] * n_mask
            elif p == "{p}":
                s.append(len(ids))
                ids.append(tok.mask_token_id if tok.unk_token_id is None else tok.unk_token_id)
            else:
                ids += literal[p]
        rows.append(ids + [tok.sep_token_id])
        mpos.append(m)
        spos.append(s)
    return _pad(tok, rows, mpos, spos)


def _pad(tok, rows, mpos, spos, types=None) -> Encoded:
    length = max(len(r) for r in rows)
    pad = tok.pad_token_id or 0
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    att = torch.zeros((len(rows), length), dtype=torch.long)
    tt = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        att[i, :len(r)] = 1
        if types is not None:
            tt[i, :len(r)] = torch.tensor(types[i])
    return Encoded(ids, att, tt, torch.tensor(mpos, dtype=torch.long).reshape(len(rows), -1),
                   torch.tensor(spos, dtype=torch.long).reshape(len(rows), -1))


def encode_pairs(tok, firsts: list[str], seconds: list[str | None], max_len: int) -> Encoded:
    """Plain [CLS] a [SEP] (b [SEP]) inputs with token types, for the [CLS]-head methods; an example
    without a second text is encoded alone, as it would be in a batch of its own."""
    rows = [tok(a, b, truncation=True, max_length=max_len) for a, b in zip(firsts, seconds)]
    enc = tok.pad(rows, return_tensors="pt")
    types = enc.get("token_type_ids")
    empty = torch.zeros((len(firsts), 0), dtype=torch.long)
    return Encoded(enc["input_ids"], enc["attention_mask"],
                   types if types is not None else torch.zeros_like(enc["input_ids"]), empty, empty)
