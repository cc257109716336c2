"""`model.fused_kernels` on every layout: the fused linear cross-entropy as the MLM loss (the
head hands its transformed states to the loss, which decodes them chunk by chunk; under tensor
parallelism vocab-parallel, each rank its slice of the tied decoder) and the fused encoder
kernels, against the fused single process (rtol 1e-4, loss, grad norm, validation loss and
accuracy over 8 fp32 steps), and the fused single process against the unfused one.

The workers run the kernels' PyTorch reference path (TRITON_INTERPRET=0): the Triton kernels
themselves are checked against it in tests/test_kernels*.py, through the interpreter.
"""
import pytest

from conftest import assert_curves_equal, base_overrides, launch_worlds

FUSED = {"model.fused_kernels": True}
SHORT = {"train.steps": 8}  # conftest's single_short: the unfused reference
WORLDS = {
    1: {"single_fused": FUSED},
    2: {
        "tp2": {**FUSED, "parallel.tp": 2},
        "tp2_no_sp": {**FUSED, "parallel.tp": 2, "parallel.sequence_parallel": False, "parallel.loss_parallel": False},
        "pp2_1f1b": {**FUSED, "parallel.pp": 2},
        "dp2_fsdp": {**FUSED, "parallel.zero": 3},
        "dp2_ddp": {**FUSED, "parallel.zero": 0},
    },
    4: {"tp2_dp2_fsdp": {**FUSED, "parallel.tp": 2, "parallel.zero": 3}},
}
KEYS = ["loss", "grad_norm", "val_loss", "val_mlm_accuracy"]


def base(run_dir) -> dict:
    return {**base_overrides(run_dir), **SHORT}


@pytest.fixture(scope="module")
def curves(pd_dataset, references, tmp_path_factory):
    results = launch_worlds(WORLDS, pd_dataset, base, tmp_path_factory, env={"TRITON_INTERPRET": "0"})
    results["single"] = references["single_short"]
    return results


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fused_single_process_matches_unfused(curves):
    assert_curves_equal(curves["single_fused"], curves["single"], KEYS, SHORT["train.steps"])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", [name for world in (2, 4) for name in WORLDS[world]])
def test_fused_layout_matches_fused_single_process(curves, layout):
    assert_curves_equal(curves[layout], curves["single_fused"], KEYS, SHORT["train.steps"])
