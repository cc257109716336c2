"""The objective seam, tested with rapidnlp/pretrain/toy.py (one file: a collated field of its
own, an input-side piece, a block piece after layer 1, a head): every layout's total loss, each
objective's loss, grad norm and validation losses and metrics equal the single process to rtol
1e-4 over 10 fp32 steps. Under pp=2 the adapter and the head sit on different stages (1f1b:
stage 0 vs 1; interleaved and zbv: stages 1 and 3). Checkpoints: bit-exact resume with the toy
objective on a pipeline; a plain-MLM checkpoint starts a toy run (its modules initialised, one
line naming them); the reverse is refused in one line unless checkpoint.drop_unknown_modules."""
import json

import pytest

from conftest import TOY_SHORT, assert_curves_equal, base_overrides, launch_worlds, run_cli
from conftest import series as _series
from test_checkpoint import ok, one_error_line, train_args

STEPS = TOY_SHORT["train.steps"]
PP2 = {"parallel.pp": 2}
WORLDS = {
    2: {
        "tp2": {"parallel.tp": 2},
        "tp2_no_sp": {"parallel.tp": 2, "parallel.sequence_parallel": False, "parallel.loss_parallel": False},
        "pp2_1f1b": PP2,
        "pp2_interleaved": {**PP2, "parallel.pp_schedule": "interleaved1f1b", "parallel.pp_virtual_stages": 2},
        "pp2_zbv": {**PP2, "parallel.pp_schedule": "zbv", "parallel.pp_virtual_stages": 2, "parallel.zero": 2},
        **{f"dp2_zero{z}": {"parallel.zero": z} for z in (0, 1, 2, 3)},
    },
    8: {"tp2_pp2_dp2": {**PP2, "parallel.tp": 2}},
}
LAYOUTS = [name for world in (2, 8) for name in WORLDS[world]] + ["deepspeed_zero2"]


def base(run_dir) -> dict:
    return {**base_overrides(run_dir), **TOY_SHORT}


@pytest.fixture(scope="module")
def curves(pd_dataset, references, tmp_path_factory):
    results = launch_worlds(WORLDS, pd_dataset, base, tmp_path_factory, deepspeed={})
    results["single"] = references["single_toy"]  # shared with test_pipeline (conftest)
    return results


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_toy_objective_matches_single_process(curves, layout):
    keys = ["loss", "loss_mlm", "loss_toy", "grad_norm", "val_loss", "val_loss_mlm", "val_loss_toy",
            "val_mlm_accuracy", "val_toy_accuracy"]
    assert_curves_equal(curves[layout], curves["single"], keys, STEPS)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_toy_objective_trains_and_totals_its_parts(curves):
    rows = curves["single"]
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_mlm"] + 0.5 * r["loss_toy"], rel=1e-6)
    toy = _series(rows, "loss_toy")
    assert toy[-3:].mean() < toy[:3].mean() - 0.02, toy  # the segment head learns


def _args(data, run_dir, steps, *extra):
    """test_checkpoint's CLI run (tiny, seq 64, batch 8), checkpoints every 3 steps."""
    return train_args(data, run_dir, steps, "--checkpoint.interval", "3", *extra)


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("loss_toy")) for r in rows}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_toy_checkpoint_resumes_bit_exact_on_a_pipeline(pd_dataset, tmp_path):
    toy = ["--objectives.toy", "0.5", "--parallel.pp", "2", "--nproc", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    ok(run_cli(*_args(pd_dataset, full, 6, *toy)))
    ok(run_cli(*_args(pd_dataset, part, 3, *toy)))
    ok(run_cli(*_args(pd_dataset, part, 6, *toy), "--resume", "auto"))
    want, got = _losses(full), _losses(part)
    assert all(got[s] == want[s] for s in (4, 5, 6)), (got, want)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_objective_modules_added_and_dropped(pd_dataset, tmp_path):
    plain, toy = tmp_path / "plain", tmp_path / "toy"
    ok(run_cli(*_args(pd_dataset, plain, 3)))
    ckpt = str(plain / "checkpoints" / "step_3")
    res = ok(run_cli(*_args(pd_dataset, toy, 5, "--objectives.toy", "0.5", "--resume", ckpt)))
    assert "new objective modules start from initialisation: toy_adapter, toy_segment_head, toy_topic" in res.stdout
    assert sorted(_losses(toy)) == [4, 5] and _losses(toy)[4][1] is not None

    back = tmp_path / "back"
    toy_ckpt = str(toy / "checkpoints" / "step_5")
    line = one_error_line(run_cli(*_args(pd_dataset, back, 6, "--resume", toy_ckpt)))
    assert "holds modules this run does not have: toy_adapter, toy_segment_head, toy_topic" in line
    assert "checkpoint.drop_unknown_modules = true" in line
    ok(run_cli(*_args(pd_dataset, back, 6, "--resume", toy_ckpt, "--checkpoint.drop_unknown_modules", "true")))
    assert sorted(_losses(back)) == [6]
