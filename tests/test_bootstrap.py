"""detect_env and the SLURM list parsers, on the environments each launcher really sets."""
import sys

import pytest

from rapidnlp.distributed import bootstrap
from rapidnlp.distributed.bootstrap import (
    DistEnv,
    detect_env,
    launcher_of,
    parse_slurm_nodelist,
    parse_slurm_tasks_per_node,
    slurm_port,
)
from rapidnlp.distributed.launch import under_launcher
from rapidnlp.errors import UserError

# ---------------------------------------------------------------- nodelist


@pytest.mark.parametrize("text, hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("node[001-002],login5", ["node001", "node002", "login5"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("n[7]", ["n7"]),
    ("gpu[1-2],cpu[10-11]", ["gpu1", "gpu2", "cpu10", "cpu11"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a.b_c-d[3,1]", ["a.b_c-d3", "a.b_c-d1"]),
    ("  gpu[01-02]\n", ["gpu01", "gpu02"]),
    ("[1-2]", ["1", "2"]),
])
def test_nodelist_forms(text, hosts):
    assert parse_slurm_nodelist(text) == hosts


@pytest.mark.parametrize("text", [
    "", "   ", "gpu[", "gpu]", "gpu[1-2", "gpu1-2]", "gpu[]", "gpu[a-b]", "gpu[4-2]",
    "gpu[1-2-3]", "gpu[1,,2]", "gpu[1, 2]", "a,,b", ",a", "a,", "gpu[1[2]]", "gpu 01",
    "gpu[1-3:2]", "gpu[-1]", "gpu[0-99999999]",
])
def test_nodelist_malformed(text):
    with pytest.raises(UserError, match="SLURM node list"):
        parse_slurm_nodelist(text)


@pytest.mark.parametrize("text, counts", [
    ("4", [4]),
    ("4(x2)", [4, 4]),
    ("2(x3),1", [2, 2, 2, 1]),
    ("1,3(x2)", [1, 3, 3]),
])
def test_tasks_per_node(text, counts):
    assert parse_slurm_tasks_per_node(text) == counts


@pytest.mark.parametrize("text", ["", "x", "2(x)", "2(3)", "0", "2(x0)", "2,,1", "4x2"])
def test_tasks_per_node_malformed(text):
    with pytest.raises(UserError, match="tasks-per-node"):
        parse_slurm_tasks_per_node(text)


# ---------------------------------------------------------------- environments

TORCHRUN = {
    "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "node01", "MASTER_PORT": "29500", "GROUP_RANK": "1",
    "TORCHELASTIC_RUN_ID": "none",
}

# A task of `srun -N 4 -n 7` in an allocation of 4 nodes: 2(x3),1 tasks per node.
SRUN = {
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "6", "SLURM_NTASKS": "7",
    "SLURM_LOCALID": "0", "SLURM_NODEID": "3", "SLURM_TASKS_PER_NODE": "2(x3),1",
    "SLURM_JOB_NODELIST": "gpu[01-03],gpu07", "SLURM_NNODES": "4",
}

# What the batch script of `sbatch -N 2 --ntasks-per-node 4` sees, before any srun.
SBATCH = {
    "SLURM_JOB_ID": "99", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NODEID": "0",
    "SLURM_LOCALID": "0", "SLURM_NNODES": "2",
}

OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "PMIX_RANK": "3",
}

HYDRA = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}


def test_torchrun():
    assert detect_env(TORCHRUN) == DistEnv(5, 8, 1, 4, "node01", 29500, "torchrun")


def test_torchrun_missing_variable_is_one_line():
    env = dict(TORCHRUN)
    del env["MASTER_PORT"], env["LOCAL_RANK"]
    with pytest.raises(UserError, match="LOCAL_RANK, MASTER_PORT not set") as info:
        detect_env(env)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key, value, match", [
    ("RANK", "eight", "RANK='eight' is not an integer"),
    ("RANK", "8", "rank 8 is outside 0..7"),
    ("LOCAL_RANK", "4", "local rank 4 is outside 0..3"),
    ("WORLD_SIZE", "0", "world size 0"),
    ("MASTER_PORT", "70000", "MASTER_PORT=70000 is not a TCP port"),
    ("MASTER_ADDR", " ", "empty MASTER_ADDR"),
])
def test_torchrun_bad_values(key, value, match):
    with pytest.raises(UserError, match=match):
        detect_env({**TORCHRUN, key: value})


