"""Pipeline parallelism against the single process: same seed, same global batch, 20 fp32 steps,
loss, grad_norm and validation loss equal to rtol 1e-4 (8 steps for the extra, slow tp layouts),
for every schedule at pp=2, and for
pp=2 x tp=2 (with and without sequence parallelism), pp=2 x dp=2 (FSDP, replicate, interleaved,
ZBV on ZeRO-2), pp=4 (a separate embedding group), and pp=2 x dp=2 x tp=2 (8 processes).
The knowledge-injection interfaces (a side tensor per sample, a mid-stack module, an auxiliary
loss) run at pp=2 x tp=2 against the same injection in one process. Bad pipeline layouts are
one line each. Each world size is launched once (real processes over gloo) and runs all its layouts.
"""

import numpy as np
import pytest
import torch

from conftest import (FP16, NAN_GRAD, REPO, TOY_SHORT, assert_memory_estimated, assert_skipped, base_overrides,
                      launch_world)
from rapidnlp.config import Config, apply, resolve_layout
from rapidnlp.errors import UserError

WORKER = str(REPO / "tests" / "pipeline_worker.py")
STEPS = 20
SHORT = {"train.steps": 8}  # extra coverage on the slowest (tp on 4 processes) layouts


PP2 = {"parallel.pp": 2}
# world size -> layout name -> (overrides, reference run: conftest.REFERENCE_RUNS). The toy
# objective (rapidnlp/pretrain/toy.py: an input piece, a block piece after layer 1, a head) runs
# at pp=2 x tp=2 against the same objective in one process.
WORLDS = {
    2: {
        "pp2_gpipe": ({**PP2, "parallel.pp_schedule": "gpipe"}, "single"),
        "pp2_1f1b": ({**PP2, "parallel.pp_schedule": "1f1b"}, "single"),
        "pp2_1f1b_lamb": ({**PP2, "train.optimizer": "lamb"}, "single_lamb"),
        "pp2_1f1b_split_3_1": ({**PP2, "parallel.pp_split": [3, 1]}, "single"),
        "pp2_interleaved1f1b_v2": (
            {**PP2, "parallel.pp_schedule": "interleaved1f1b", "parallel.pp_virtual_stages": 2}, "single"),
        "pp2_zero_bubble_v2": (
            {**PP2, "parallel.pp_schedule": "zero_bubble", "parallel.pp_virtual_stages": 2}, "single"),
        "pp2_zero_bubble_v1": ({**PP2, "parallel.pp_schedule": "zero_bubble"}, "single"),
        "pp2_zbv": ({**PP2, "parallel.pp_schedule": "zbv", "parallel.pp_virtual_stages": 2}, "single"),
        # an injected inf in the loss function the pipeline schedule calls: fp16 skips that step
        "pp2_fp16_inf": ({**PP2, **FP16, "train.loss_scale_window": 1000}, "fp16_inf"),
        # NaN gradients on the last stage only (rank 1) in fp32: every stage skips that step
        "pp2_nan_grad": (PP2, "nan_grad"),
    },
    4: {
        "pp2_tp2": ({**PP2, "parallel.tp": 2}, "single"),
        "pp2_tp2_no_sp": ({**PP2, **SHORT, "parallel.tp": 2, "parallel.sequence_parallel": False,
                           "parallel.loss_parallel": False}, "single_short"),
        "pp2_dp2_fsdp": ({**PP2, "parallel.zero": 3}, "single"),
        "pp2_dp2_replicate": ({**PP2, "parallel.zero": 0}, "single"),
        "pp2_dp2_interleaved1f1b_v2": (
            {**PP2, "parallel.pp_schedule": "interleaved1f1b", "parallel.pp_virtual_stages": 2}, "single"),
        "pp2_dp2_zbv_zero2": (
            {**PP2, "parallel.pp_schedule": "zbv", "parallel.pp_virtual_stages": 2, "parallel.zero": 2}, "single"),
        "pp4_1f1b": ({"parallel.pp": 4}, "single"),
        "pp2_tp2_toy": ({**PP2, "parallel.tp": 2, **TOY_SHORT}, "single_toy"),
    },
    8: {
        "pp2_dp2_tp2": ({**PP2, "parallel.tp": 2}, "single"),
    },
}
INJECTED = {"pp2_fp16_inf": {"step": 5}, "pp2_nan_grad": {**NAN_GRAD, "rank": 1}}
LAYOUTS = [name for n in (2, 4, 8) for name in WORLDS[n] if name not in INJECTED]
REFERENCE = {name: ref for world in WORLDS.values() for name, (_, ref) in world.items()}
OVERRIDES = {name: over for world in WORLDS.values() for name, (over, _) in world.items()}


