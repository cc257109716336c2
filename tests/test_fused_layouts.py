"""`model.fused_kernels` on every layout: the fused linear cross-entropy as the MLM loss (the
head hands its transformed states to the loss, which decodes them chunk by chunk; under tensor
parallelism vocab-parallel, each rank its slice of the tied decoder) and the fused encoder
kernels on the local shards of tensor/sequence-parallel DTensors.

- Curves (8 fp32 steps; loss, grad norm, validation loss and accuracy, rtol 1e-4): every layout
  against the fused single process, which matches the unfused one; with residual dropout 0.1 too,
  tp = 2 (sequence parallelism on and off) against the single process with the same dropout:
  each sequence shard draws its slice of the whole sequence's mask. These workers run the
  kernels' PyTorch reference path (TRITON_INTERPRET=0).
- Dense twins at tp = 2 (sequence parallelism on and off, dropout 0.1): one step of the TP model
  against the same model unsharded, with the Triton kernels running through the interpreter on
  every rank's shards, their launch counters proving it.
Attention dropout stays 0: SDPA draws its own mask per rank's heads, not layout-invariant.
"""
import pytest

from conftest import REPO, assert_curves_equal, base_overrides, launch_world, launch_worlds

FUSED = {"model.fused_kernels": True}
DROPOUT = {**FUSED, "model.dropout": 0.1}
TP2 = {"parallel.tp": 2}
NO_SP = {"parallel.sequence_parallel": False, "parallel.loss_parallel": False}
SHORT = {"train.steps": 8}  # conftest's single_short: the unfused reference
WORLDS = {
    1: {"single_fused": FUSED, "single_dropout": DROPOUT},
    2: {
        "tp2": {**FUSED, **TP2},
        "tp2_no_sp": {**FUSED, **TP2, **NO_SP},
        "pp2_1f1b": {**FUSED, "parallel.pp": 2},
        "pp2_zbv": {**FUSED, "parallel.pp": 2, "parallel.pp_schedule": "zbv", "parallel.pp_virtual_stages": 2,
                    "parallel.zero": 2},  # the loss's decoder gradient through the split backward
        "dp2_fsdp": {**FUSED, "parallel.zero": 3},
        "dp2_ddp": {**FUSED, "parallel.zero": 0},
        "tp2_dropout": {**DROPOUT, **TP2},
        "tp2_no_sp_dropout": {**DROPOUT, **TP2, **NO_SP},
    },
    4: {"tp2_dp2_fsdp": {**FUSED, **TP2, "parallel.zero": 3}},
}
LAYOUTS = [name for world in (2, 4) for name in WORLDS[world] if not name.endswith("_dropout")]
KEYS = ["loss", "grad_norm", "val_loss", "val_mlm_accuracy"]
TWINS = {"twin_sp": {**DROPOUT, **TP2}, "twin_no_sp": {**DROPOUT, **TP2, **NO_SP}}
KERNELS = ["layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd", "bias_dropout_add_fwd",
           "bias_dropout_add_bwd", "cross_entropy_fwd", "cross_entropy_bwd"]


def base(run_dir) -> dict:
    return {**base_overrides(run_dir), **SHORT}


@pytest.fixture(scope="module")
def curves(pd_dataset, references, tmp_path_factory):
    results = launch_worlds(WORLDS, pd_dataset, base, tmp_path_factory, env={"TRITON_INTERPRET": "0"})
    results["single"] = references["single_short"]
    return results


@pytest.fixture(scope="module")
def twins(pd_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("twins")
    runs = [{"name": name, "overrides": over, "dense_twin": True} for name, over in TWINS.items()]
    return launch_world(str(REPO / "tests" / "train_worker.py"), 2, pd_dataset, base(tmp / "run"), runs, tmp,
                        env={"TRITON_INTERPRET": "1"})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fused_single_process_matches_unfused(curves):
    assert_curves_equal(curves["single_fused"], curves["single"], KEYS, SHORT["train.steps"])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_layout_matches_fused_single_process(curves, layout):
    assert_curves_equal(curves[layout], curves["single_fused"], KEYS, SHORT["train.steps"])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ["tp2_dropout", "tp2_no_sp_dropout"])
def test_tp_dropout_draws_the_single_process_masks(curves, layout):
    assert_curves_equal(curves[layout], curves["single_dropout"], KEYS, SHORT["train.steps"])
    # dropout really changed the run (equal curves of a no-op would prove nothing)
    assert [r["loss"] for r in curves["single_dropout"]] != [r["loss"] for r in curves["single_fused"]]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("twin", list(TWINS))
def test_kernels_run_on_tp_shards(twins, twin):
    res = twins[twin]
    missing = [k for k in KERNELS if res["launch_counts"].get(k, 0) == 0]
    assert not missing, (missing, res["launch_counts"])
    assert res["logits_max_abs_diff"] < 1e-5 and res["loss_rel_diff"] < 1e-6, res
    # key.bias has a zero gradient (softmax ignores a constant per query): its rel diff is noise.
    real = {k: v for k, v in res["grad_rel_diff"].items() if not k.endswith("attention.key.bias")}
    worst = max(real, key=real.get)
    assert real[worst] < 1e-5, (worst, real[worst])