def test_srun_compressed_nodelist_and_tasks_per_node():
    env = detect_env(SRUN)
    assert env == DistEnv(6, 7, 0, 1, "gpu01", slurm_port("123456", "0"), "slurm")
    # Node 1 of "2(x3),1" holds two tasks.
    env = detect_env({**SRUN, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"})
    assert (env.rank, env.local_rank, env.local_world_size) == (3, 1, 2)


def test_srun_port_is_deterministic_high_and_per_step():
    port = detect_env(SRUN).master_port
    assert port == detect_env({**SRUN, "SLURM_PROCID": "0", "SLURM_NODEID": "0"}).master_port
    assert 20000 <= port < 30000
    assert slurm_port("123456", "1") != port
    assert len({slurm_port(str(j)) for j in range(1000, 1100)}) > 90


def test_srun_overrides_and_fallbacks():
    env = detect_env({**SRUN, "MASTER_PORT": "31000", "MASTER_ADDR": "gpu01-ib"})
    assert (env.master_addr, env.master_port) == ("gpu01-ib", 31000)
    no_job = {k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"}
    assert detect_env({**no_job, "SLURM_NODELIST": "n[5-6]"}).master_addr == "n5"
    # The step's node list wins over the allocation's: rank 0 runs on the step's first node.
    assert detect_env({**SRUN, "SLURM_STEP_NODELIST": "gpu07"}).master_addr == "gpu07"
    # The step's distribution wins over the allocation's.
    env = detect_env({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "1(x3),4", "SLURM_LOCALID": "3"})
    assert env.local_world_size == 4
    plain = {k: v for k, v in SRUN.items() if k != "SLURM_TASKS_PER_NODE"}
    assert detect_env({**plain, "SLURM_NTASKS_PER_NODE": "1"}).local_world_size == 1


@pytest.mark.parametrize("drop, match", [
    ("SLURM_JOB_NODELIST", "SLURM_JOB_NODELIST not set"),
    ("SLURM_JOB_ID", "SLURM_JOB_ID not set"),
    ("SLURM_LOCALID", "SLURM_LOCALID not set"),
    ("SLURM_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
])
def test_srun_incomplete(drop, match):
    with pytest.raises(UserError, match=match):
        detect_env({k: v for k, v in SRUN.items() if k != drop})


def test_srun_malformed_nodelist():
    with pytest.raises(UserError, match="malformed SLURM node list"):
        detect_env({**SRUN, "SLURM_JOB_NODELIST": "gpu[01-03"})


def test_torchrun_inside_slurm_allocation_is_torchrun():
    # srun -N 2 --ntasks-per-node 1 torchrun --nproc_per_node 4 ...: the workers see both.
    env = detect_env({**SRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", **TORCHRUN})
    assert env == DistEnv(5, 8, 1, 4, "node01", 29500, "torchrun")


def test_sbatch_script_without_srun_is_single():
    assert launcher_of(SBATCH) == "single"
    env = detect_env(SBATCH)
    assert (env.rank, env.world_size, env.launcher, env.master_addr) == (0, 1, "single", "127.0.0.1")
    assert not under_launcher(SBATCH)


def test_openmpi():
    assert detect_env(OPENMPI) == DistEnv(3, 4, 1, 2, "", 0, "mpi")
    env = detect_env({**OPENMPI, "MASTER_ADDR": "n1", "MASTER_PORT": "29400"})
    assert (env.master_addr, env.master_port) == ("n1", 29400)


def test_pmi_hydra_and_pmi_local_rank():
    assert detect_env(HYDRA) == DistEnv(2, 4, 0, 2, "", 0, "mpi")
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_LOCAL_RANK": "1", "PMI_LOCAL_SIZE": "2"}
    assert detect_env(env) == DistEnv(1, 2, 1, 2, "", 0, "mpi")
    # Without local variables init_distributed groups ranks by host name over MPI.
    assert detect_env({"PMI_RANK": "1", "PMI_SIZE": "2"}).local_rank == -1


def test_precedence_slurm_over_mpi():
    # srun --mpi=pmi2 exports PMI_RANK too; SLURM's own variables are the richer ones.
    env = detect_env({**SRUN, **HYDRA})
    assert env.launcher == "slurm" and env.rank == 6


def test_single():
    env = detect_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert env.launcher == "single" and env.master_addr == "127.0.0.1"
    assert 0 < env.master_port < 65536
    assert not under_launcher({})


@pytest.mark.parametrize("environ", [TORCHRUN, SRUN, OPENMPI, HYDRA])
def test_under_launcher(environ):
    assert under_launcher(environ)


def test_mpi_without_mpi4py_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `from mpi4py import MPI` fail
    with pytest.raises(UserError, match=r"pip install rapidnlp\[mpi\].*MASTER_ADDR"):
        bootstrap._resolve_over_mpi(detect_env(OPENMPI))


@pytest.mark.parametrize("local_rank, local_world, visible, device", [
    (3, 4, 8, 3),   # all GPUs visible to every rank
    (3, 4, 4, 3),
    (3, 4, 1, 0),   # one GPU bound per task by the launcher
])
def test_device_index(local_rank, local_world, visible, device):
    env = DistEnv(local_rank, local_world, local_rank, local_world, "h", 1, "torchrun")
    assert bootstrap._device_index(env, visible) == device


def test_too_many_ranks_for_the_gpus_is_a_user_error():
    env = DistEnv(5, 8, 5, 8, "h", 1, "torchrun")
    with pytest.raises(UserError, match="8 processes on this node but 4 GPUs visible"):
        bootstrap._device_index(env, 4)
