"""`rapidnlp prepare`: raw corpus -> tokenizer (PREFIX.model) + indexed dataset (PREFIX.bin/.idx).

Each document of the corpus becomes one dataset document, each of its sentences one Megatron
"sequence", so that the sample builders can pack whole sentences and pick sentence pairs.

All three outputs are written under temporary names and moved into place only once everything
succeeded, PREFIX.idx last (it is what makes the dataset readable): a run that fails or is killed
midway never leaves a PREFIX.* that looks complete, nor an old .idx next to a new .bin/.model.
The corpus is streamed twice (tokenizer training, then encoding) rather than held in memory.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Callable

from rapidnlp.data.corpus import CorpusReader, document_batches
from rapidnlp.data.indexed import IndexedDatasetWriter, dtype_for_vocab
from rapidnlp.data.tokenizer import Tokenizer, train_tokenizer
from rapidnlp.io import atomic_path, remove_quietly

# Sentences per call into sentencepiece: per-call overhead vanishes, memory stays small.
_ENCODE_BATCH = 8192


def _encode(reader: CorpusReader, tok: Tokenizer, writer: IndexedDatasetWriter) -> int:
    """Tokenize every document of the corpus into the writer, in batches; returns the token count."""
    n_tokens = 0
    for batch in document_batches(reader, _ENCODE_BATCH):
        ids = tok.encode_batch([s for doc in batch for s in doc])
        k = 0
        for doc in batch:
            seqs = [seq for seq in ids[k:k + len(doc)] if seq]
            k += len(doc)
            if seqs:
                writer.add_document(seqs)
                n_tokens += sum(len(s) for s in seqs)
    return n_tokens


def prepare(input_path: str, output_prefix: str, *, vocab_size: int = 8000,
            tokenizer_path: str | None = None, strict_utf8: bool = False,
            text_key: str = "text", seed: int = 0, char_level: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Tokenize a corpus into PREFIX.model + PREFIX.bin/.idx and return what was done.

    With tokenizer_path the given model is used (and copied to PREFIX.model) instead of
    training one with vocab_size (char_level: one piece per character).  Returns documents, sentences, tokens, skipped_lines (count),
    skipped_line_numbers (the first few), vocab_size, dtype, seconds and the three paths.
    """
    start = time.perf_counter()
    output_prefix = os.fspath(output_prefix)
    reader = CorpusReader(input_path, strict_utf8=strict_utf8, text_key=text_key)
    model_path = output_prefix + ".model"

    writer = None
    try:
        with atomic_path(model_path, suffix=".model") as tmp_model:
            if tokenizer_path is not None:
                Tokenizer(tokenizer_path)  # a bad model fails here, before any output exists
                shutil.copyfile(tokenizer_path, tmp_model)
            else:
                sentences = (s for doc in reader for s in doc)
                # Report the path the model will have, not its temporary name.
                train_tokenizer(sentences, tmp_model[:-len(".model")], vocab_size, seed=seed,
                                char_level=char_level,
                                log=lambda msg: log(msg.replace(tmp_model, model_path)))
            tok = Tokenizer(tmp_model)
            dtype = dtype_for_vocab(tok.vocab_size)

            writer = IndexedDatasetWriter(output_prefix, dtype)
            n_tokens = _encode(reader, tok, writer)

            # Commit: the old index goes first so that it never pairs with the new model or .bin;
            # the model moves into place as this block ends, the dataset after it.
            remove_quietly(output_prefix + ".idx")
        writer.finalize()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    stats = {
        "documents": writer.num_documents,
        "sentences": writer.num_sequences,
        "tokens": n_tokens,
        "skipped_lines": reader.num_skipped,
        "skipped_line_numbers": list(reader.skipped_lines),
        "vocab_size": tok.vocab_size,
        "dtype": str(dtype),
        "seconds": round(time.perf_counter() - start, 3),
        "model": model_path,
        "bin": writer.bin_path,
        "idx": writer.idx_path,
    }
    if reader.num_skipped:
        log(reader.skipped_summary())
    log(f"prepared {output_prefix}.{{model,bin,idx}}: {stats['documents']} documents, "
        f"{stats['sentences']} sentences, {stats['tokens']} tokens ({stats['dtype']}), "
        f"vocab {stats['vocab_size']}, {stats['skipped_lines']} skipped lines, "
        f"{stats['seconds']:.1f} s")
    return stats
