"""train.compile: per-block torch.compile (inductor's C++ backend on CPU) on every layout.

Compiled layouts against the compiled single process (same seed, same global batch, 20 fp32
steps, loss and grad_norm to rtol 1e-4); the compiled single process against the eager one (to
the tolerance below); and the recompilation count over runs that evaluate every 4 steps: the
blocks compile once for training and once for evaluation, never again. A small model (4 layers x
64) keeps compile time down; all blocks share their graphs, so depth costs no compile time.
"""
import os

import numpy as np
import pytest

from conftest import assert_curves_equal, base_overrides, launch_worlds, series

STEPS = 20
SMALL = {"model.num_layers": 4, "model.hidden_size": 64, "model.num_heads": 2, "model.ffn_size": 128}
COMPILED = {**SMALL, "train.compile": "true"}
# The fused dropout-add draws a new Philox seed each call, outside the compiled graphs. Run as
# production CPU runs are, on the PyTorch references: Dynamo cannot trace Triton's interpreter.
FUSED_DROPOUT = {"model.fused_kernels": True, "model.dropout": 0.1}
FUSED_WORLD = {1: {"fused_dropout_compiled": {**COMPILED, **FUSED_DROPOUT},
                   "fused_dropout_eager": {**SMALL, **FUSED_DROPOUT, "train.compile": "false"}}}
WORLDS = {
    1: {
        "single_compiled": COMPILED,
        "single_eager": {**SMALL, "train.compile": "false"},
        "ac_full_every2": {**COMPILED, "train.activation_checkpoint": "full", "train.activation_checkpoint_every": 2},
    },
    2: {
        "tp2_sp": {**COMPILED, "parallel.tp": 2},
        "dp2_fsdp_selective": {**COMPILED, "parallel.zero": 3, "train.activation_checkpoint": "selective"},
        "pp2_1f1b": {**COMPILED, "parallel.pp": 2, "train.micro_batch": 2},
        "pp2_interleaved": {**COMPILED, "parallel.pp": 2, "parallel.pp_schedule": "interleaved1f1b",
                            "parallel.pp_virtual_stages": 2},
    },
}
LAYOUTS = [name for world in WORLDS.values() for name in world if not name.startswith("single")]
# Compiled vs eager in fp32: inductor fuses and reorders reductions (LayerNorm, softmax, the GEMM
# epilogues), which changes the last bits of each step's values, and Adam's division by sqrt(v)
# can grow such differences over the steps. Measured over these 20 steps: at most 1.6e-7 (loss,
# grad_norm, val_loss), as close as the parallel layouts are to the single process. The bound
# leaves 60x room for other CPUs' vector widths and stays 1,000x below the loss's own change.
EAGER_RTOL = 1e-5


@pytest.fixture(scope="module")
def curves(pd_dataset, tmp_path_factory):
    results = launch_worlds(WORLDS, pd_dataset, base_overrides, tmp_path_factory)
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # the launched workers' environment (clean_env copies it)
    try:
        results.update(launch_worlds(FUSED_WORLD, pd_dataset, base_overrides, tmp_path_factory))
    finally:
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    return results


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_layout_matches_compiled_single_process(curves, layout):
    assert_curves_equal(curves[layout], curves["single_compiled"], ("loss", "grad_norm", "val_loss"), STEPS)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_tracks_eager(curves):
    compiled, eager = curves["single_compiled"], curves["single_eager"]
    assert "compiled_graphs" in compiled[0] and "compiled_graphs" not in eager[0]  # it really compiled
    assert_curves_equal(compiled, eager, ("loss", "grad_norm", "val_loss"), STEPS, rtol=EAGER_RTOL)
    loss = series(eager, "loss")
    assert loss[-5:].mean() < loss[:5].mean() - 0.3, loss  # and the curves it matches do train


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_fused_dropout_tracks_eager(curves):
    """Dropout on, fused kernels: each step's masks are new (seeds drawn eagerly, from the same
    generator in the same order), so compiled and eager draw the same masks and agree as above."""
    compiled, eager = curves["fused_dropout_compiled"], curves["fused_dropout_eager"]
    assert_curves_equal(compiled, eager, ("loss", "grad_norm", "val_loss"), STEPS, rtol=EAGER_RTOL)
    assert not np.allclose(series(eager, "loss"), series(curves["single_eager"], "loss"), rtol=1e-3)  # dropout ran


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ["single_compiled", "fused_dropout_compiled", *LAYOUTS])
def test_evaluation_does_not_recompile(curves, layout):
    """Graphs per row (this run's count so far): training's after step 1, evaluation's after the
    first validation (step 4), then no more over 4 further evaluations and 16 training steps."""
    rows = curves[layout]
    first_eval = next(i for i, r in enumerate(rows) if "val_loss" in r)
    assert sum("val_loss" in r for r in rows) == STEPS // 4
    graphs = [r["compiled_graphs"] for r in rows]
    assert graphs[0] >= 1 and graphs[first_eval] > graphs[first_eval - 1], graphs  # it compiled both
    assert graphs[first_eval:] == [graphs[first_eval]] * (STEPS - first_eval), graphs
    if layout == "single_compiled":  # one graph for training, one for evaluation, shared by all blocks
        assert graphs[0] == 1 and graphs[first_eval] == 2, graphs


def test_zero_bubble_refuses_compile():
    from rapidnlp.config import Config, resolve_layout
    from rapidnlp.errors import UserError

    config = Config()
    config.parallel.pp, config.parallel.pp_schedule, config.parallel.pp_virtual_stages = 2, "zbv", 2
    config.parallel.zero, config.train.compile = 0, "true"
    with pytest.raises(UserError, match="train.compile = true"):
        resolve_layout(config, 2)
    config.train.compile = "True"  # as a TOML `compile = true` arrives; auto skips compile there instead
    with pytest.raises(UserError, match="train.compile = true"):
        resolve_layout(config, 2)
    config.train.compile = "sometimes"
    with pytest.raises(UserError, match="train.compile = 'sometimes': choose auto, true or false"):
        resolve_layout(config, 2)


def test_deepspeed_refuses_compile():
    from rapidnlp.config import Config, resolve_layout
    from rapidnlp.errors import UserError

    config = Config()
    config.train.backend, config.train.compile, config.checkpoint.enabled = "deepspeed", "true", False
    with pytest.raises(UserError, match="train.backend = deepspeed: train.compile = true is the torch backend's"):
        resolve_layout(config, 1)


@pytest.mark.parametrize("setting, device, schedule, on", [
    ("auto", "cpu", "1f1b", False), ("auto", "cuda", "1f1b", True), ("auto", "cuda", "zbv", False),
    ("true", "cpu", "1f1b", True), ("false", "cuda", "1f1b", False),
])
def test_auto_compiles_on_cuda_only(setting, device, schedule, on):
    import torch

    from rapidnlp.config import ParallelConfig, TrainConfig
    from rapidnlp.parallel.compile import compile_enabled

    train, parallel = TrainConfig(compile=setting), ParallelConfig(pp=2, pp_schedule=schedule)
    assert compile_enabled(train, parallel, torch.device(device)) == on
