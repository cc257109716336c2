"""`rapidnlp plan`: the cost model's terms against hand computations, its choices where the answer
is known, Megatron-LM's published weak-scaling table (Narayanan et al., SC'21, Table 1) and layout
orderings, the ablation, the written config, and bad input as one line."""
import pytest

from conftest import REPO, run_cli
from rapidnlp.config import load_config, resolve_layout
from rapidnlp.plan.cost import BUBBLE_FACTOR, TERMS, Cluster, Layout, elementwise_bytes, gemm_time
from rapidnlp.plan.hardware import GPUS
from rapidnlp.plan.search import Planner, gpt_config

A100 = Cluster(GPUS["a100-80g"])
# Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
# Megatron-LM", SC'21, Table 1 (A100 80 GB, DGX nodes of 8): params (B), heads, hidden, layers,
# tp, pp, GPUs, global batch, achieved TFLOP/s per GPU (their count, with full recomputation).
TABLE1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


def megatron_row(row, terms=TERMS):
    """The planner at the row's tp, pp and batch, as Megatron ran it: full recomputation, no ZeRO,
    layers split evenly; micro-batch (1 or 2) and schedule (1F1B or interleaved x2) the best."""
    _, heads, hidden, layers, tp, pp, gpus, batch, _ = row
    planner = Planner(gpt_config(layers, hidden, heads), A100, causal=True)
    dp = gpus // (tp * pp)
    preds = []
    for mb in (1, 2):
        for schedule, v in (("1f1b", 1), ("interleaved1f1b", 2)) if pp > 1 else (("1f1b", 1),):
            if batch % (mb * dp) == 0 and layers % (pp * v) == 0:
                split = (layers // (pp * v),) * (pp * v) if pp > 1 else ()
                layout = Layout(tp, pp, dp, 0, mb, schedule, v, "full", False, split)
                preds.append(planner.predict(layout, batch, terms))
    return max(preds, key=lambda q: q.hardware_tflops)


@pytest.fixture(scope="module")
def table1():
    return {row[0]: (megatron_row(row), megatron_row(row, terms=())) for row in TABLE1}


def test_megatron_flops_count_is_the_papers():
    """With full recomputation the planner's hardware FLOPs are 96 B s l h^2 (1 + s/6h + V/16lh)."""
    _, heads, h, l, tp, pp, gpus, B, _ = TABLE1[3]
    q = megatron_row(TABLE1[3])
    s, V = 2048, 51200
    assert q.hardware_flops == pytest.approx(96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h)), rel=1e-9)
    assert q.model_flops == pytest.approx(72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h)), rel=1e-9)


def test_table1_per_gpu_throughput_within_15_percent(table1):
    errors = {row[0]: table1[row[0]][0].hardware_tflops / row[-1] - 1 for row in TABLE1}
    close = [b for b, e in errors.items() if abs(e) <= 0.15]
    assert len(close) >= 5, errors
    assert all(abs(e) < 0.2 for e in errors.values()), errors
    # each published layout fits this engine in 80 GB but the 1T one: its fp32 residual stream (Megatron
    # keeps it in fp16) makes 2 layers x 64 micro-batches in flight 25 GiB of saved block inputs
    assert [b for b in errors if not table1[b][0].fits] == [1008.0]


def test_ablation_without_communication_and_bubble_fits_worse(table1):
    def mean_abs(i):
        return sum(abs(table1[row[0]][i].hardware_tflops / row[-1] - 1) for row in TABLE1) / len(TABLE1)

    full, ablated = mean_abs(0), mean_abs(1)
    assert ablated > full + 0.1, (full, ablated)


