"""Join the ranks a launcher started: read torchrun, SLURM srun or mpirun's environment,
rendezvous, and create the default process group; end workers without interpreter teardown.

This module only bootstraps processes. It must not build device meshes or subgroups
(that is `rapidnlp.distributed.mesh`'s job), must not read the training config, and must not
import mpi4py at module level: MPI is optional and only used to agree on a rendezvous
address when mpirun gave none.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, NoReturn

from rapidnlp.errors import UserError

LAUNCHERS = ("torchrun", "slurm", "mpi", "single")

# Set by spawn_local so that a worker can tell whether its launcher already died before
# the parent-death signal was armed; other launchers leave it unset.
LAUNCHER_PID_VAR = "RAPIDNLP_LAUNCHER_PID"

# The parent as seen at import, the earliest moment we can look; compared after arming
# PR_SET_PDEATHSIG to detect a launcher that died in between.
_PPID_AT_IMPORT = os.getppid()

# Derived SLURM ports stay below Linux's ephemeral range (32768-60999) so that an outgoing
# connection on the master node cannot already hold the port.
_SLURM_PORT_BASE = 20000
_SLURM_PORT_SPAN = 10000

_MAX_NODES = 1_000_000

_ENV: DistEnv | None = None
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits among the job's ranks and where they rendezvous.

    For an mpirun job without MASTER_ADDR/MASTER_PORT, `detect_env` returns
    master_addr "" and master_port 0 (and, for MPICH-like launchers that do not export
    local ranks, local_rank/local_world_size -1): `init_distributed` resolves them over MPI.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # one of LAUNCHERS

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------- SLURM lists

_HOST_CHARS = re.compile(r"[A-Za-z0-9._-]*\Z")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?\Z")


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist ("gpu[01-04,07],login5", "n[1-2]-ib") into host names.

    Zero padding follows the lower bound of each range, as Slurm writes it.
    """
    text = nodelist.strip()
    if not text:
        raise UserError("empty SLURM node list")
    hosts: list[str] = []
    for item in _split_top_level(text, nodelist):
        hosts.extend(_expand_host(item, nodelist))
        if len(hosts) > _MAX_NODES:
            raise UserError(f"SLURM node list {nodelist!r} expands to more than {_MAX_NODES} hosts")
    return hosts


