"""Megatron-LM's mmap indexed dataset (PREFIX.bin + PREFIX.idx), read and written byte-compatibly.

A dataset is a flat array of token ids (.bin) cut into sequences (one per sentence) that are
grouped into documents; the .idx says where each sequence starts and which sequences form a
document.  Files written here are byte-identical to what Megatron-LM's `IndexedDatasetBuilder`
writes for the same documents, and Megatron's files read here token for token, so corpora can
move between the two systems in both directions.

.idx layout (little endian), version 1:
    b"MMIDIDX\\x00\\x00", <Q version=1, <B dtype code, <Q sequence count, <Q document count
    (which, as in Megatron, is len(document_indices) = documents + 1), then
    int32 sequence_lengths[S], int64 sequence_pointers[S] (byte offsets into .bin),
    int64 document_indices[D + 1] (document d is sequences [di[d], di[d+1])).

This module only stores token ids; it knows nothing of tokenizers or of how samples are cut.
"""
from __future__ import annotations

import itertools
import os
import shutil
import struct
from array import array

import numpy as np

from rapidnlp.errors import UserError
from rapidnlp.io import remove_quietly, temp_name

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER_SIZE = len(_MAGIC) + 8 + 1 + 8 + 8

# Megatron's DType enum (megatron/core/datasets/indexed_dataset.py); the codes are on disk.
_CODE_TO_DTYPE = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_DTYPE_TO_CODE = {dt: code for code, dt in _CODE_TO_DTYPE.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The token dtype Megatron picks for a vocabulary (`DType.optimal_dtype`): 2 bytes if it fits."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _paths(prefix: str) -> tuple[str, str]:
    prefix = os.fspath(prefix)
    # Users naturally point at one of the two files; both name the same dataset.
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return prefix + ".bin", prefix + ".idx"


class IndexedDatasetWriter:
    """Streams documents into PREFIX.bin/.idx.

    Both files are written under temporary names and renamed into place only by `finalize()`,
    the .idx last: the .idx is what makes a dataset readable, so a crash, an exception inside
    the `with` block or an abandoned writer never leaves a dataset that looks complete.

    A document is a non-empty list of sequences; an empty document is refused (ValueError)
    because Megatron's sample builders assume every document has at least one sequence.
    Sequences themselves may be empty (the format allows it), though `prepare` never writes one.
    """

    def __init__(self, prefix: str, dtype):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_TO_CODE:
            raise ValueError(f"dtype {self.dtype} has no Megatron code; use one of "
                             f"{sorted(str(d) for d in _DTYPE_TO_CODE)}")
        self.bin_path, self.idx_path = _paths(prefix)
        parent = os.path.dirname(self.bin_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        # Two files committed together in finalize(), so not atomic_open's one-file block.
        self._bin_tmp = temp_name(self.bin_path)
        self._idx_tmp = temp_name(self.idx_path)
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = array("i")
        self._doc_indices = array("q", [0])
        self._closed = False
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            self._range = (int(info.min), int(info.max))
        else:
            self._range = None

    def add_document(self, sequences) -> None:
        """Append one document: a list of token-id sequences (lists or arrays)."""
        self.add_documents([sequences])

    def add_documents(self, documents) -> None:
        """Append many documents at once (one conversion and one write for all of them)."""
        if self._closed:
            raise RuntimeError("add_document() after finalize() or abort()")
        lengths, pieces = [], []
        for sequences in documents:
            if len(sequences) == 0:
                raise ValueError("empty document: a document needs at least one sequence")
            for s in sequences:
                lengths.append(len(s))
                pieces.append(s)
        if all(isinstance(p, list) for p in pieces):  # what sentencepiece returns: no array per sequence
            flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=sum(lengths))
        else:
            flat = np.concatenate([np.asarray(p).reshape(-1) for p in pieces])
        if self._range is not None and flat.size:
            # astype() would wrap out-of-range ids silently and corrupt the corpus.
            lo, hi = int(flat.min()), int(flat.max())
            if lo < self._range[0] or hi > self._range[1]:
                raise ValueError(f"token id out of range for {self.dtype}: min {lo}, max {hi}")
        self._bin.write(flat.astype(self.dtype, copy=False).tobytes(order="C"))
        end = len(self._lengths)
        self._lengths.extend(lengths)
        for sequences in documents:
            end += len(sequences)
            self._doc_indices.append(end)

    def finalize(self) -> None:
        """Write the index and move both files into place (.bin first, .idx last)."""
        if self._closed:
            raise RuntimeError("finalize() called twice or after abort()")
        try:
            self._bin.close()
            lengths = np.frombuffer(self._lengths, dtype=np.int32)
            pointers = np.zeros(len(lengths), dtype=np.int64)
            if len(lengths) > 1:
                np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
            pointers *= self.dtype.itemsize
            doc_indices = np.frombuffer(self._doc_indices, dtype=np.int64)
            with open(self._idx_tmp, "wb") as f:
                f.write(_MAGIC)
                f.write(struct.pack("<Q", _VERSION))
                f.write(struct.pack("<B", _DTYPE_TO_CODE[self.dtype]))
                f.write(struct.pack("<Q", len(lengths)))
                f.write(struct.pack("<Q", len(doc_indices)))
                f.write(lengths.tobytes(order="C"))
                f.write(pointers.tobytes(order="C"))
                f.write(doc_indices.tobytes(order="C"))
            # An older dataset at this prefix must not pair its .idx with our new .bin.
            remove_quietly(self.idx_path)
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, self.idx_path)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far; the prefix is left as it was."""
        if not self._bin.closed:
            self._bin.close()
        remove_quietly(self._bin_tmp)
        remove_quietly(self._idx_tmp)
        self._closed = True

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._doc_indices) - 1

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def __del__(self):
        # A writer dropped without finalize() must not leave temp files behind.
        if not getattr(self, "_closed", True):
            self.abort()


class IndexedDataset:
    """Read-only, memory-mapped view of PREFIX.bin/.idx; sequences come back as array views."""

    def __init__(self, prefix: str):
        self.bin_path, self.idx_path = _paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise UserError(f"{path}: indexed dataset file not found; "
                                f"run `rapidnlp prepare` to create it or fix the path")
        idx_size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        if len(header) < len(_MAGIC) or header[: len(_MAGIC)] != _MAGIC:
            raise UserError(f"{self.idx_path}: not a Megatron indexed dataset index (bad magic "
                            f"{header[:len(_MAGIC)]!r}); point at a .idx written by "
                            f"`rapidnlp prepare` or Megatron's preprocess_data.py")
        if len(header) < _HEADER_SIZE:
            raise UserError(f"{self.idx_path}: index header truncated ({idx_size} bytes); "
                            f"re-run `rapidnlp prepare`")
        version, code, num_seq, num_doc_idx = struct.unpack("<QBQQ", header[len(_MAGIC):])
        if version != _VERSION:
            raise UserError(f"{self.idx_path}: index version {version}, only version 1 is "
                            f"supported; re-run `rapidnlp prepare`")
        if code not in _CODE_TO_DTYPE:
            raise UserError(f"{self.idx_path}: unknown dtype code {code} (Megatron codes 1-8); "
                            f"the file is corrupt, re-run `rapidnlp prepare`")
        self.dtype = _CODE_TO_DTYPE[code]
        needed = _HEADER_SIZE + num_seq * (4 + 8) + num_doc_idx * 8
        # Megatron's multimodal datasets append one int8 mode per sequence; we ignore it.
        if idx_size not in (needed, needed + num_seq) or num_doc_idx < 1:
            raise UserError(f"{self.idx_path}: index is {idx_size} bytes but its header "
                            f"({num_seq} sequences, {num_doc_idx} document indices) needs "
                            f"{needed}; the file is truncated or corrupt, re-run `rapidnlp prepare`")

        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        off = _HEADER_SIZE
        self.sequence_lengths = np.frombuffer(idx, dtype=np.int32, count=num_seq, offset=off)
        off += num_seq * 4
        self.sequence_pointers = np.frombuffer(idx, dtype=np.int64, count=num_seq, offset=off)
        off += num_seq * 8
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=num_doc_idx, offset=off)
        self._idx_mmap = idx
        if self.document_indices[0] != 0 or self.document_indices[-1] != num_seq:
            raise UserError(f"{self.idx_path}: document indices run from "
                            f"{int(self.document_indices[0])} to {int(self.document_indices[-1])}, "
                            f"expected 0 to {num_seq}; the file is corrupt, re-run `rapidnlp prepare`")

        bin_size = os.path.getsize(self.bin_path)
        itemsize = self.dtype.itemsize
        if num_seq:
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
        else:
            end = 0
        if bin_size < end:
            raise UserError(f"{self.bin_path}: data file is {bin_size} bytes but its index "
                            f"needs {end}; the file is truncated, re-run `rapidnlp prepare`")
        # np.memmap refuses empty files; an empty dataset is still a valid one.
        if bin_size:
            self._data = np.memmap(self.bin_path, dtype=np.uint8, mode="r")
        else:
            self._data = np.empty(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.sequence_lengths)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        return np.frombuffer(self._data, dtype=self.dtype,
                             count=int(self.sequence_lengths[i]),
                             offset=int(self.sequence_pointers[i]))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document(self, d: int) -> list[np.ndarray]:
        """The sequences of document d."""
        n = self.num_documents
        if d < 0:
            d += n
        if not 0 <= d < n:
            raise IndexError(f"document {d} out of range for {n} documents")
        start, stop = int(self.document_indices[d]), int(self.document_indices[d + 1])
        return [self[i] for i in range(start, stop)]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def open_same_dtype(prefixes: list[str]) -> list["IndexedDataset"]:
    """The datasets at `prefixes`; UserError (naming both) if their token dtypes differ."""
    if not prefixes:
        raise UserError("merge: no datasets given")
    sources = [IndexedDataset(p) for p in prefixes]
    for src in sources[1:]:
        if src.dtype != sources[0].dtype:
            raise UserError(f"{src.idx_path}: token dtype {src.dtype}, but {sources[0].idx_path} has "
                            f"{sources[0].dtype}; datasets tokenized with different vocabularies cannot be merged")
    return sources


def merge_indexed(prefixes: list[str], output: str, *, move: bool = False) -> dict:
    """Concatenate indexed datasets into OUTPUT.bin/.idx: documents and sequences in order, as
    Megatron's merge_datasets.py does, so the result has the bytes a single writer would give.

    Memory stays bounded by one source's index (streamed in blocks).  Datasets of different
    dtypes are refused (UserError naming both).  Written under temporary names, .idx last.
    move=True with one source renames its files instead of copying them.
    """
    sources = open_same_dtype(prefixes)
    dtype = sources[0].dtype
    bin_path, idx_path = _paths(output)
    parent = os.path.dirname(bin_path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    num_seq = sum(len(s) for s in sources)
    num_docs = sum(s.num_documents for s in sources)
    if move and len(sources) == 1:
        remove_quietly(idx_path)
        os.replace(_paths(prefixes[0])[0], bin_path)
        os.replace(_paths(prefixes[0])[1], idx_path)
        return {"sequences": num_seq, "documents": num_docs, "dtype": str(dtype)}
    bin_tmp, idx_tmp = temp_name(bin_path), temp_name(idx_path)
    block = 1 << 20
    try:
        with open(bin_tmp, "wb") as out:
            for src in sources:
                with open(src.bin_path, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        with open(idx_tmp, "wb") as f:
            f.write(_MAGIC + struct.pack("<Q", _VERSION) + struct.pack("<B", _DTYPE_TO_CODE[dtype])
                    + struct.pack("<Q", num_seq) + struct.pack("<Q", num_docs + 1))
            for src in sources:
                f.write(src.sequence_lengths.tobytes())
            offset = 0
            for src in sources:
                for a in range(0, len(src), block):
                    f.write((src.sequence_pointers[a:a + block] + offset).tobytes())
                offset += os.path.getsize(src.bin_path)
            f.write(np.zeros(1, np.int64).tobytes())
            offset = 0
            for src in sources:
                di = src.document_indices
                for a in range(1, len(di), block):
                    f.write((di[a:a + block] + offset).tobytes())
                offset += len(src)
        remove_quietly(idx_path)
        os.replace(bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)
    except BaseException:
        remove_quietly(bin_tmp)
        remove_quietly(idx_tmp)
        raise
    return {"sequences": num_seq, "documents": num_docs, "dtype": str(dtype)}
