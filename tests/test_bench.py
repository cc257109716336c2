"""`rapidnlp bench` end to end on CPU: the real trainer at world 1 and 2 over gloo, the CSV, the
markdown table and the plots; --collect with the planner's prediction; --merge; bad input."""
import csv
import shutil

import pytest

from conftest import clean_env, run_cli

TINY = ["--data.seq_len", "32", "--model.max_position_embeddings", "32", "--train.global_batch", "4",
        "--train.micro_batch", "2"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_world_1_and_2_writes_csv_table_and_plots(pd_dataset, tmp_path):
    out = tmp_path / "bench"
    res = run_cli("bench", "--config", "configs/tiny.toml", "--layouts", "dp;tp2", "--world", "1,2", "--steps", "3",
                  "--output", str(out), "--data.path", pd_dataset, *TINY, env=clean_env(), timeout=500)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skip tp2 at world 1" in res.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["layout"], r["world"], r["status"]) for r in rows] == [("dp", "1", "ok"), ("dp", "2", "ok"),
                                                                       ("tp2", "2", "ok")]
    by = {(r["layout"], r["world"]): r for r in rows}
    assert by["dp", "2"]["global_batch"] == "8" and by["dp", "1"]["global_batch"] == "4"  # weak scaling
    assert by["tp2", "2"]["tp"] == "2" and by["dp", "2"]["dp"] == "2"
    assert float(by["dp", "1"]["efficiency"]) == 1.0
    for r in rows:  # efficiency = per-device throughput against world 1
        assert float(r["efficiency"]) == pytest.approx(
            float(r["tokens_per_s_per_device"]) / float(by["dp", "1"]["tokens_per_s_per_device"]))
        assert float(r["tokens_per_s"]) > 0 and int(r["peak_mem_bytes"]) > 0 and int(r["steps"]) == 3
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | layout") and len(table) == 2 + len(rows)
    for name in ("throughput.png", "efficiency.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    # a run folder reported on its own, with the planner's prediction for an A100
    other = tmp_path / "collected"
    run = next((out / "runs").glob("tp2_weak_w2"))
    res = run_cli("bench", "--collect", str(run), "--model", "tiny-copy", "--gpu", "a100-80g", "--output", str(other))
    assert res.returncode == 0, res.stderr
    (row,) = csv.DictReader(open(other / "results.csv"))
    assert float(row["predicted_tokens_per_s"]) > 0
    assert float(row["prediction_error"]) == pytest.approx(float(row["tokens_per_s"]) / float(row["predicted_tokens_per_s"]) - 1)

    merged = tmp_path / "merged"
    res = run_cli("bench", "--merge", str(out), str(other), "--output", str(merged))
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(open(merged / "results.csv")))
    assert sorted((r["model"], r["layout"], r["world"]) for r in rows) == [
        ("tiny", "dp", "1"), ("tiny", "dp", "2"), ("tiny", "tp2", "2"), ("tiny-copy", "tp2", "2")]
    assert (merged / "throughput.png").exists()
    shutil.rmtree(out / "runs")


def test_bench_bad_input_is_one_line(tmp_path):
    res = run_cli("bench", "--config", "configs/tiny.toml", "--layouts", "tp2;foo3", "--output", str(tmp_path))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "'foo3'" in res.stderr, res.stderr
    res = run_cli("bench", "--config", "configs/tiny.toml", "--world", "1,x", "--output", str(tmp_path))
    assert res.returncode == 2 and "--world" in res.stderr
    res = run_cli("bench", "--merge", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "no results.csv" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_learning_smallest_size(pd_dataset, tmp_path):
    """scripts/bench_learning.py at its smallest: the engine (a real `rapidnlp pretrain` and its
    HF export) and the transformers reference, both scored by the one evaluator; the reference
    on the engine's own batches too (--same-batches)."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    def bench(out, *extra):
        res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_learning.py"), "--data", pd_dataset,
                              "--steps", "3", "--warmup", "1", "--hidden", "32", "--layers", "1", "--batch", "8",
                              "--seq", "32", "--eval-texts", "40", "--threads", "1", "--out", str(out), *extra],
                             cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return res.stdout, json.loads((out / "results.json").read_text())["results"]

    stdout, results = bench(tmp_path / "a", "--engine-seeds", "1", "--reference-seeds", "0")
    assert [(r["system"], r["seed"]) for r in results] == [("engine", 1), ("reference", 0)]
    for r in results:
        assert 0 < r["heldout_loss"] < 10 and r["scored_tokens"] > 100 and len(r["curve"]) == 3
        assert 0 < r["tokens"] <= 3 * 8 * 32  # non-padding tokens
    assert "engine - reference:" in stdout and (tmp_path / "a" / "loss.png").is_file()
    # The engine's batches of seed 1: the very tokens the engine run of seed 1 counted.
    _, same = bench(tmp_path / "b", "--engine-seeds", "", "--reference-seeds", "1", "--same-batches")
    assert same[0]["system"] == "reference" and same[0]["tokens"] == results[0]["tokens"]
