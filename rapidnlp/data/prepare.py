"""`rapidnlp prepare`: raw corpus -> tokenizer (PREFIX.model) + indexed dataset (PREFIX.bin/.idx)
[+ knowledge side-streams (PREFIX.knowledge/)], on N worker processes, on one machine or many.

Each document of the corpus becomes one dataset document, each of its sentences one Megatron
"sequence", so that the sample builders can pack whole sentences and pick sentence pairs.

How the work is cut (inputs.py): the input files are cut into chunks at line ends; the tokenizer
is trained once, in this process, before any worker starts (or given with --tokenizer); each
worker process prepares whole chunks into PREFIX.parts/chunk_N.{bin,idx,knowledge/} and marks
each one finished with chunk_N.json; at the end the chunks are concatenated in order into the
outputs.  Nothing a document becomes depends on its neighbours, so the outputs are the same
bytes for any worker count, chunk size or --shard split.

All outputs are written under temporary names and moved into place only once everything
succeeded, PREFIX.idx last (it is what makes the dataset readable): a run that fails or is killed
midway never leaves a PREFIX.* that looks complete.  A run killed midway (or whose worker died)
leaves PREFIX.parts/, which `--resume` reuses; any other failure removes it.  Memory is bounded
by the chunk size, not the corpus size (the merge streams).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from queue import Empty
from typing import Callable, TextIO

from rapidnlp.data.corpus import CorpusReader, document_batches, empty_corpus_message
from rapidnlp.data.indexed import IndexedDatasetWriter, dtype_for_vocab, merge_indexed
from rapidnlp.data.inputs import Chunk, expand_inputs, plan_chunks, shard_chunks
from rapidnlp.data.progress import Progress
from rapidnlp.data.tokenizer import Tokenizer, train_tokenizer
from rapidnlp.errors import UserError
from rapidnlp.io import atomic_folder, atomic_path, remove_quietly, temp_name, write_json_atomic

# Sentences per call into sentencepiece: per-call overhead vanishes, memory stays small.
_ENCODE_BATCH = 8192
_MAX_REPORTED = 10


def _encode(batch: list[list[str]], tok: Tokenizer, writer: IndexedDatasetWriter) -> int:
    """Tokenize whole documents into the writer; returns the token count."""
    ids = tok.encode_batch([s for doc in batch for s in doc])
    docs, k = [], 0
    for doc in batch:
        seqs = [seq for seq in ids[k:k + len(doc)] if seq]
        k += len(doc)
        if seqs:
            docs.append(seqs)
    if docs:
        writer.add_documents(docs)
    return sum(map(len, ids))


# -- one chunk (in a worker process, or in this one) --------------------------------------------

@dataclass(frozen=True)
class ChunkJob:
    """What every chunk of one prepare shares (picklable: it travels to the workers)."""

    parts: str
    tokenizer: str
    knowledge: str | None  # the folder with the KG files (build.KG_FILES), or None
    strict_utf8: bool
    text_key: str
    max_triples: int


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


@functools.lru_cache(maxsize=1)
def _resources(tokenizer: str, knowledge: str | None, stamps: tuple):
    """Loaded once per worker process, not once per chunk.  `stamps` (inode, mtime of the files)
    keep a later prepare in this process from getting an earlier one's files at the same paths."""
    tok = Tokenizer(tokenizer)
    if knowledge is None:
        return tok, None, None
    from rapidnlp.data.knowledge.kg import KnowledgeGraph
    from rapidnlp.data.knowledge.linker import EntityLinker

    return (tok, KnowledgeGraph.load(os.path.join(knowledge, "kg.npz")),
            EntityLinker.load(os.path.join(knowledge, "linker.bin")))


def prepare_chunk(job: ChunkJob, chunk: Chunk,
                  report: Callable[[int, int, int], None] | None = None) -> dict:
    """PARTS/chunk_N.{bin,idx} (and chunk_N.knowledge/) for one chunk, then chunk_N.json, the
    mark that the chunk is finished; returns its counts.  `report(bytes, documents, tokens)`
    is called with increments after every batch."""
    files = [job.tokenizer] + ([os.path.join(job.knowledge, "kg.npz")] if job.knowledge else [])
    tok, kg, linker = _resources(job.tokenizer, job.knowledge, tuple(map(_stamp, files)))
    out = os.path.join(job.parts, chunk.name())
    reader = CorpusReader(chunk.path, start=chunk.start, end=chunk.end, strict_utf8=job.strict_utf8,
                          text_key=job.text_key, max_reported=_MAX_REPORTED)
    writer = IndexedDatasetWriter(out, dtype_for_vocab(tok.vocab_size))
    side = None
    if kg is not None:
        from rapidnlp.data.knowledge.sidestreams import SidestreamWriter

        side = SidestreamWriter(out + ".knowledge", kg, linker, tok, max_triples=job.max_triples)
    tokens = reported = 0
    try:
        for batch in document_batches(reader, _ENCODE_BATCH):
            n = _encode(batch, tok, writer)
            if side is not None:
                side.add(batch)
            tokens += n
            if report:
                report(reader.bytes_read - reported, len(batch), n)
                reported = reader.bytes_read
        if side is not None:
            side_stats = side.finalize()
            side_stats["skipped_lines"] = reader.num_skipped
            write_json_atomic(os.path.join(out + ".knowledge", "sidestreams.json"), side_stats)
        writer.finalize()
    except BaseException:
        writer.abort()
        if side is not None:
            side.abort()
        raise
    if report:
        report(chunk.size - reported, 0, 0)
    stats = {"documents": reader.num_documents, "sentences": writer.num_sequences, "tokens": tokens,
             "skipped_lines": reader.num_skipped,
             "skipped_at": [f"{chunk.path}:{n}" for n in reader.skipped_lines]}
    write_json_atomic(out + ".json", stats)
    return stats


