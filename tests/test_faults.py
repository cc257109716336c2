"""Faults injected for real: a diverging run, a disk that fills up mid-save on one rank (sync and
async), a rank that stops answering, and hostile or mutated checkpoint, config and index files.
Each ends in one line saying what and where, and loses nothing already written.

Non-finite steps on every layout's path are checked against the single process in test_zero.py
and test_pipeline.py (conftest.NAN_GRAD)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, base_overrides, clean_env, launch_world, run_cli
from rapidnlp.errors import UserError
from test_checkpoint import TINY, ok, one_error_line, rows, train_args


@pytest.mark.timeout(300)
def test_a_diverging_run_stops_with_one_line_and_saves_nothing_non_finite(pd_dataset, tmp_path):
    """fp32 at LR 1e30 after 4 good steps: the blown-up weights give non-finite losses, those
    steps are skipped (and not saved), and the third in a row stops the run in one line naming
    the step, the last finite loss and the last good checkpoint, which `latest` still points to."""
    run = tmp_path / "run"
    ok(run_cli(*train_args(pd_dataset, run, 4)))
    res = run_cli(*train_args(pd_dataset, run, 12), "--resume", "auto", "--train.lr", "1e30",
                  "--train.max_skipped_steps", "2")
    line = one_error_line(res)
    after = rows(run)[4:]
    assert [r["skipped_steps"] for r in after] == [0, 1, 2, 3], after
    assert after[0]["grad_norm"] is not None and all(r["grad_norm"] is None for r in after[1:])
    assert "step 8: 3 steps in a row had a non-finite loss or gradient (train.max_skipped_steps = 2)" in line
    assert f"last finite loss {after[0]['loss']:.4f} at step 5" in line
    assert f"last good checkpoint: {run / 'checkpoints' / 'step_4'}" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_2", "step_4"]
    assert (run / "checkpoints" / "latest").read_text() == "step_4"
    assert "step 6: no checkpoint after a skipped step" in res.stdout


# ----------------------------------------------------------------------------- save failures

SAVE_FAULTS = {  # name -> overrides; each run's disk fills up on rank 1 while saving step 4
    "sync_stop": {},
    "sync_continue": {"checkpoint.continue_on_error": True},
    "async_stop": {"checkpoint.async_save": True},
    "async_continue": {"checkpoint.async_save": True, "checkpoint.continue_on_error": True},
}


@pytest.fixture(scope="module")
def save_faults(pd_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("save_faults")
    base = {**base_overrides(tmp / "run"), "train.steps": 6, "train.eval_interval": 0, "checkpoint.interval": 2}
    runs = [{"name": name, "overrides": {**over, "train.run_dir": str(tmp / name)}, "fail_save_at": 4, "fail_rank": 1}
            for name, over in SAVE_FAULTS.items()]
    return launch_world(str(REPO / "tests" / "fault_worker.py"), 2, pd_dataset, base, runs, tmp)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_save_that_fails_on_one_rank_loses_nothing(save_faults, mode):
    """ENOSPC on rank 1 only, mid-save: the partial folder is removed, `latest` stays on step 2,
    and the run stops with one line (an async save's failure surfaces at the next save)."""
    got = save_faults[f"{mode}_stop"]
    assert got["checkpoints"] == ["latest", "step_2"] and got["latest"] == "step_2", got
    assert got["steps"] == (4 if mode == "sync" else 6)
    error = got["error"]
    assert error.startswith("step 4: saving the checkpoint failed (rank 1: [Errno 28] No space left on device"), error
    assert "\n" not in error and error.endswith("free the space (or fix the storage) and resume: --resume auto")
    assert error.split("the last checkpoint is ")[1].split(";")[0].endswith(os.path.join("checkpoints", "step_2"))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_continue_on_error_trains_on_after_a_failed_save(save_faults, mode):
    got = save_faults[f"{mode}_continue"]
    assert got["error"] is None and got["steps"] == 6
    assert got["checkpoints"] == ["latest", "step_2", "step_6"] and got["latest"] == "step_6", got


# ----------------------------------------------------------------------------- a hung rank

def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _rank_of(pid: int) -> int | None:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"]) if b"RANK" in env else None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_rank_fails_its_peers_after_the_collective_timeout(pd_dataset, tmp_path):
    """Rank 1 stops answering without dying (SIGSTOP) mid-run: rank 0 gives up after
    train.collective_timeout_s with one line naming it, and the job ends with nothing left running."""
    run = tmp_path / "run"
    args = train_args(pd_dataset, run, 500, "--train.collective_timeout_s", "10", "--checkpoint.interval", "0")
    proc = subprocess.Popen([sys.executable, "-m", "rapidnlp.cli", *args, "--nproc", "2"], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 200
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=150)
        waited = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert ours == ["error: rank 0: a collective waited more than train.collective_timeout_s = 10 s; another rank "
                    "hung or died (the launcher's report names it); the job stops, resume with --resume auto "
                    "(README: when a rank hangs)"], err[-3000:]
    assert 10 <= waited < 100, waited
    assert not any(_alive(pid) for pid in workers.values())


# ----------------------------------------------------------------------------- hostile files

@pytest.fixture(scope="module")
def checkpoint(pd_dataset, tmp_path_factory):
    """A real single-process checkpoint (2 steps of the tiny model)."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    ok(run_cli(*train_args(pd_dataset, run, 2)))
    return run / "checkpoints" / "step_2"


def _copy(checkpoint, tmp_path, edit=None):
    out = tmp_path / "step_2"
    shutil.copytree(checkpoint, out, symlinks=True)
    if edit:
        meta = json.loads((out / "meta.json").read_text())
        edit(meta, out)
        (out / "meta.json").write_text(json.dumps(meta))
    return out


def _outside(meta, out):
    meta["files"]["../../etc/passwd"] = {"bytes": 1, "crc32": 0}


def _absolute(meta, out):
    meta["files"]["/etc/passwd"] = {"bytes": 1, "crc32": 0}


def _link_out(meta, out):
    os.remove(out / "config.json")
    os.symlink("/etc/hostname", out / "config.json")


def _no_manifest(meta, out):
    del meta["files"]


def _step_text(meta, out):
    meta["step"] = "two"


def _manifest_types(meta, out):
    meta["files"]["config.json"] = {"bytes": "many", "crc32": None}


@pytest.mark.parametrize("edit, message", [
    (_outside, "the manifest names '../../etc/passwd', which leads outside the checkpoint folder; refused"),
    (_absolute, "the manifest names '/etc/passwd', which leads outside the checkpoint folder; refused"),
    (_link_out, "the manifest names 'config.json', which leads outside the checkpoint folder; refused"),
    (_no_manifest, "meta.json: no 'files' field (the manifest of files); not a complete checkpoint"),
    (_step_text, "meta.json: 'step' must be a step number, not \"two\""),
    (_manifest_types, "meta.json: files['config.json'] must be {\"bytes\": int, \"crc32\": int}"),
])
def test_hostile_checkpoints_are_refused_in_one_line(checkpoint, tmp_path, pd_dataset, edit, message):
    bad = _copy(checkpoint, tmp_path, edit)
    line = one_error_line(run_cli(*train_args(pd_dataset, tmp_path / "run", 4), "--resume", str(bad)))
    assert message in line, line


def test_a_shard_named_outside_the_folder_is_refused(checkpoint, tmp_path):
    """DCP's .metadata names the shard files; a name that leaves the folder is refused there too."""
    import pickle

    from rapidnlp.train.safe_dcp import read_metadata

    bad = _copy(checkpoint, tmp_path)
    metadata = read_metadata(str(bad))
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (bad / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UserError, match=r"names the shard file '../../elsewhere.distcp', outside the checkpoint"):
        read_metadata(str(bad))


# ----------------------------------------------------------------------------- fuzzing

JUNK = ["", "x", -1, 0, 2**70, 1e308, -0.5, True, None, [], {}, [1, "a"], {"a": 1}, "../..", "\u00e9\u4e2d", "nan"]


def _mutate_json(value, rng):
    """One random change somewhere inside a JSON value: a key dropped, or a value replaced by junk."""
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        if rng.random() < 0.2:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _mutate_json(value[key], rng) if rng.random() < 0.5 else rng.choice(JUNK)}
    if isinstance(value, list) and value:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate_json(value[i], rng)] + value[i + 1:]
    return rng.choice(JUNK)


