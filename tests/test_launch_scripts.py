"""The launch scripts: their dry runs print the commands they would run, and scripts/pretrain.sh
really trains through torchrun."""
import json
import subprocess

import pytest

from conftest import REPO, clean_env
from rapidnlp.distributed.bootstrap import free_port


def dry_run(script, *args, **env):
    res = subprocess.run(["bash", str(REPO / script), *args], env=clean_env(DRY_RUN="1", **env),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_torchrun_script_single_and_multi_node():
    single = dry_run("scripts/pretrain.sh", "--train.steps", "5")
    assert single.startswith("torchrun --nnodes 1 --node_rank 0 --nproc_per_node 1 ")
    assert "--master_addr 127.0.0.1 --master_port 29500" in single
    assert single.endswith("-m rapidnlp.cli pretrain --config configs/base.toml --resume auto --train.steps 5")
    multi = dry_run("scripts/pretrain.sh", NNODES="4", NODE_RANK="2", MASTER_ADDR="gpu01", MASTER_PORT="1234",
                    NPROC_PER_NODE="8", CONFIG="configs/1.5b.toml")
    assert multi.startswith("torchrun --nnodes 4 --node_rank 2 --nproc_per_node 8 --master_addr gpu01 --master_port 1234")
    assert "--config configs/1.5b.toml" in multi


def test_sbatch_script():
    text = (REPO / "scripts/slurm/pretrain.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --gpus-per-task=1" in text and "--signal=B:USR1@" in text
    cmd = dry_run("scripts/slurm/pretrain.sbatch", "--parallel.tp", "8")
    assert cmd == ("srun --kill-on-bad-exit=1 --cpu-bind=none python -m rapidnlp.cli pretrain "
                   "--config configs/1.5b.toml --resume auto --parallel.tp 8")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_script_trains_and_resumes(pd_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--data.path", pd_dataset, "--train.run_dir", str(run_dir), "--train.eval_interval", "0",
            "--data.seq_len", "64", "--train.global_batch", "8", "--train.micro_batch", "2"]
    env = clean_env(NPROC_PER_NODE="2", CONFIG="configs/tiny.toml", MASTER_PORT=str(free_port()))
    for steps in ("2", "3"):  # the second launch resumes (--resume auto) and does step 3 only
        res = subprocess.run(["bash", str(REPO / "scripts/pretrain.sh"), *args, "--train.steps", steps],
                             env=env, capture_output=True, text=True, timeout=250, cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["resumed_from"] == 2


def test_bench_scaling_sbatch_dry_run():
    """The 8 -> 64 A100 sweep: per model and size, the planner at that GPU count and weak-scaled
    batch, then one srun step on the first N nodes for the planned layout and for pure FSDP, each
    with the job's thread count; one report per model, then the merge."""
    text = (REPO / "scripts/slurm/bench_scaling.sbatch").read_text()
    assert "#SBATCH --nodes=8" in text and "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-task=1" in text
    lines = dry_run("scripts/slurm/bench_scaling.sbatch", OUT="out", SLURM_CPUS_PER_TASK="6").splitlines()
    assert len(lines) == 2 * (4 * 3 + 1) + 1
    assert all(line.startswith("OMP_NUM_THREADS=6 ") for line in lines)
    i = 0
    for model in ("300m", "1.5b"):
        for nodes in (1, 2, 4, 8):
            gpus, batch = 8 * nodes, 128 * nodes
            plan = f"out/{model}/plan_w{gpus}.toml"
            assert lines[i] == (f"OMP_NUM_THREADS=6 python -m rapidnlp.cli plan --config configs/{model}.toml --gpus {gpus} "
                                f"--gpu a100-80g --gpus-per-node 8 --global-batch {batch} --output {plan}")
            srun = (f"OMP_NUM_THREADS=6 srun --nodes {nodes} --ntasks {gpus} --ntasks-per-node 8 --kill-on-bad-exit=1 "
                    "--cpu-bind=none python -m rapidnlp.cli pretrain ")
            tail = (f"--data.path data/demo/pd --train.global_batch {batch} --train.steps 20 --train.run_dir "
                    f"out/{model}/runs/{{}}_weak_w{gpus} --train.eval_interval 0 --train.log_interval 20 "
                    "--checkpoint.enabled false")
            assert lines[i + 1] == srun + f"--config {plan} " + tail.format("best")
            assert lines[i + 2] == srun + (f"--config configs/{model}.toml --parallel.tp 1 --parallel.pp 1 "
                                           "--parallel.dp 0 --parallel.zero 3 ") + tail.format("fsdp")
            i += 3
        assert lines[i] == (f"OMP_NUM_THREADS=6 python -m rapidnlp.cli bench --collect out/{model}/runs/* --model {model} "
                            f"--gpu a100-80g --output out/{model}/report")
        i += 1
    assert lines[i] == ("OMP_NUM_THREADS=6 python -m rapidnlp.cli bench --merge out/300m/report out/1.5b/report "
                        "--output out/report")
    assert not (REPO / "out").exists()  # a dry run writes nothing


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_landing_script_drops_excluded_documents_and_exports(tmp_path):
    """scripts/pretrain_landing.sh with EXCLUDE: a People's Daily document sharing a 20-character
    window (whitespace ignored) with a held-out text is not in the corpus the run trains on; a
    one-step run of a small model ends as a transformers folder (BertForMaskedLM)."""
    from rapidnlp.data.demo import people_daily_lines

    line = next(l for l in people_daily_lines() if len(l) > 80)
    held = tmp_path / "held_out.txt"
    held.write_text("﻿" + " ".join(line[10:40]) + "\n", encoding="utf-8")  # spaced out, with a BOM
    out = tmp_path / "landing"
    res = subprocess.run(["bash", str(REPO / "scripts" / "pretrain_landing.sh")], cwd=REPO, capture_output=True,
                         text=True, timeout=280,
                         env=clean_env(OUT=str(out), EXCLUDE=str(held), STEPS="1", HIDDEN="32", LAYERS="1",
                                       BATCH="4", SEQ="32", PRECISION="fp32"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    dropped = [l for l in res.stdout.splitlines() if l.startswith("EXCLUDE=")]
    assert len(dropped) == 1 and "dropped 0 of" not in dropped[0], res.stdout
    corpus = (out / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert line.replace("\n", " ") not in corpus and len(corpus) > 30000
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    missing = subprocess.run(["bash", str(REPO / "scripts" / "pretrain_landing.sh")], cwd=REPO, capture_output=True,
                             text=True, timeout=60, env=clean_env(OUT=str(tmp_path / "x"), EXCLUDE="/no/such"))
    assert missing.returncode == 2 and missing.stderr.strip() == "error: EXCLUDE=/no/such: no such file"
