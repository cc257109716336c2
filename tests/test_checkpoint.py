"""Checkpoints: exact resume after kill -9, resume across layouts, SIGTERM save-and-exit,
atomic saves, and bad checkpoints refused with one clear line (never unpickling code)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, clean_env, run_cli

TINY = str(REPO / "configs" / "tiny.toml")


def train_args(data, run_dir, steps=8, *extra):
    return ["pretrain", "--config", TINY, "--data.path", data, "--train.run_dir", str(run_dir),
            "--train.steps", str(steps), "--train.eval_interval", "0", "--data.seq_len", "64",
            "--train.global_batch", "8", "--train.micro_batch", "2", "--checkpoint.interval", "2", *extra]


def losses(run_dir) -> dict[int, float]:
    """step -> loss of the last row written for that step (a resumed run rewrites some)."""
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ok(res):
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def one_error_line(res) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def reference(pd_dataset, tmp_path_factory):
    """An uninterrupted 2-process (dp=2, fsdp) run of 8 steps, checkpoints every 2."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    ok(run_cli(*train_args(pd_dataset, run_dir), "--nproc", "2"))
    return run_dir


def test_keeps_the_last_three(reference):
    ckpts = reference / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_4", "step_6", "step_8"]
    assert (ckpts / "latest").read_text() == "step_8"
    meta = json.loads((ckpts / "step_8" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["consumed_tokens"] == 8 * 8 * 64
    assert meta["layout"] == {"pp": 1, "dp": 2, "tp": 1, "zero": 3, "hsdp_shard": 0, "world_size": 2}
    assert {"config.json", "tokenizer.model", ".metadata", "rng/rank_0.json", "rng/rank_1.json"} <= set(meta["files"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_exact_resume_after_kill_9(pd_dataset, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "rapidnlp.cli", *train_args(pd_dataset, run_dir), "--nproc", "2"],
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 200
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(rows(run_dir))
    assert killed_at < 8

    ok(run_cli(*train_args(pd_dataset, run_dir), "--nproc", "2", "--resume", "auto"))
    after = rows(run_dir)
    assert after[:killed_at] == rows(run_dir)[:killed_at]  # appended, never truncated
    resumed = [r for r in after if "resumed_from" in r]
    assert len(resumed) == 1
    start = resumed[0]["resumed_from"]
    assert start in (2, 4, 6) and resumed[0]["step"] == start + 1
    continued = {r["step"]: r["loss"] for r in after[after.index(resumed[0]):]}
    ref = losses(reference)
    assert continued == {s: ref[s] for s in range(start + 1, 9)}  # bit for bit


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_async_save_resumes_exactly(pd_dataset, reference, tmp_path):
    """checkpoint.async_save: the same checkpoints (a background thread writes them while training
    goes on), and resuming from one continues bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run_cli(*train_args(pd_dataset, a), "--nproc", "2", "--checkpoint.async_save", "true"))
    assert losses(a) == losses(reference)
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["latest", "step_4", "step_6", "step_8"]
    meta = json.loads((a / "checkpoints" / "step_4" / "meta.json").read_text())
    assert meta["step"] == 4 and {".metadata", "rng/rank_1.json"} <= set(meta["files"])
    ok(run_cli(*train_args(pd_dataset, b), "--nproc", "2", "--checkpoint.async_save", "true",
               "--resume", str(a / "checkpoints" / "step_4")))
    ref = losses(reference)
    assert losses(b) == {s: ref[s] for s in range(5, 9)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_written_before_zero_alone_still_resumes(pd_dataset, reference, tmp_path):
    """A checkpoint whose layout and config say parallel.dp_mode (before parallel.zero was the one
    knob) loads, and at its own layout resumes bit for bit (its RNG states count)."""
    import shutil

    from rapidnlp.train.checkpoint import manifest

    old = tmp_path / "old" / "step_4"
    shutil.copytree(reference / "checkpoints" / "step_4", old)
    meta = json.loads((old / "meta.json").read_text())
    meta["layout"]["dp_mode"] = "fsdp"
    config = json.loads((old / "config.json").read_text())
    config["parallel"]["dp_mode"] = "fsdp"
    config["parallel"]["pp_split"] = ""  # a string then
    config.pop("objectives")
    (old / "config.json").write_text(json.dumps(config))
    meta["files"] = manifest(str(old))
    (old / "meta.json").write_text(json.dumps(meta))
    ok(run_cli("ckpt", "info", str(old)))
    run_dir = tmp_path / "run"
    ok(run_cli(*train_args(pd_dataset, run_dir), "--nproc", "2", "--resume", str(old)))
    ref = losses(reference)
    assert losses(run_dir) == {s: ref[s] for s in range(5, 9)}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc, layout", [
    ("1", []),                                  # dp=2 fsdp -> single process
    ("2", ["--parallel.zero", "0"]),          # fsdp -> ddp
    ("2", ["--parallel.tp", "2"]),              # dp=2 -> tp=2
    ("2", ["--parallel.pp", "2"]),              # dp=2 -> pp=2
    ("2", ["--parallel.zero", "1"]),            # fsdp -> ZeRO-1
])
def test_resume_across_layouts(pd_dataset, reference, tmp_path, nproc, layout):
    run_dir = tmp_path / "run"
    step4 = reference / "checkpoints" / "step_4"
    ok(run_cli(*train_args(pd_dataset, run_dir), "--nproc", nproc, *layout, "--resume", str(step4)))
    got, ref = losses(run_dir), losses(reference)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=0)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [
    ["--parallel.pp", "2"],                                           # 1f1b, stages on two ranks
    ["--parallel.pp", "2", "--parallel.pp_schedule", "zbv", "--parallel.pp_virtual_stages", "2",
     "--parallel.zero", "2"],                                         # V: first and last stage on one rank
    ["--parallel.zero", "1"],                                         # ZeroRedundancyOptimizer partitions
], ids=["pp2", "pp2_zbv", "zero1"])
def test_resume_pipeline_and_zero1(pd_dataset, tmp_path, layout):
    """Same layout: bit for bit; then pp = 1 (or ZeRO-1 -> plain), single process: within 1e-4."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ok(run_cli(*train_args(pd_dataset, a, 6), "--nproc", "2", *layout))
    ok(run_cli(*train_args(pd_dataset, b, 6), "--nproc", "2", *layout, "--resume", str(a / "checkpoints" / "step_2")))
    ref = losses(a)
    assert losses(b) == {s: ref[s] for s in range(3, 7)}
    ok(run_cli(*train_args(pd_dataset, c, 6), "--resume", str(a / "checkpoints" / "step_4")))
    got = losses(c)
    assert sorted(got) == [5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_tp2_to_single(pd_dataset, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run_cli(*train_args(pd_dataset, a, 6), "--nproc", "2", "--parallel.tp", "2"))
    ok(run_cli(*train_args(pd_dataset, b, 6), "--resume", str(a / "checkpoints" / "step_2")))
    got, ref = losses(b), losses(a)
    assert sorted(got) == [3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_saves_and_exits_zero(pd_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rapidnlp.cli", *train_args(pd_dataset, run_dir, 10_000), "--nproc", "2",
         "--checkpoint.interval", "0"],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 200
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both workers
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last = rows(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{last}"
    meta = json.loads((run_dir / "checkpoints" / f"step_{last}" / "meta.json").read_text())
    assert meta["step"] == last and meta["consumed_samples"] == 8 * last


def test_corrupt_inputs(pd_dataset, reference, tmp_path):
    import shutil

    base = tmp_path / "c"
    shutil.copytree(reference / "checkpoints" / "step_8", base)

    def resume(path):
        return run_cli(*train_args(pd_dataset, tmp_path / "r", 10), "--resume", str(path))

    shard = next(p for p in sorted(base.iterdir()) if p.suffix == ".distcp")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    line = one_error_line(resume(base))
    assert shard.name in line and "truncated" in line

    shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    line = one_error_line(resume(base))
    assert shard.name in line and "corrupted" in line
    shard.write_bytes(data)

    line = one_error_line(run_cli(*train_args(pd_dataset, tmp_path / "r", 10), "--model.hidden_size", "64",
                                  "--resume", str(base)))
    assert "does not fit this model" in line and "(1024, 128)" in line and "(1024, 64)" in line

    line = one_error_line(resume(tmp_path))
    assert "not a checkpoint" in line
    (tmp_path / "x" / "checkpoints").mkdir(parents=True)
    (tmp_path / "x" / "checkpoints" / "latest").write_text("step_99")
    line = one_error_line(resume(tmp_path / "x"))
    assert "step_99" in line and "does not exist" in line
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # nothing trained on a bad checkpoint


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rapidnlp_pwned",))


def test_malicious_metadata_pickle_is_refused(reference, tmp_path):
    import shutil

    from rapidnlp.errors import UserError
    from rapidnlp.train.safe_dcp import read_metadata

    base = tmp_path / "c"
    shutil.copytree(reference / "checkpoints" / "step_8", base)
    assert read_metadata(str(base)).state_dict_metadata  # the genuine metadata loads
    (base / ".metadata").write_bytes(pickle.dumps(Exploit()))
    if os.path.exists("/tmp/rapidnlp_pwned"):
        os.remove("/tmp/rapidnlp_pwned")
    with pytest.raises(UserError, match="refused to load 'posix.system'"):
        read_metadata(str(base))
    assert not os.path.exists("/tmp/rapidnlp_pwned")


CRASH_IN_SAVE = r"""
import os, sys
import rapidnlp.train.checkpoint as ck
real_save = ck.dcp.save
def save_then_die(*a, **k):
    real_save(*a, **k)
    if "step_4" in str(k["storage_writer"].path):
        os._exit(9)  # killed after the shards are written, before the rename
ck.dcp.save = save_then_die
from rapidnlp.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_save_killed_midway_keeps_previous(pd_dataset, tmp_path):
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", CRASH_IN_SAVE, *train_args(pd_dataset, run_dir, 6)],
                         env=clean_env(), capture_output=True, text=True, timeout=200)
    assert res.returncode == 9, res.stderr
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_2"
    assert (ckpts / "step_4.tmp").is_dir() and not (ckpts / "step_4").exists()
    ok(run_cli(*train_args(pd_dataset, run_dir, 6), "--resume", "auto"))
    assert [r for r in rows(run_dir) if "resumed_from" in r][0]["resumed_from"] == 2
    assert (ckpts / "latest").read_text() == "step_6" and not (ckpts / "step_4.tmp").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_older_than_its_settings_resumes_under_the_old_ones(pd_dataset, tmp_path):
    """A checkpoint whose config.json predates model.norm_position, data.dynamic_mask,
    data.cross_documents and train.fused_adamw was trained pre-LN with static masks: it resumes
    so, bit for bit, although configs/tiny.toml now says post-LN and dynamic masks."""
    import shutil

    from rapidnlp.train.checkpoint import manifest

    ref = tmp_path / "ref"
    ok(run_cli(*train_args(pd_dataset, ref, 6), "--model.norm_position", "pre", "--data.dynamic_mask", "false"))
    run = tmp_path / "run"
    shutil.copytree(ref / "checkpoints" / "step_4", run / "checkpoints" / "step_4")
    (run / "checkpoints" / "latest").write_text("step_4")
    old = run / "checkpoints" / "step_4"
    config = json.loads((old / "config.json").read_text())
    for section, key in (("model", "norm_position"), ("data", "dynamic_mask"), ("data", "cross_documents"),
                         ("train", "fused_adamw")):
        del config[section][key]
    (old / "config.json").write_text(json.dumps(config))
    meta = json.loads((old / "meta.json").read_text())
    meta["files"] = manifest(str(old))
    (old / "meta.json").write_text(json.dumps(meta))
    res = ok(run_cli(*train_args(pd_dataset, run, 6), "--resume", "auto"))
    assert "model.norm_position = 'pre' as the checkpoint was trained" in res.stdout
    assert "data.dynamic_mask = False as the checkpoint was trained" in res.stdout
    assert losses(run) == {s: losses(ref)[s] for s in (5, 6)}
    # A new run of the same config trains post-LN with dynamic masks: another curve.
    new = tmp_path / "new"
    ok(run_cli(*train_args(pd_dataset, new, 6)))
    assert losses(new)[6] != losses(ref)[6]
