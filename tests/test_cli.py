"""The `rapidnlp` command as a user runs it: a short real training run, and bad input that gets
one clear line and a non-zero exit, leaving nothing half-written."""
import json
import os

import pytest

from conftest import REPO, run_cli

TINY = str(REPO / "configs" / "tiny.toml")
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "peak_mem_bytes"}


def one_error_line(res) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretrain_two_processes_writes_metrics(pd_dataset, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli("pretrain", "--config", TINY, "--nproc", "2", "--parallel.tp", "2",
                  "--data.path", pd_dataset, "--train.steps", "4", "--train.eval_interval", "2",
                  "--train.log_interval", "1", "--train.run_dir", str(run_dir), "--data.val_fraction", "0.05")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert METRIC_KEYS <= set(r)
        assert r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0 and 0 < r["mfu"] < 1
        assert r["peak_mem_bytes"] > 10_000_000
    assert "val_loss" in rows[1] and "val_loss" in rows[3] and "val_loss" not in rows[0]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["parallel"]["tp"] == 2 and config["model"]["vocab_size"] == 1000
    assert "step 4/4" in res.stdout and "metrics.jsonl" in res.stdout


def test_params_lists_every_config():
    res = run_cli("params")
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[1:]}
    assert list(rows) == ["1.5b", "1.5b_knowledge", "300m", "300m_knowledge", "base", "tiny"]
    assert 1.4e9 < int(rows["1.5b"][5].replace(",", "")) < 1.6e9
    assert int(rows["1.5b"][7].replace(",", "")) == 0  # no objective modules besides the MLM head
    # a 10^7 x 1600 entity table, plus relation tables and heads
    assert 1.6e10 < int(rows["1.5b_knowledge"][7].replace(",", "")) < 1.61e10


def test_missing_corpus(tmp_path):
    line = one_error_line(run_cli("prepare", "--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "d")))
    assert "nope.txt" in line
    assert not list(tmp_path.glob("d*"))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    line = one_error_line(run_cli("prepare", "--input", str(tmp_path / "empty.txt"), "--output", str(tmp_path / "d")))
    assert "empty" in line
    assert not list(tmp_path.glob("d.*"))


def _corpus_with_bad_line(path):
    good = "今天天气很好，我们去公园散步。北京是中国的首都。\n" * 200
    path.write_bytes(good.encode() + b"\xff\xfe broken line\n" + good.encode())


def test_non_utf8_line_is_skipped_and_reported(tmp_path):
    _corpus_with_bad_line(tmp_path / "c.txt")
    res = run_cli("prepare", "--input", str(tmp_path / "c.txt"), "--output", str(tmp_path / "d"), "--vocab-size", "300")
    assert res.returncode == 0, res.stderr
    assert "201" in res.stdout + res.stderr  # the bad line's number
    assert "1 lines skipped" in res.stdout
    assert (tmp_path / "d.bin").exists() and (tmp_path / "d.idx").exists() and (tmp_path / "d.model").exists()


def test_non_utf8_line_is_fatal_with_strict_flag(tmp_path):
    _corpus_with_bad_line(tmp_path / "c.txt")
    line = one_error_line(run_cli("prepare", "--input", str(tmp_path / "c.txt"), "--output", str(tmp_path / "d"),
                                  "--vocab-size", "300", "--strict-utf8"))
    assert "c.txt:201" in line
    assert not list(tmp_path.glob("d.*")), "no half-written dataset"


def test_unknown_config_key(pd_dataset):
    line = one_error_line(run_cli("pretrain", "--config", TINY, "--data.path", pd_dataset, "--train.stpes", "3"))
    assert "did you mean 'train.steps'" in line


def test_impossible_layout(pd_dataset):
    line = one_error_line(run_cli("pretrain", "--config", TINY, "--nproc", "4", "--parallel.tp", "3",
                                  "--data.path", pd_dataset))
    assert "parallel.tp (3)" in line


def test_missing_dataset(tmp_path):
    line = one_error_line(run_cli("pretrain", "--config", TINY, "--data.path", str(tmp_path / "none")))
    assert "none.bin" in line and "rapidnlp prepare" in line
