"""Corpus-scale prepare: many inputs, worker processes, --shard parts and `rapidnlp merge`, all
byte-identical to one single-process prepare; Megatron datasets merged; resume; progress lines."""
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from conftest import REPO, clean_env, run_cli
from rapidnlp.data.demo import people_daily_lines
from rapidnlp.data.indexed import IndexedDataset, IndexedDatasetWriter
from rapidnlp.data.knowledge.build import prepare_knowledge
from rapidnlp.data.knowledge.kg import KnowledgeGraph
from rapidnlp.data.merge import merge
from rapidnlp.data.prepare import prepare
from rapidnlp.data.progress import Progress
from rapidnlp.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "megatron_indexed"
CHUNK = 16 << 10  # many small chunks, so that 2 workers and 3 shards each get several


def quiet(*_):
    pass


def files_of(prefix) -> dict[str, bytes]:
    """Every output file of a prepare (name relative to the prefix's folder) and its bytes;
    report.json holds timings and is left out."""
    prefix = str(prefix)
    folder, base = os.path.dirname(prefix), os.path.basename(prefix)
    out = {}
    for ext in (".model", ".bin", ".idx"):
        out[ext] = Path(prefix + ext).read_bytes()
    kdir = prefix + ".knowledge"
    if os.path.isdir(kdir):
        for name in sorted(os.listdir(kdir)):
            if name != "report.json":
                out[".knowledge/" + name] = Path(kdir, name).read_bytes()
    assert not os.path.exists(prefix + ".parts"), "the work folder is removed at the end"
    assert not [n for n in os.listdir(folder) if n.startswith(base + ".") and ".tmp-" in n]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """800 People's Daily paragraphs in one file (~200 KB: 13 chunks of 16 KB)."""
    root = tmp_path_factory.mktemp("corpus")
    path = root / "pd.txt"
    lines = []
    for i, line in enumerate(people_daily_lines()):
        if i == 800:
            break
        lines.append(line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_kg(tmp_path_factory):
    root = tmp_path_factory.mktemp("kg")
    triples = root / "kg.tsv"
    triples.write_text("北京市\t位于\t中国\n上海市\t位于\t中国\n江泽民\t国籍\t中国\n香港\t位于\t中国\n"
                       "中国共产党\t位于\t中国\n", encoding="utf-8")
    aliases = root / "aliases.tsv"
    aliases.write_text("北京市\t北京\n上海市\t上海\n", encoding="utf-8")
    return KnowledgeGraph.read_tsv(str(triples), str(aliases))


def _single_and_parallel(tmp_path, corpus, model, kg=None):
    ref = prepare(str(corpus), tmp_path / "one" / "ds", tokenizer_path=model, kg=kg, log=quiet)
    par = prepare(str(corpus), tmp_path / "two" / "ds", tokenizer_path=model, kg=kg, workers=2,
                  chunk_bytes=CHUNK, log=quiet)
    assert ref["chunks"] == 1 and par["chunks"] >= 10 and par["workers"] == 2
    return ref, par


@pytest.mark.parametrize("with_kg", [False, True], ids=["text", "knowledge"])
def test_workers_and_shards_are_byte_identical(tmp_path, corpus, pd_dataset, small_kg, with_kg):
    model = pd_dataset + ".model"
    kg = small_kg if with_kg else None
    ref, par = _single_and_parallel(tmp_path, corpus, model, kg)
    want = files_of(tmp_path / "one" / "ds")
    assert files_of(tmp_path / "two" / "ds") == want
    assert ref["documents"] == par["documents"] == 800 and ref["tokens"] == par["tokens"] > 50_000

    # Three machines' parts, then merge: the same bytes again.
    parts = []
    for i in range(3):
        prefix = tmp_path / "shards" / f"ds_{i}"
        prepare(str(corpus), prefix, tokenizer_path=model, kg=kg, shard=(i, 3), chunk_bytes=CHUNK, log=quiet)
        parts.append(str(prefix))
    sizes = [IndexedDataset(p).num_documents for p in parts]
    assert min(sizes) > 150 and sum(sizes) == 800
    merge(parts, tmp_path / "merged" / "ds")
    assert files_of(tmp_path / "merged" / "ds") == want

    # The reference itself: every document tokenized as the tokenizer tokenizes it alone.
    ds = IndexedDataset(str(tmp_path / "one" / "ds"))
    from rapidnlp.data.corpus import CorpusReader
    from rapidnlp.data.tokenizer import Tokenizer

    tok = Tokenizer(model)
    docs = list(CorpusReader(str(corpus)))
    for d in (0, 399, 799):
        assert [s.tolist() for s in ds.document(d)] == [tok.encode(s) for s in docs[d]]
    if with_kg:
        # ... and the knowledge side-streams equal those of the single-file builder.
        old = tmp_path / "old" / "ds"
        os.makedirs(old.parent)
        prepare_knowledge(str(corpus), str(old), small_kg, tokenizer_path=model, log=quiet)
        for name in ("tokens.bin", "tokens.idx", "tags.bin", "tags.idx", "mentions.npz", "entities.bin",
                     "triples.bin", "kg.npz", "linker.bin"):
            assert Path(str(old) + ".knowledge", name).read_bytes() == want[".knowledge/" + name], name
        report = json.loads(Path(str(tmp_path / "two" / "ds") + ".knowledge", "report.json").read_text())
        assert report["sidestreams"]["mentions"] > 300


def test_files_folders_globs_and_compression(tmp_path, corpus, pd_dataset):
    lines = corpus.read_text(encoding="utf-8").splitlines()[:300]
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    # Sorted order: a.txt.gz, b.jsonl.zst, sub/c.txt
    with gzip.open(src / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[:100]) + "\n")
    jsonl = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines[100:200])
    (src / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
    (src / "sub" / "c.txt").write_text("\n".join(lines[200:]) + "\n", encoding="utf-8")
    prepare(str(src / "sub" / "c.txt"), src / "sub" / "c", tokenizer_path=pd_dataset + ".model", log=quiet)
    (src / ".hidden").write_text("not corpus\n", encoding="utf-8")  # outputs and hidden files are skipped
    flat = tmp_path / "flat.txt"
    flat.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = pd_dataset + ".model"
    prepare(str(flat), tmp_path / "flat", tokenizer_path=model, log=quiet)
    prepare([str(src)], tmp_path / "dir", tokenizer_path=model, workers=2, chunk_bytes=4096, log=quiet)
    prepare([str(src / "sub" / "*.txt"), str(src / "b.jsonl.zst"), str(src / "a.txt.gz")], tmp_path / "glob",
            tokenizer_path=model, log=quiet)
    want = files_of(tmp_path / "flat")
    assert files_of(tmp_path / "dir") == want and files_of(tmp_path / "glob") == want
    with pytest.raises(UserError, match=r"nothing\*\.txt: no corpus files"):
        prepare([str(tmp_path / "nothing*.txt")], tmp_path / "x", tokenizer_path=model, log=quiet)


def test_malformed_line_in_a_later_chunk_names_file_and_line(tmp_path, pd_dataset):
    src = tmp_path / "c.jsonl"
    rows = [json.dumps({"text": f"第{i}句话，说的是北京。"}, ensure_ascii=False) for i in range(2000)]
    rows[1500] = '{"text": "坏'
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    for how in ({"workers": 2}, {"shard": (1, 2)}):
        with pytest.raises(UserError, match=r"c\.jsonl:1501: malformed JSON"):
            prepare(str(src), tmp_path / "out" / "ds", tokenizer_path=pd_dataset + ".model", chunk_bytes=8192,
                    log=quiet, **how)
        assert os.listdir(tmp_path / "out") == []  # no output, no work folder


def _write_megatron(prefix, documents, dtype):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in documents:
            w.add_document([np.asarray(s) for s in doc])


def test_megatron_fixtures_merge_as_megatron_concatenates(tmp_path):
    expected = json.loads((FIXTURES / "expected.json").read_text())
    for i in range(2):
        for ext in (".bin", ".idx"):
            (tmp_path / f"u{i}{ext}").write_bytes((FIXTURES / f"uint16_docs{ext}").read_bytes())
    r = run_cli("merge", str(tmp_path / "u0"), str(tmp_path / "u1"), "--output", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    docs = expected["uint16_docs"]["documents"]
    ds = IndexedDataset(str(tmp_path / "m"))
    assert [[s.tolist() for s in ds.document(d)] for d in range(ds.num_documents)] == docs + docs
    n = len(expected["uint16_docs"]["sequence_lengths"])
    di = expected["uint16_docs"]["document_indices"]
    np.testing.assert_array_equal(ds.document_indices, di + [x + n for x in di[1:]])
    # Byte for byte what Megatron's builder writes for the concatenated documents.
    _write_megatron(str(tmp_path / "ref"), docs + docs, np.uint16)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()

    r = run_cli("merge", str(FIXTURES / "uint16_docs"), str(FIXTURES / "int32_docs"), "--output",
                str(tmp_path / "bad"))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "dtype int32" in lines[0] and "uint16" in lines[0]
    assert not list(tmp_path.glob("bad*"))


def test_merge_refuses_other_tokenizer_or_kg(tmp_path, corpus, pd_dataset, small_kg):
    model = pd_dataset + ".model"
    with pytest.raises(UserError, match=r"--shard 1/2: this part is empty, the corpus makes only 1 chunk"):
        prepare(str(corpus), tmp_path / "a", tokenizer_path=model, shard=(1, 2), log=quiet)
    prepare(str(corpus), tmp_path / "a", tokenizer_path=model, kg=small_kg, shard=(0, 2), chunk_bytes=CHUNK,
            log=quiet)
    (tmp_path / "other.tsv").write_text("北京市\t首都\t中国\n", encoding="utf-8")
    other = KnowledgeGraph.read_tsv(str(tmp_path / "other.tsv"))
    prepare(str(corpus), tmp_path / "b", tokenizer_path=model, kg=other, shard=(1, 2), chunk_bytes=CHUNK,
            log=quiet)
    r = run_cli("merge", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "m"))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "kg.npz differs" in lines[0], r.stderr
    (tmp_path / "b.model").write_bytes(b"not the same")
    r = run_cli("merge", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "m"))
    assert r.returncode == 2 and "b.model differs" in r.stderr and "same --tokenizer" in r.stderr
    assert not list(tmp_path.glob("m*"))
    r = run_cli("prepare", "--input", str(corpus), "--output", str(tmp_path / "s"), "--shard", "1/2")
    assert r.returncode == 2 and "--shard: give --tokenizer" in r.stderr