def _one_line_or_fine(call) -> None:
    try:
        call()
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(e)


@pytest.mark.timeout(300)
def test_fuzzed_meta_json_gives_one_line_errors(checkpoint, tmp_path):
    from rapidnlp.train.checkpoint import verify

    rng = random.Random(0)
    bad = _copy(checkpoint, tmp_path)
    good = json.loads((bad / "meta.json").read_text())
    text = json.dumps(good)
    for i in range(300):
        if i % 10 == 0:  # damaged text rather than damaged values
            cut = rng.randrange(len(text))
            (bad / "meta.json").write_text(text[:cut] + rng.choice(["", "}", "\u00ff", "[" * 5000]))
        else:
            (bad / "meta.json").write_text(json.dumps(_mutate_json(good, rng)))
        _one_line_or_fine(lambda: verify(str(bad)))


@pytest.mark.timeout(300)
def test_fuzzed_configs_give_one_line_errors(tmp_path):
    from rapidnlp.config import load_config, resolve_layout

    rng = random.Random(1)
    lines = open(TINY).read().splitlines()
    path = tmp_path / "fuzzed.toml"
    for _ in range(300):
        mutated = list(lines)
        i = rng.randrange(len(mutated))
        if "=" in mutated[i] and rng.random() < 0.7:
            value = json.dumps(rng.choice(JUNK)) if rng.random() < 0.8 else rng.choice(["[", '"', "x y"])
            mutated[i] = f"{mutated[i].split('=')[0]}= {value}"
        else:
            mutated.insert(i, rng.choice(["[bogus]", "steps = 1", "[train", "model = 3", "x.y = 1", "[[train]]"]))
        path.write_text("\n".join(mutated))
        _one_line_or_fine(lambda: resolve_layout(load_config(str(path)), rng.choice([1, 2, 3, 8])))


@pytest.mark.timeout(300)
def test_fuzzed_index_headers_give_one_line_errors(pd_dataset, tmp_path):
    from rapidnlp.data.indexed import IndexedDataset

    rng = random.Random(2)
    original = open(pd_dataset + ".idx", "rb").read()
    shutil.copyfile(pd_dataset + ".bin", tmp_path / "d.bin")
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(34)] = rng.randrange(256)  # the header: magic, version, dtype, counts
        if rng.random() < 0.1:
            data = data[: rng.randrange(len(data))]
        (tmp_path / "d.idx").write_bytes(bytes(data))

        def read():
            ds = IndexedDataset(str(tmp_path / "d"))
            ds[0], ds.document(len(ds.document_indices) - 2)  # noqa: B018

        _one_line_or_fine(read)
