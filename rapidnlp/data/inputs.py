"""A corpus given as files, folders and globs, cut into chunks that workers prepare independently.

`expand_inputs` turns what the user typed into a sorted list of files (a folder contributes every
file under it, a glob its matches), so a prepare reads the same files in the same order wherever
it runs.  `.gz` and `.zst` files are decompressed as a stream (`open_binary`).

`plan_chunks` cuts the files into chunks of about `chunk_bytes`, each ending at a line end; a
compressed file cannot be entered midway and is one chunk.  A document is one line, and nothing
a document becomes depends on its neighbours, so the output of a prepare does not depend on
where the chunks are cut nor on which worker prepares which chunk: concatenating the chunks'
outputs in chunk order gives the same bytes for any chunk size and worker count.  `shard_chunks`
gives machine i of n a contiguous run of chunks, so its shards too merge by concatenation.

This module reads bytes only; corpus.py turns lines into documents.
"""
from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass

from rapidnlp.errors import UserError

COMPRESSED = (".gz", ".zst")
# What prepare itself writes: a folder given as input skips these (an output next to its corpus).
_OUTPUTS = (".bin", ".idx", ".model", ".npz")


def expand_inputs(specs: list[str]) -> list[str]:
    """Files named by `specs` (files, folders searched recursively, globs), sorted, duplicates once.
    In a folder, hidden files and what prepare writes (datasets, models, work folders) are skipped."""
    files = set()
    for spec in specs:
        if os.path.isdir(spec):
            found = _folder_files(spec)
        elif os.path.isfile(spec):
            found = [spec]
        else:
            found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
            if not found and not glob.has_magic(spec):
                raise UserError(f"{spec}: corpus file not found; fix the input path")
        if not found:
            raise UserError(f"{spec}: no corpus files there; give text, .jsonl (optionally .gz/.zst) "
                            f"files, folders of them or a glob that matches them")
        files.update(os.path.normpath(p) for p in found)
    return sorted(files)


def _folder_files(folder: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not d.endswith((".parts", ".knowledge"))]
        found += [os.path.join(root, n) for n in names if not n.startswith(".") and not n.endswith(_OUTPUTS)]
    return found


def base_name(path: str) -> str:
    """The name that tells the format: without a compression suffix."""
    for suffix in COMPRESSED:
        if path.lower().endswith(suffix):
            return path[: -len(suffix)]
    return path


def open_binary(path: str) -> tuple[io.BufferedIOBase, io.BufferedIOBase]:
    """(decompressed stream, underlying file): the file's position is the progress in bytes."""
    raw = open(path, "rb")
    lower = path.lower()
    if lower.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb")), raw
    if lower.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise UserError(f"{path}: reading .zst needs the zstandard package; "
                            f"pip install 'rapidnlp[zstd]' or decompress the file") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), raw
    return raw, raw


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, end) of a file (end -1: to its end), cut at line ends."""

    index: int
    path: str
    start: int
    end: int
    size: int  # bytes on disk this chunk covers: its share of the progress bar

    def name(self) -> str:
        return f"chunk_{self.index:06d}"


def default_chunk_bytes(files: list[str]) -> int:
    """About 64 chunks per corpus (enough to balance a few dozen workers), 1 to 64 MiB each: a
    function of the corpus only, so that --resume finds the same chunks with any worker count."""
    total = sum(os.path.getsize(p) for p in files)
    return min(64 << 20, max(1 << 20, total // 64))


def plan_chunks(files: list[str], chunk_bytes: int | None = None) -> list[Chunk]:
    """The chunks of `files`, in order; the cut points are found by seeking, not by reading."""
    chunk_bytes = chunk_bytes or default_chunk_bytes(files)
    chunks: list[Chunk] = []
    for path in files:
        size = os.path.getsize(path)
        if path.lower().endswith(COMPRESSED):
            chunks.append(Chunk(len(chunks), path, 0, -1, size))
            continue
        cuts = [0]
        with open(path, "rb") as f:
            while cuts[-1] + chunk_bytes < size:
                f.seek(cuts[-1] + chunk_bytes)
                f.readline()  # to the end of the line the seek landed in
                if f.tell() >= size:
                    break
                cuts.append(f.tell())
        cuts.append(size)
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b > a:
                chunks.append(Chunk(len(chunks), path, a, b, b - a))
    return chunks


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), 0 <= i < n."""
    i, sep, n = text.partition("/")
    if not sep or not i.isdigit() or not n.isdigit() or not 0 <= int(i) < int(n):
        raise UserError(f"--shard {text}: expected i/n with 0 <= i < n, e.g. --shard 0/4 "
                        f"(SLURM: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(i), int(n)


def shard_chunks(chunks: list[Chunk], i: int, n: int) -> list[Chunk]:
    """Shard i of n: the contiguous chunks whose first byte lies in the i-th n-th of the bytes."""
    total = sum(c.size for c in chunks)
    out, before = [], 0
    for c in chunks:
        if i * total <= before * n < (i + 1) * total:
            out.append(c)
        before += c.size
    return out