@pytest.fixture(scope="module")
def curves(pd_dataset, references, tmp_path_factory):
    # the single-process runs (conftest), shared with the other suites
    results = {name: {"rows": rows} for name, rows in references.items()}
    for nproc in WORLDS:
        tmp = tmp_path_factory.mktemp(f"pp{nproc}")
        runs = [{"name": name, "overrides": over,
                 **({"inject": INJECTED[name]} if name in INJECTED else {})}
                for name, (over, _) in WORLDS[nproc].items()]
        results.update(launch_world(WORKER, nproc, pd_dataset, base_overrides(tmp / "run"), runs, tmp))
    return results


def _series(rows, key):
    return np.array([r[key] for r in rows if key in r], dtype=np.float64)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipeline_matches_single_process(curves, layout):
    ref, got = curves[REFERENCE[layout]]["rows"], curves[layout]["rows"]
    assert len(ref) == len(got) == OVERRIDES[layout].get("train.steps", STEPS)
    keys = ["loss", "grad_norm", "val_loss"] + [k for k in ref[-1] if k.startswith(("loss_", "val_loss_", "val_toy_"))]
    for key in keys:
        want = _series(ref, key)
        assert len(want) > 0, key
        np.testing.assert_allclose(_series(got, key), want, rtol=1e-4, err_msg=key)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.xfail(
    strict=True, reason="the toy objective's pieces' activations are not modelled: 22% under")) if "toy" in name
    else name for name in LAYOUTS])