def _split_top_level(text: str, original: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise UserError(f"malformed SLURM node list {original!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"malformed SLURM node list {original!r}: ']' without '['")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise UserError(f"malformed SLURM node list {original!r}: unclosed '['")
    items.append(text[start:])
    for item in items:
        if not item:
            raise UserError(f"malformed SLURM node list {original!r}: empty host name")
    return items


def _expand_host(item: str, original: str) -> list[str]:
    # A host may carry several bracket groups ("rack[1-2]-n[01-04]"): expand their product,
    # leftmost group varying slowest, as Slurm does.
    parts = re.split(r"(\[[^\]]*\])", item)
    expansions = [""]
    for part in parts:
        if part.startswith("["):
            choices = _expand_brackets(part[1:-1], original)
        else:
            if not _HOST_CHARS.match(part):
                raise UserError(f"malformed SLURM node list {original!r}: bad host name {item!r}")
            choices = [part]
        expansions = [prefix + c for prefix in expansions for c in choices]
        if len(expansions) > _MAX_NODES:
            raise UserError(f"SLURM node list {original!r} expands to more than {_MAX_NODES} hosts")
    return expansions


def _expand_brackets(body: str, original: str) -> list[str]:
    out = []
    for piece in body.split(","):
        m = _RANGE.match(piece.strip()) if piece.strip() == piece else None
        if not m:
            raise UserError(f"malformed SLURM node list {original!r}: bad range {piece!r}")
        lo_text, hi_text = m.group(1), m.group(2)
        if hi_text is None:
            out.append(lo_text)
            continue
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise UserError(f"malformed SLURM node list {original!r}: range {piece!r} is descending")
        if hi - lo >= _MAX_NODES:
            raise UserError(f"SLURM node list {original!r} expands to more than {_MAX_NODES} hosts")
        width = len(lo_text)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def parse_slurm_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE ("2(x3),1") into one task count per node."""
    counts: list[int] = []
    for piece in spec.strip().split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", piece.strip())
        if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise UserError(f"malformed SLURM tasks-per-node {spec!r}: expected e.g. '4(x2),1'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# ---------------------------------------------------------------------------- detection

def launcher_of(environ: Mapping[str, str] = os.environ) -> str:
    """Which launcher started this process, by the variables it sets; parses nothing."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        # Checked first: torchrun inside a SLURM allocation also sees SLURM_PROCID.
        return "torchrun"
    # An sbatch script has SLURM_* but no SLURM_PROCID; only an srun step has both.
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return "slurm"
    if "OMPI_COMM_WORLD_RANK" in environ and "OMPI_COMM_WORLD_SIZE" in environ:
        return "mpi"
    if "PMI_RANK" in environ and "PMI_SIZE" in environ:
        return "mpi"
    return "single"


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read the launcher's environment into a DistEnv (torchrun > srun > mpirun > single)."""
    launcher = launcher_of(environ)
    if launcher == "torchrun":
        env = _from_torchrun(environ)
    elif launcher == "slurm":
        env = _from_slurm(environ)
    elif launcher == "mpi":
        env = _from_mpi(environ)
    else:
        env = DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single")
    _validate(env)
    return env


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def _require(environ: Mapping[str, str], names: list[str], launcher: str) -> None:
    missing = [n for n in names if n not in environ]
    if missing:
        raise UserError(f"{launcher} environment is incomplete: {', '.join(missing)} not set")


def _port(environ: Mapping[str, str], name: str = "MASTER_PORT") -> int:
    port = _int(environ, name)
    if not 1 <= port <= 65535:
        raise UserError(f"{name}={port} is not a TCP port (1-65535)")
    return port


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    names = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
    _require(environ, names, "torchrun-style (RANK/WORLD_SIZE)")
    return DistEnv(
        rank=_int(environ, "RANK"),
        world_size=_int(environ, "WORLD_SIZE"),
        local_rank=_int(environ, "LOCAL_RANK"),
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE"),
        master_addr=environ["MASTER_ADDR"].strip(),
        master_port=_port(environ),
        launcher="torchrun",
    )


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_NTASKS")
    _require(environ, ["SLURM_LOCALID"], "SLURM srun")
    local_rank = _int(environ, "SLURM_LOCALID")
    node_id = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0

    # The step's own distribution wins over the allocation's: a step may use fewer tasks.
    per_node = None
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in environ:
            per_node = parse_slurm_tasks_per_node(environ[name])
            break
    if per_node is not None:
        if node_id >= len(per_node):
            raise UserError(f"SLURM_NODEID={node_id} but tasks-per-node lists {len(per_node)} nodes")
        local_world = per_node[node_id]
    elif "SLURM_NTASKS_PER_NODE" in environ:
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE")
    else:
        raise UserError("SLURM srun environment is incomplete: neither SLURM_TASKS_PER_NODE "
                        "nor SLURM_NTASKS_PER_NODE is set")

    if "MASTER_ADDR" in environ:
        # Lets users pick the fabric interface's name (e.g. "gpu01-ib").
        master_addr = environ["MASTER_ADDR"].strip()
    else:
        # Rank 0 runs on the first node of the step (block distribution, Slurm's default).
        for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
            if name in environ:
                master_addr = parse_slurm_nodelist(environ[name])[0]
                break
        else:
            raise UserError("SLURM srun environment is incomplete: SLURM_JOB_NODELIST not set "
                            "(or set MASTER_ADDR)")

    if "MASTER_PORT" in environ:
        master_port = _port(environ)
    elif "SLURM_JOB_ID" in environ:
        master_port = slurm_port(environ["SLURM_JOB_ID"], environ.get("SLURM_STEP_ID", "0"))
    else:
        raise UserError("SLURM srun environment is incomplete: SLURM_JOB_ID not set "
                        "(or set MASTER_PORT)")
    return DistEnv(rank, world, local_rank, local_world, master_addr, master_port, "slurm")


def slurm_port(job_id: str, step_id: str = "0") -> int:
    """The rendezvous port every task of one srun step derives alike from its ids."""
    # Hashing the step id too keeps concurrent steps of one job on different ports.
    digest = hashlib.sha256(f"{job_id.strip()}.{step_id.strip()}".encode()).digest()
    return _SLURM_PORT_BASE + int.from_bytes(digest[:4], "big") % _SLURM_PORT_SPAN


def _from_mpi(environ: Mapping[str, str]) -> DistEnv:
    if "OMPI_COMM_WORLD_RANK" in environ:
        rank = _int(environ, "OMPI_COMM_WORLD_RANK")
        world = _int(environ, "OMPI_COMM_WORLD_SIZE")
        _require(environ, ["OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"], "OpenMPI")
        local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK")
        local_world = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE")
    else:
        rank = _int(environ, "PMI_RANK")
        world = _int(environ, "PMI_SIZE")
        # -1: not exported by this PMI flavour; init_distributed groups ranks by host instead.
        local_rank = local_world = -1
        for r_name, s_name in (("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
                               ("PMI_LOCAL_RANK", "PMI_LOCAL_SIZE")):
            if r_name in environ:
                local_rank = _int(environ, r_name)
                if s_name in environ:
                    local_world = _int(environ, s_name)
                break
        if local_rank >= 0 and local_world < 0:
            local_rank = -1
    if "MASTER_ADDR" in environ and "MASTER_PORT" in environ:
        addr, port = environ["MASTER_ADDR"].strip(), _port(environ)
    else:
        addr, port = "", 0
    return DistEnv(rank, world, local_rank, local_world, addr, port, "mpi")


def _validate(env: DistEnv) -> None:
    where = f"({env.launcher} environment)"
    if env.world_size < 1:
        raise UserError(f"world size {env.world_size} must be at least 1 {where}")
    if not 0 <= env.rank < env.world_size:
        raise UserError(f"rank {env.rank} is outside 0..{env.world_size - 1} {where}")
    if env.local_rank == -1 and env.local_world_size == -1 and env.launcher == "mpi":
        return
    if env.local_world_size < 1 or env.local_world_size > env.world_size:
        raise UserError(f"local world size {env.local_world_size} must be in 1..{env.world_size} {where}")
    if not 0 <= env.local_rank < env.local_world_size:
        raise UserError(f"local rank {env.local_rank} is outside 0..{env.local_world_size - 1} {where}")
    if env.launcher != "mpi" and not env.master_addr:
        raise UserError(f"empty MASTER_ADDR {where}")


def free_port() -> int:
    """A TCP port free now on this host (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- init / exit

def init_distributed(timeout_s: float = 300) -> DistEnv:
    """Create the default process group for this process's launcher and return where it sits.

    gloo on CPU, nccl with CUDA (also for a single process, so that there is one code path).
    Calling it again returns the same DistEnv.
    """
    global _ENV
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if _ENV is None:
            _ENV = _env_of_existing_group(dist)
        return _ENV

    env = detect_env()
    if env.launcher != "single":
        # Not for a lone process: a `nohup python ... &` run must outlive the shell that
        # started it.
        _die_with_parent()
    if env.launcher == "mpi" and (not env.master_addr or env.local_rank < 0):
        env = _resolve_over_mpi(env)

    os.environ.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })
    if torch.cuda.is_available():
        # Before the process group exists, so that NCCL binds this rank to its own GPU.
        torch.cuda.set_device(_device_index(env, torch.cuda.device_count()))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    _ENV = env
    return env


def _device_index(env: DistEnv, visible: int) -> int:
    """The CUDA device of this rank among the devices visible to it."""
    if visible >= env.local_world_size:
        return env.local_rank
    if visible == 1:
        # The launcher bound one GPU per task (srun --gpus-per-task=1, --gpu-bind):
        # CUDA_VISIBLE_DEVICES differs per task and device 0 is this task's own.
        return 0
    raise UserError(f"{env.local_world_size} processes on this node but {visible} GPUs "
                    f"visible: start at most {visible} processes per node")


def _env_of_existing_group(dist) -> DistEnv:
    # Someone else created the group; report it as they did, falling back to env vars.
    launcher = launcher_of()
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(os.environ.get("MASTER_PORT", "0")),
        launcher=launcher,
    )


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        # torchrun's agent starts workers in new sessions: killing the launcher's process
        # group would otherwise leave them running, holding GPUs and ports.
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            _log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return
    except (OSError, AttributeError) as exc:
        _log.warning("cannot arm PR_SET_PDEATHSIG: %s", exc)
        return
    # The launcher may have died before the signal was armed; then no signal will come.
    # Not "ppid == 1": a launcher that is a container's PID 1 is alive and well. Popped so
    # that processes this worker starts do not compare against our launcher.
    expected = os.environ.pop(LAUNCHER_PID_VAR, "")
    expected_pid = int(expected) if expected.isdigit() else _PPID_AT_IMPORT
    if os.getppid() != expected_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _resolve_over_mpi(env: DistEnv) -> DistEnv:
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("mpirun gave no rendezvous address: `pip install rapidnlp[mpi]` "
                        "or set MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != env.world_size or comm.Get_rank() != env.rank:
        # mpi4py linked against another MPI than the launcher's runs as a singleton.
        raise UserError(
            f"mpi4py's MPI ({MPI.Get_library_version().splitlines()[0].strip()}) sees rank "
            f"{comm.Get_rank()} of {comm.Get_size()}, the launcher says {env.rank} of "
            f"{env.world_size}: use that MPI's own mpirun, or set MASTER_ADDR and MASTER_PORT")
    host = socket.gethostname()
    hosts = comm.allgather(host)
    if env.master_addr:
        addr, port = env.master_addr, env.master_port
    else:
        if env.rank == 0:
            addr = "127.0.0.1" if len(set(hosts)) == 1 else host
            port = free_port()
        else:
            addr, port = None, None
        addr, port = comm.bcast((addr, port), root=0)
    local_rank, local_world = env.local_rank, env.local_world_size
    if local_rank < 0:
        local_rank = hosts[: env.rank].count(host)
        local_world = hosts.count(host)
    # MPI only bootstraps; finalizing now lets workers end with os._exit (OpenMPI fails a
    # job whose ranks exit without MPI_Finalize) and still fails the job on a crash.
    MPI.Finalize()
    resolved = DistEnv(env.rank, env.world_size, local_rank, local_world, addr, port, "mpi")
    _validate(resolved)
    return resolved


def is_timeout(error: BaseException) -> bool:
    """Whether `error` is a collective that gave up waiting (gloo: "Timed out waiting ...ms";
    nccl's watchdog: "Watchdog caught collective operation timeout")."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("Timed out waiting" in text or "operation timeout" in text)


def shutdown(code: int = 0) -> NoReturn:
    """End this worker now: flush output, destroy the process group, `os._exit(code)`.

    Workers never reach normal interpreter exit: torch 2.13 + gloo aborts about 3% of
    jobs in Py_FinalizeEx. atexit handlers do not run.
    """
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    try:
        logging.shutdown()
    except Exception:
        pass
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        # The exit code must be the caller's, whatever teardown does.
        pass
    os._exit(code)
