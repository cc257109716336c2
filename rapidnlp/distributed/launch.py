"""Start N local worker processes, as `rapidnlp pretrain --nproc N` does outside any launcher.

The workers get torchrun's environment contract (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so `init_distributed` treats them like
torchrun's. This module must not parse the training config or touch torch.distributed:
it only starts, watches and stops processes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Mapping

from rapidnlp.distributed.bootstrap import LAUNCHER_PID_VAR, free_port, launcher_of
from rapidnlp.errors import UserError

_POLL_S = 0.05


def under_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """True when torchrun, srun or mpirun started this process (then do not spawn_local)."""
    return launcher_of(environ) != "single"


def spawn_local(
    nproc: int,
    argv: list[str],
    *,
    module: str = "rapidnlp.cli",
    script: str | None = None,
    env: dict | None = None,
    grace_s: float = 10.0,
) -> int:
    """Run `python -m <module> <argv>` (or `python <script> <argv>`) as `nproc` ranks on
    this machine and wait for them.

    `argv` is passed to every worker unchanged, so the caller must strip `--nproc` from it
    (a worker seeing it would spawn again). `env` holds variables added to this process's
    environment. OMP_NUM_THREADS defaults to cpu_count // nproc (at least 1).

    The workers stay in this process's process group: killing that group kills them all.
    SIGINT/SIGTERM are forwarded to the workers (a second one kills them). When a worker
    fails, the others get SIGTERM, then SIGKILL after `grace_s`.

    Returns 0 when every worker succeeded, else the first failure's exit code (128 + N
    for a worker killed by signal N).
    """
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: need at least 1 process")
    if "--nproc" in argv or any(a.startswith("--nproc=") for a in argv):
        raise ValueError("spawn_local: strip --nproc from argv before calling it")

    base = dict(os.environ)
    if env:
        base.update({k: str(v) for k, v in env.items()})
    if "OMP_NUM_THREADS" not in base:
        base["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // nproc))
    port = free_port()
    entry = [script] if script is not None else ["-m", module]

    workers: list[subprocess.Popen] = []
    signals_seen = []

    def forward(signum, _frame):
        signals_seen.append(signum)
        # A second signal means the user is out of patience with a graceful stop.
        sig = signum if len(signals_seen) == 1 else signal.SIGKILL
        _signal_all(workers, sig)

    previous = _install_handlers(forward)
    try:
        for rank in range(nproc):
            worker_env = dict(base)
            worker_env.update({
                "RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                LAUNCHER_PID_VAR: str(os.getpid()),
            })
            # No start_new_session: the workers must die with this process group.
            workers.append(subprocess.Popen([sys.executable, *entry, *argv], env=worker_env))
        return _watch(workers, grace_s)
    finally:
        # Whatever brought us here (an exception, a failed Popen), leave no worker behind.
        _stop(workers, grace_s)
        _restore_handlers(previous)


def _watch(workers: list[subprocess.Popen], grace_s: float) -> int:
    while True:
        running = False
        for p in workers:
            code = p.poll()
            if code is None:
                running = True
            elif code != 0:
                _stop(workers, grace_s)
                return _exit_status(code)
        if not running:
            return 0
        time.sleep(_POLL_S)


def _stop(workers: list[subprocess.Popen], grace_s: float) -> None:
    _signal_all(workers, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in workers) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    _signal_all(workers, signal.SIGKILL)
    for p in workers:
        p.wait()


def _signal_all(workers: list[subprocess.Popen], sig: int) -> None:
    for p in workers:
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass


def _exit_status(code: int) -> int:
    # Popen reports death by signal N as -N; shells and schedulers expect 128 + N.
    return 128 - code if code < 0 else code


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset and cgroup cpusets
    except AttributeError:
        return os.cpu_count() or 1


def _install_handlers(handler):
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal.signal only works in the main thread; the caller's handlers stay
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_handlers(previous) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