def test_memory_estimate_matches_measurement(curves, layout):
    """Rank 0's stages: the pp split, the placement of interleaved and V schedules, the tied copy."""
    world = next(n for n, layouts in WORLDS.items() if layout in layouts)
    assert_memory_estimated(curves[layout]["rows"], OVERRIDES[layout], world)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_activation_memory_follows_the_schedule(curves):
    """Rank 0 (the first stage: embeddings + 2 of 4 layers) holds the saved activations of the
    micro-batches in flight: GPipe all 4, 1F1B at most pp = 2; each less than the whole model's."""
    single, gpipe, one_f_one_b = (curves[n]["rows"][-1]["mem_activation_bytes"] for n in ("single", "pp2_gpipe", "pp2_1f1b"))
    assert 1.5 < gpipe / one_f_one_b < 2.5, (gpipe, one_f_one_b)
    assert one_f_one_b < single < gpipe, (one_f_one_b, single, gpipe)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_references_learn(curves):
    """The references must train (equal curves of a no-op would prove nothing), and the toy
    objective's run must really differ from plain MLM (its pieces and loss took part)."""
    loss = _series(curves["single"]["rows"], "loss")
    assert loss[-5:].mean() < loss[:5].mean() - 0.3, loss
    plain, toy = curves["single_short"]["rows"], curves["single_toy"]["rows"]
    assert "loss_toy" in toy[0] and "loss_toy" not in plain[0]
    part = _series(toy, "loss_toy")
    assert part[-3:].mean() < part[:3].mean() - 0.02, part


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fp16_injected_inf_on_the_pipeline_path(curves):
    """The inf is injected in the loss function the schedule calls on the last stage: the step is
    skipped on every stage (the scaler sees the inf gradients) exactly as in the single process."""
    rows, ref = curves["pp2_fp16_inf"]["rows"], curves["fp16_inf"]["rows"]
    assert [r["skipped_steps"] for r in rows] == [r["skipped_steps"] for r in ref] == [0] * 4 + [1] * (STEPS - 4)
    assert rows[4]["grad_norm"] is None and [r["loss_scale"] for r in rows] == [r["loss_scale"] for r in ref]
    np.testing.assert_allclose(_series(rows, "loss"), _series(ref, "loss"), rtol=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fp32_nan_gradients_on_one_stage_skip_the_step_on_all(curves):
    """NaN gradients on the last stage only: the pipelined fp32 step is skipped on every stage,
    exactly as the single process skips it; training goes on from the untouched weights."""
    assert_skipped(curves["pp2_nan_grad"]["rows"], curves["nan_grad"]["rows"], step=5)


def _layout(world: int, **fields) -> Config:
    config = Config()
    for name, value in fields.items():
        section, key = name.split("__")
        apply(config, section, key, value, "test")
    resolve_layout(config, world)
    return config


@pytest.mark.parametrize("world, fields, message", [
    (2, {"parallel__pp": 2, "model__num_layers": 5},
     r"model.num_layers \(5\) is not divisible by parallel.pp \(2\) x parallel.pp_virtual_stages \(1\)"),
    (2, {"parallel__pp": 2, "parallel__pp_schedule": "interleaved1f1b", "parallel__pp_virtual_stages": 4,
         "model__num_layers": 4},
     r"model.num_layers \(4\) is not divisible by parallel.pp \(2\) x parallel.pp_virtual_stages \(4\)"),
    (2, {"parallel__pp": 2, "train__global_batch": 4, "train__micro_batch": 4},
     r"1 micro-batches per step .* parallel.pp_schedule = 1f1b needs at least parallel.pp \(2\)"),
    (2, {"parallel__pp": 2, "parallel__pp_schedule": "interleaved1f1b", "parallel__pp_virtual_stages": 2,
         "train__global_batch": 10, "train__micro_batch": 2},
     r"5 micro-batches per step .* do not form equal rounds of parallel.pp \(2\)"),
    (2, {"parallel__pp": 2, "parallel__pp_split": "3,2"},
     r"parallel.pp_split = \[3, 2\]: needs 2 counts .* summing to model.num_layers \(4\)"),
    (2, {"parallel__pp": 2, "parallel__pp_split": "three,one"}, r"parallel.pp_split: expected a list of integers"),
    (2, {"parallel__pp": 2, "parallel__pp_schedule": "dualpipe"}, r"parallel.pp_schedule = 'dualpipe': choose"),
    (2, {"parallel__pp": 2, "parallel__pp_virtual_stages": 2},
     r"parallel.pp_virtual_stages = 2 needs an interleaved schedule"),
    (2, {"parallel__pp": 2, "parallel__pp_schedule": "zbv"}, r"zbv places exactly 2 stages per rank"),
    (4, {"parallel__pp": 2, "parallel__pp_schedule": "zero_bubble"},
     r"parallel.pp_schedule = zero_bubble with parallel.zero = 3: .* use parallel.zero = 2 or 0"),
    (2, {"parallel__pp": 2, "parallel__pp_schedule": "zbv", "parallel__pp_virtual_stages": 2, "parallel__zero": 3,
         "parallel__cpu_offload": True}, r"parallel.pp_schedule = zbv with parallel.zero = 3"),
    (4, {"parallel__pp": 2, "parallel__zero": 1}, r"parallel.zero = 1 with parallel.pp > 1: .* use parallel.zero = 2"),
])
def test_bad_pipeline_layouts(world, fields, message):
    with pytest.raises(UserError, match=message) as info:
        _layout(world, **fields)
    assert "\n" not in str(info.value)


def test_good_pipeline_layouts():
    _layout(2, parallel__pp=2, model__num_layers=5, parallel__pp_split="[3, 2]")
    _layout(2, parallel__pp=2, parallel__pp_schedule="gpipe", train__global_batch=4, train__micro_batch=4)
    _layout(8, parallel__pp=2, parallel__tp=2, parallel__pp_schedule="zbv", parallel__pp_virtual_stages=2,
            parallel__zero=2)


def test_balanced_split_moves_layers_off_an_expensive_last_stage():
    from rapidnlp.parallel.pipeline import balanced_split

    assert balanced_split(8, 2, block=1.0, first=0.0, last=0.1) == [4, 4]
    assert balanced_split(8, 2, block=1.0, first=0.0, last=2.0) == [5, 3]
    assert balanced_split(8, 4, block=1.0, first=0.0, last=0.0) == [2, 2, 2, 2]
    assert balanced_split(5, 2, block=1.0, first=0.0, last=0.0) in ([3, 2], [2, 3])


def test_stages_partition_the_full_model():
    """Stage parameter names are the full model's; together the stages hold every parameter once,
    plus the decoder's own copy of the tied weight, which starts equal to the embedding."""
    from rapidnlp.model.bert import BertForMLM

    config = Config()
    config.model.vocab_size = 1000
    torch.manual_seed(0)
    model = BertForMLM(config.model)
    names = {n for n, _ in model.named_parameters()}
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = model.stage_view([0, 1, 2], first=True, last=False)
    last = model.stage_view([3], first=False, last=True)
    a, b = dict(first.named_parameters()), dict(last.named_parameters())
    assert set(a) | set(b) == names | {"lm_head.decoder.weight"} and not set(a) & set(b)
    assert b["lm_head.decoder.weight"] is not a["embeddings.word_embeddings.weight"]
    assert torch.equal(b["lm_head.decoder.weight"], a["embeddings.word_embeddings.weight"])
    for n, p in {**a, **b}.items():
        assert torch.equal(p, full.get(n, full["embeddings.word_embeddings.weight"])), n