def test_progress_lines_when_not_a_terminal(tmp_path, corpus, pd_dataset):
    import io

    lines, stream = [], io.StringIO()
    prepare(str(corpus), tmp_path / "ds", tokenizer_path=pd_dataset + ".model", chunk_bytes=CHUNK,
            progress_stream=stream, progress_interval=0.0, log=lines.append)
    progress = [line for line in lines if line.startswith("prepare: ")]
    pattern = re.compile(r"prepare: \d+% \([\d.]+ KB of [\d.]+ KB\), [\d,]+ documents, [\d.]+[kM] tokens/s, "
                         r"ETA (\d+:\d\d:\d\d|\?)$")
    assert len(progress) >= 10 and all(pattern.match(line) for line in progress), progress[:3]
    assert progress[-1].startswith("prepare: 100% (") and " 800 documents" in progress[-1]
    assert stream.getvalue() == ""  # not a terminal: no bar drawn
    assert lines[-1].startswith("prepared ")  # the final summary as before

    bar = Progress(4000, stream=stream, tty=True)
    bar.interval = 0.0
    bar.update(1000, 10, 500)
    bar.update(1000, 10, 500)
    bar.close()
    drawn = stream.getvalue().split("\r")[1:]
    assert len(drawn) == 3 and stream.getvalue().endswith("\n")
    assert drawn[-1].startswith("prepare [" + "#" * 15 + "." * 15 + "]  50% 2.0 KB/4.0 KB 20 documents, ")