def test_cost_terms_by_hand_for_a_two_layer_model():
    planner = Planner(gpt_config(2, 1024, 16, seq=1024, vocab=1024), A100, causal=True)
    gpu = A100.gpu
    layout = Layout(tp=2, pp=1, dp=2, zero=0, micro_batch=2, checkpoint="none")
    q = planner.predict(layout, global_batch=8)  # 2 micro-batches per rank
    b, s, h, t, m = 2, 1024, 1024, 2, 2
    # roofline per GEMM: 2mnk FLOPs at 267.9 TFLOP/s vs 2(mk + kn + mn) bytes at 0.9 x 2039 GB/s
    qkv = max(2 * b * s * 3 * h // t * h / 267.9e12, 2 * (b * s * h + h * 3 * h // t + b * s * 3 * h // t) / 1835.1e9)
    assert gemm_time(gpu, b * s, 3 * h // t, h) == pytest.approx(qkv)
    dense = [(b * s, 3 * h // t, h), (b * s, h, h // t), (b * s, 4 * h // t, h), (b * s, h, 4 * h // t)]
    core = 2 * gemm_time(gpu, s, s, 64, b * 16 // t)  # scores and context: same FLOPs and bytes
    forward = sum(gemm_time(gpu, *g) for g in dense) + core
    assert q.terms["gemm"] == pytest.approx(2 * m * 3 * forward)
    # TP: 4 all-reduces of b s h bf16 per layer and micro-batch, ring volume 2 (t-1)/t at 230 GB/s
    assert q.terms["tp_comm"] == pytest.approx(2 * m * 4 * (2 * 0.5 * 2 * b * s * h / 230e9 + 10e-6))
    # element-wise: 5 passes over the saved bytes, s b h (34 + 5 a s / h) / t under sequence parallelism
    saved = s * b * h * (34 + 5 * 16 * s / h) / t
    assert elementwise_bytes(planner.shape, layout) == pytest.approx(saved)
    assert q.terms["elementwise"] == pytest.approx(2 * m * 5 * saved / 1835.1e9)
    assert q.terms["bubble"] == 0 and q.terms["pp_comm"] == 0
    # DP: fp32 gradients all-reduced over 2 ranks two apart (inside the node), 2/3 of a micro-batch hidden
    grads = q.memory["mem_grads_bytes"]
    mb_s = q.terms["gemm"] / m + q.terms["elementwise"] / m + q.terms["tp_comm"] / m + q.terms["head"] / m
    assert q.terms["dp_comm"] == pytest.approx(max(0, 2 * 0.5 * grads / 230e9 + 10e-6 - 2 / 3 * mb_s) + 10e-6)


@pytest.mark.parametrize("schedule, v, fraction", [("1f1b", 1, 1 / 8), ("interleaved1f1b", 2, 1 / 16),
                                                   ("zero_bubble", 2, 1 / 48), ("gpipe", 1, 1 / 8)])
def test_bubble_per_schedule(schedule, v, fraction):
    """(p - 1) / m of the pipeline's time for 1F1B and GPipe, / v interleaved, a third of that zero-bubble."""
    planner = Planner(gpt_config(8, 512, 8, seq=512, vocab=1024), A100, causal=True)
    q = planner.predict(Layout(1, 2, 1, 0, 1, schedule, v, "none", True, (8 // (2 * v),) * (2 * v)), 8)
    pipeline = q.step_s - q.terms["bubble"] - q.terms["dp_comm"] - q.terms["optimizer"]
    assert q.terms["bubble"] / pipeline == pytest.approx(fraction)
    assert BUBBLE_FACTOR["zero_bubble"] == pytest.approx(1 / 3)


def test_tp_across_nodes_collapses():
    """tp = 16 spans two 8-GPU nodes: its collectives run at InfiniBand's ~23 GB/s, not NVLink's 230."""
    planner = Planner(gpt_config(40, 6144, 48), A100, causal=True)
    tp8 = planner.predict(Layout(8, 1, 2, 1, 1, checkpoint="full"), 64)
    tp16 = planner.predict(Layout(16, 1, 1, 0, 1, checkpoint="full"), 64)
    assert tp16.tokens_per_s < 0.6 * tp8.tokens_per_s, (tp16.tokens_per_s, tp8.tokens_per_s)
    best = planner.plan(16, 64)
    assert best[0].layout.tp <= 8 and all(q.layout.tp < 16 for q in best[:10])


def _tp_pp_speeds():
    planner = Planner(gpt_config(96, 12288, 96), A100, causal=True)
    return {tp: planner.predict(Layout(tp, 64 // tp, 1, 0, 1, "1f1b", 1, "full", False), 128).tokens_per_s
            for tp in (2, 4, 8, 16, 32)}


def test_tp_beyond_a_node_is_the_worst_split_at_fixed_gpus():
    """Narayanan et al. Figure 13 (a GPT-3-sized model on 64 GPUs, tp x pp = 64): tp beyond one
    node (16, 32) loses to every split that keeps tp inside it."""
    speed = _tp_pp_speeds()
    assert speed[32] < speed[16] < 0.5 * min(speed[2], speed[4], speed[8]), speed


@pytest.mark.xfail(strict=True, reason="the planner puts (tp, pp) = (4, 16) 4% above (8, 8), which the paper "
                   "measured best: a known miss of the cost model (README)")
def test_tp8_pp8_is_the_best_split_at_fixed_gpus():
    speed = _tp_pp_speeds()
    assert max(speed, key=speed.get) == 8, speed


def test_interleaving_helps_at_small_batch():
    """Narayanan et al. Figure 12: the interleaved schedule beats 1F1B, by more at small batch."""
    planner = Planner(gpt_config(96, 12288, 96), A100, causal=True)

    def gain(batch):
        one, inter = (planner.predict(Layout(8, 12, 1, 0, 1, s, v, "full", False), batch).tokens_per_s
                      for s, v in (("1f1b", 1), ("interleaved1f1b", 2)))
        return inter / one

    assert gain(12) > gain(96) > 1.0


def test_pipeline_vs_data_parallel_ordering():
    """Narayanan et al. Figure 14 (5.9B on 64 GPUs): throughput falls as pp replaces dp."""
    planner = Planner(gpt_config(32, 3840, 32), A100, causal=True)
    speed = [planner.predict(Layout(1, pp, 64 // pp, 0, 1, "1f1b", 1, "full", False), 512).tokens_per_s
             for pp in (2, 4, 8, 16, 32)]
    assert speed == sorted(speed, reverse=True), speed


def test_a_model_that_fits_only_with_zero3():
    """12B parameters on 8 GPUs with tp and pp ruled out (25 heads, 7 layers): 16 bytes per
    parameter fit only when ZeRO-3 shards the parameters too."""
    preds = Planner(gpt_config(7, 12000, 25), A100, causal=True).plan(8, 8)
    fitting = [q for q in preds if q.fits]
    assert fitting and {q.layout.zero for q in fitting} == {3}
    assert preds[0].layout.zero == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plan_writes_a_config_pretrain_runs(pd_dataset, tmp_path):
    out = tmp_path / "best.toml"
    res = run_cli("plan", "--config", "configs/tiny.toml", "--gpus", "2", "--gpu", "h100", "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert "tokens/s" in res.stdout and "best:" in res.stdout
    config = load_config(str(out))
    resolve_layout(config, 2)
    p = config.parallel
    assert p.tp * p.pp * p.dp == 2 and config.model.num_layers == 4 and config.train.global_batch == 32
    run_dir = tmp_path / "run"
    res = run_cli("pretrain", "--config", str(out), "--nproc", "2", "--data.path", pd_dataset, "--train.steps", "2",
                  "--train.run_dir", str(run_dir), "--train.eval_interval", "0", "--checkpoint.enabled", "false",
                  timeout=250)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_bad_input_is_one_line():
    res = run_cli("plan", "--config", "configs/tiny.toml", "--gpus", "1024")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no layout" in res.stderr, res.stderr
    res = run_cli("plan", "--gpt", "128,25600,160", "--gpus", "8", "--gpu", "a100-40g")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "the smallest needs" in res.stderr and "GiB per GPU" in res.stderr
    res = run_cli("plan", "--gpt", "24,2304", "--gpus", "8")
    assert res.returncode == 2 and "--gpt" in res.stderr


def test_params_layout_takes_pp():
    """`rapidnlp params --layout` with a pp key: the fullest stage (the last: its blocks, the heads
    and its copy of the tied word embedding)."""
    from rapidnlp.train.memory import estimate_state_bytes

    res = run_cli("params", "--config", "configs/1.5b.toml", "--layout", "tp=2,pp=4,dp=8,zero=1")
    assert res.returncode == 0, res.stderr
    params_mib = float(res.stdout.splitlines()[1].split()[-3].replace(",", ""))
    config = load_config(str(REPO / "configs/1.5b.toml"))
    config.model.vocab_size = 30592
    est = estimate_state_bytes(config, tp=2, pp=4, dp=8, zero=1)
    assert params_mib == pytest.approx(est["mem_params_bytes"] / 2**20, abs=0.1)
    whole = estimate_state_bytes(config, tp=2)["mem_params_bytes"]
    embedding = config.model.padded_vocab_size * config.model.hidden_size / 2 * 4
    assert whole / 4 < est["mem_params_bytes"] < whole / 4 + embedding