_QUEUE = None


def _init_worker(queue) -> None:
    global _QUEUE
    _QUEUE = queue
    # Ctrl-C reaches the whole process group: the main process alone stops the run (and us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the CLI's handler


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now, mid-chunk (their unfinished chunks have no .json and are redone).
    Python 3.14 has this as pool.terminate_workers(); until then the private process table."""
    for process in list((pool._processes or {}).values()):
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _worker_chunk(job: ChunkJob, chunk: Chunk) -> dict:
    return prepare_chunk(job, chunk, lambda *counts: _QUEUE.put(counts))


def _run_chunks(job: ChunkJob, todo: list[Chunk], workers: int, progress: Progress) -> None:
    """Every chunk of `todo` prepared, on `workers` processes (1: in this process)."""
    if workers == 1 or len(todo) <= 1:
        for chunk in todo:
            prepare_chunk(job, chunk, progress.update)
        return
    # fork starts a worker in milliseconds (spawn: ~0.5 s of imports each, a lot for a 100 MB
    # corpus), but is unsafe in a process with other threads (a test runner, torch): spawn there.
    ctx = multiprocessing.get_context("fork" if threading.active_count() == 1 else "spawn")
    queue = ctx.Queue()
    pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                               initargs=(queue,))

    def drain() -> None:
        try:
            while True:
                progress.update(*queue.get_nowait())
        except Empty:
            pass

    try:
        pending = {pool.submit(_worker_chunk, job, chunk) for chunk in todo}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                future.result()  # a worker's error (a bad line: UserError) stops the run here
        drain()
    except BaseException:
        _terminate(pool)
        raise
    pool.shutdown(wait=True)


# -- the whole prepare ----------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _train(chunks: list[Chunk], where: str, model_prefix: str, vocab_size: int, seed: int,
           char_level: bool, strict_utf8: bool, text_key: str, log, final_model: str,
           progress: Progress) -> None:
    """Train the tokenizer on every sentence of the corpus, streamed in chunk order."""
    readers = [CorpusReader(c.path, start=c.start, end=c.end, strict_utf8=strict_utf8, text_key=text_key)
               for c in chunks]

    def sentences():
        for reader, chunk in zip(readers, chunks):
            seen = docs = sents = 0
            for doc in reader:
                yield from doc
                docs, sents = docs + 1, sents + len(doc)
                if docs == 1024:
                    progress.update(reader.bytes_read - seen, docs, sents)
                    seen, docs, sents = reader.bytes_read, 0, 0
            progress.update(chunk.size - seen, docs, sents)

    stream = sentences()
    first = next(stream, None)
    if first is None:
        raise UserError(empty_corpus_message(where, sum(r.num_skipped for r in readers),
                                             readers[0].is_jsonl, text_key))
    train_tokenizer(itertools.chain([first], stream), model_prefix, vocab_size, seed=seed, char_level=char_level,
                    log=lambda msg: log(msg.replace(model_prefix + ".model", final_model)))


def prepare(inputs: str | list[str], output_prefix: str, *, vocab_size: int = 8000,
            tokenizer_path: str | None = None, strict_utf8: bool = False,
            text_key: str = "text", seed: int = 0, char_level: bool = False,
            kg=None, max_triples: int = 16, evaluate_demo: bool = False,
            workers: int = 1, shard: tuple[int, int] | None = None, resume: bool = False,
            chunk_bytes: int | None = None, progress_stream: TextIO | None = None,
            progress_tty: bool | None = None, progress_interval: float = 10.0,
            log: Callable[[str], None] = print) -> dict:
    """Tokenize a corpus into PREFIX.model + PREFIX.bin/.idx (+ PREFIX.knowledge/ given a
    KnowledgeGraph `kg`) and return what was done.

    inputs: files, folders or globs (inputs.py).  With tokenizer_path the given model is used
    (and copied to PREFIX.model) instead of training one with vocab_size (char_level: one piece
    per character).  workers: processes (0: every core).  shard=(i, n): only the i-th of n
    contiguous parts of the corpus (needs tokenizer_path); `merge` joins the parts.  chunk_bytes:
    the unit of work (default inputs.default_chunk_bytes; the output does not depend on it).  resume:
    reuse the chunks a killed run finished.  evaluate_demo: add the demo KG's place linking
    precision/recall to the knowledge report.  Returns documents, sentences, tokens, skipped_lines
    (count), skipped_at (the first few, as FILE:LINE), vocab_size, dtype, seconds, chunks,
    reused_chunks, the three paths, and the knowledge report (given a kg).
    """
    start = time.perf_counter()
    output_prefix = os.fspath(output_prefix)
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    specs = [os.fspath(s) for s in specs]
    workers = workers or len(os.sched_getaffinity(0))
    if workers < 0:
        raise UserError(f"prepare: --workers {workers}; give 0 (all cores) or more")
    if shard is not None and shard[1] > 1 and tokenizer_path is None:
        raise UserError("prepare --shard: give --tokenizer MODEL, so that every shard uses the same "
                        "tokenizer (train it first, e.g. with a prepare of a sample of the corpus)")
    if tokenizer_path is not None:
        Tokenizer(tokenizer_path)  # a bad model fails here, before any output exists
    chunks = plan_chunks(expand_inputs(specs), chunk_bytes)
    if shard is not None:
        every = len(chunks)
        chunks = shard_chunks(chunks, *shard)
        if not chunks:
            raise UserError(f"prepare --shard {shard[0]}/{shard[1]}: this part is empty, the corpus makes "
                            f"only {every} chunk(s); give a smaller --chunk-mb "
                            f"or fewer parts")
    where = specs[0] if len(specs) == 1 else f"{specs[0]} (and {len(specs) - 1} more)"
    if not chunks:
        raise UserError(empty_corpus_message(where, 0, False))
    model_path = output_prefix + ".model"
    parts = output_prefix + ".parts"
    plan = {"chunks": [[c.path, c.start, c.end, c.size, os.stat(c.path).st_mtime_ns] for c in chunks],
            "tokenizer": _sha256(tokenizer_path) if tokenizer_path else
            {"vocab_size": vocab_size, "seed": seed, "char_level": char_level},
            "strict_utf8": strict_utf8, "text_key": text_key, "max_triples": max_triples}
    _open_parts(parts, plan, resume, log)
    try:
        tok_model = os.path.join(parts, "tokenizer.model")
        total = sum(c.size for c in chunks)
        show = {"stream": progress_stream, "tty": progress_tty, "interval": progress_interval, "log": log}
        if not os.path.isfile(tok_model):
            if tokenizer_path is not None:
                with atomic_path(tok_model) as tmp:
                    shutil.copyfile(tokenizer_path, tmp)
            else:
                reading = Progress(total, label="tokenizer: reading the corpus", unit="sentences", **show)
                _train(chunks, where, tok_model[:-len(".model")], vocab_size, seed, char_level,
                       strict_utf8, text_key, log, model_path, reading)
                reading.close()
        tok = Tokenizer(tok_model)
        knowledge, kg_report = _kg_files(parts, kg, tok, log) if kg is not None else (None, None)
        job = ChunkJob(parts, tok_model, knowledge, strict_utf8, text_key, max_triples)
        done = [c for c in chunks if os.path.isfile(os.path.join(parts, c.name() + ".json"))]
        todo = [c for c in chunks if c not in set(done)]
        if done:
            log(f"resume: reusing {len(done)} of {len(chunks)} finished chunks in {parts}")
        progress = Progress(total, done_bytes=sum(c.size for c in done), **show)
        _run_chunks(job, todo, workers, progress)
        progress.close()
        # The demo's place evaluation links with `workers` threads once the worker processes are gone.
        demo_threads = workers if evaluate_demo else 0
        stats = _commit(parts, chunks, output_prefix, tok, kg, kg_report, demo_threads, where, start, log)
    except (KeyboardInterrupt, BrokenProcessPool) as e:
        # The finished chunks stay for --resume; nothing outside PREFIX.parts/ was written.
        finished = sum(os.path.isfile(os.path.join(parts, c.name() + ".json")) for c in chunks)
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"a worker process died ({e})"
        raise UserError(f"prepare: {why}; {finished} of {len(chunks)} chunks are finished in {parts}: "
                        f"rerun with --resume to reuse them") from None
    except BaseException:
        shutil.rmtree(parts, ignore_errors=True)
        raise
    stats.update(chunks=len(chunks), reused_chunks=len(done), workers=workers)
    if kg_report is not None:
        stats["knowledge"] = kg_report
    return stats


def _open_parts(parts: str, plan: dict, resume: bool, log) -> None:
    """Make PARTS/ for this plan; with resume keep it if it was made for the same plan."""
    plan_path = os.path.join(parts, "plan.json")
    if resume and os.path.isfile(plan_path):
        with open(plan_path, encoding="utf-8") as f:
            old = json.load(f)
        old.pop("kg", None)
        if old != plan:
            raise UserError(f"{parts}: made by a prepare with other inputs or options (files changed "
                            f"since?); rerun without --resume to start over")
        return
    if os.path.isdir(parts):
        log(f"removing {parts} left by an earlier run" + ("" if resume else " (pass --resume to reuse it)"))
        shutil.rmtree(parts)
    os.makedirs(parts)
    write_json_atomic(plan_path, plan)


def _kg_files(parts: str, kg, tok: Tokenizer, log) -> tuple[str, dict]:
    """PARTS/knowledge/ with the corpus-independent knowledge files; on resume the KG must be the
    one the finished chunks were linked with."""
    from rapidnlp.data.knowledge.build import build_kg_files

    folder = os.path.join(parts, "knowledge")
    tmp = temp_name(folder)
    os.makedirs(tmp)
    try:
        _, report = build_kg_files(tmp, kg, tok, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    digest = _sha256(os.path.join(tmp, "kg.npz"))
    plan_path = os.path.join(parts, "plan.json")
    with open(plan_path, encoding="utf-8") as f:
        recorded = json.load(f)
    if recorded.setdefault("kg", digest) != digest:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{parts}: its chunks were linked with another knowledge graph; rerun "
                        f"without --resume to start over")
    write_json_atomic(plan_path, recorded)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder, report


def _commit(parts: str, chunks: list[Chunk], prefix: str, tok: Tokenizer, kg, kg_report, demo_threads: int,
            where: str, start: float, log) -> dict:
    """Concatenate the chunks into the outputs and move them into place, PREFIX.idx last."""
    counts = []
    for c in chunks:
        with open(os.path.join(parts, c.name() + ".json"), encoding="utf-8") as f:
            counts.append(json.load(f))
    total = {k: sum(c[k] for c in counts) for k in ("documents", "sentences", "tokens", "skipped_lines")}
    if total["documents"] == 0:
        raise UserError(empty_corpus_message(where, total["skipped_lines"], False))
    skipped_at = [at for c in counts for at in c["skipped_at"]][:_MAX_REPORTED]
    names = [os.path.join(parts, c.name()) for c in chunks]
    # The old index goes first so that it never pairs with the new model, .bin or knowledge.
    remove_quietly(prefix + ".idx")
    if kg is not None:
        _commit_knowledge(parts, names, prefix, kg, kg_report, demo_threads, start, log)
    os.replace(os.path.join(parts, "tokenizer.model"), prefix + ".model")
    merged = merge_indexed(names, prefix, move=True)
    shutil.rmtree(parts)
    stats = {**total, "skipped_at": skipped_at, "vocab_size": tok.vocab_size, "dtype": merged["dtype"],
             "seconds": round(time.perf_counter() - start, 3), "model": prefix + ".model",
             "bin": prefix + ".bin", "idx": prefix + ".idx"}
    if total["skipped_lines"]:
        more = ", ..." if total["skipped_lines"] > len(skipped_at) else ""
        log(f"skipped {total['skipped_lines']} line(s) that are not valid UTF-8 "
            f"({', '.join(skipped_at)}{more})")
    log(f"prepared {prefix}.{{model,bin,idx}}: {stats['documents']} documents, "
        f"{stats['sentences']} sentences, {stats['tokens']} tokens ({stats['dtype']}), "
        f"vocab {stats['vocab_size']}, {stats['skipped_lines']} skipped lines, "
        f"{stats['seconds']:.1f} s")
    return stats


def _commit_knowledge(parts, names, prefix, kg, report, demo_threads, start, log) -> None:
    from rapidnlp.data.knowledge.build import knowledge_dir, log_summary, merge_knowledge, write_report

    final = knowledge_dir(prefix)
    with atomic_folder(final) as tmp:
        report["sidestreams"] = merge_knowledge([n + ".knowledge" for n in names], tmp, move=True,
                                                kg_files=os.path.join(parts, "knowledge"))
        if demo_threads:
            from rapidnlp.data.knowledge.demo import evaluate_places
            from rapidnlp.data.knowledge.linker import EntityLinker

            linker = EntityLinker.load(os.path.join(tmp, "linker.bin"))
            report["places_vs_peoples_daily_ns"] = evaluate_places(linker, kg, workers=demo_threads)
        write_report(tmp, report, start)
    log_summary(final, report, log)