@pytest.mark.slow
def test_resume_after_a_killed_worker(tmp_path, pd_dataset):
    src = tmp_path / "big.txt"
    lines = list(people_daily_lines())[:4000]
    src.write_text("\n".join(lines * 3) + "\n", encoding="utf-8")  # ~7 MB, 110 chunks of 64 KB
    prefix = str(tmp_path / "ds")
    args = [sys.executable, "-m", "rapidnlp.cli", "prepare", "--input", str(src), "--output", prefix,
            "--tokenizer", pd_dataset + ".model", "--workers", "2", "--chunk-mb", "0.0625"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                            cwd=REPO)
    parts = Path(prefix + ".parts")
    deadline = time.time() + 120
    while len(list(parts.glob("chunk_*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    # Forked workers carry the command line of the CLI; spawned ones run spawn_main.
    workers = [int(c) for c in children if re.search("rapidnlp.cli|spawn_main", Path(f"/proc/{c}/cmdline").read_text())]
    assert workers, children
    os.kill(workers[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "worker process died" in err and "--resume" in err, err
    assert not os.path.exists(prefix + ".idx") and not os.path.exists(prefix + ".bin")
    assert len(list(parts.glob("chunk_*.json"))) >= 3

    r = run_cli(*args[3:], "--resume")
    assert r.returncode == 0, r.stderr
    m = re.search(r"resume: reusing (\d+) of (\d+) finished chunks", r.stdout)
    assert m and int(m.group(1)) >= 3, r.stdout
    assert f"{m.group(1)} reused" in r.stdout
    prepare(str(src), tmp_path / "fresh", tokenizer_path=pd_dataset + ".model", log=quiet)
    assert files_of(prefix) == files_of(tmp_path / "fresh")


def test_slurm_array_script_parts_merge_into_one_prepare(tmp_path, corpus, pd_dataset):
    model = pd_dataset + ".model"
    env = {"INPUT": str(corpus), "TOKENIZER": model, "OUT": str(tmp_path / "ds"), "PYTHON": sys.executable,
           "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_CPUS_PER_TASK": "1"}
    script = str(REPO / "scripts" / "slurm" / "prepare.sbatch")
    for i in range(2):
        r = subprocess.run(["bash", script, "--chunk-mb", "0.02"], env=clean_env(**env, SLURM_ARRAY_TASK_ID=str(i)),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", script], env=clean_env(**env, MERGE="2"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    prepare(str(corpus), tmp_path / "single" / "ds", tokenizer_path=model, log=quiet)
    assert files_of(tmp_path / "ds") == files_of(tmp_path / "single" / "ds")


def test_a_second_prepare_at_the_same_prefix_uses_its_own_tokenizer(tmp_path, corpus, pd_dataset):
    # The worker-side cache of loaded tokenizers must not hand the first run's model to the second.
    first = prepare(str(corpus), tmp_path / "ds", tokenizer_path=pd_dataset + ".model", log=quiet)
    second = prepare(str(corpus), tmp_path / "ds", vocab_size=400, char_level=True, log=quiet)
    assert first["vocab_size"] == 1000 and second["vocab_size"] < 1000
    from rapidnlp.data.corpus import split_sentences
    from rapidnlp.data.tokenizer import Tokenizer

    tok = Tokenizer(str(tmp_path / "ds") + ".model")
    first_sentence = split_sentences(corpus.read_text(encoding="utf-8").splitlines()[0])[0]
    assert IndexedDataset(str(tmp_path / "ds"))[0].tolist() == tok.encode(first_sentence)
