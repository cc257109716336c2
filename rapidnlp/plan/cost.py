"""The planner's cost model: one training step's time and one rank's peak memory for a model
shape, a layout and a cluster, term by term (README, "rapidnlp plan"). Pure arithmetic on the GPU
table (hardware.py) and the model's FLOPs (rapidnlp/model/flops.py); the state memory comes in
from rapidnlp/train/memory.py. It must not import torch.distributed or start anything.

Time of a step = the pipeline's time (every micro-batch through the busiest pp rank, plus the
schedule's bubble) + the data-parallel traffic that backward cannot hide + the optimizer step.
One micro-batch on one layer costs its GEMMs (a roofline over the achievable GEMM rate and HBM
bandwidth, shape by shape: forward once, backward twice, once more when recomputed), the
element-wise work around them (the saved activations' bytes moved through HBM: written forward,
read with their gradients backward: 5 passes), and the TP collectives (not overlapped).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from rapidnlp.plan.hardware import GPU

BF16 = 2
FP32 = 4
USABLE_HBM = 0.9  # the rest: CUDA context, NCCL buffers, allocator fragmentation
# Zero-bubble schedules split backward into input- and weight-gradient halves and fill the
# pipeline's idle slots with weight-gradient work: with forward, input-backward and
# weight-backward equally long, ZB-H1's bubble is (p - 1)(F + B - W) = 1/3 of 1F1B's (p - 1)(F + B + W).
BUBBLE_FACTOR = {"gpipe": 1.0, "1f1b": 1.0, "interleaved1f1b": 1.0, "zero_bubble": 1 / 3, "zbv": 1 / 3}
TERMS = ("tp_comm", "pp_comm", "dp_comm", "bubble")


@dataclass(frozen=True)
class Shape:
    """What the cost model needs of a model: the encoder's shape, the sequence, the head."""
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int  # padded
    seq: int
    head_flops: float  # training FLOPs of the heads per sequence (model/flops.py)
    predicted: int  # positions the LM head scores per sequence (GPT: all; BERT: the masked slots)
    compute_bytes: int = BF16  # what the matmuls' saved inputs are held in (fp32 runs: 4)
    dropout: bool = False  # dropout masks (1 byte per element) saved

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    micro_batch: int = 1
    schedule: str = "1f1b"
    virtual: int = 1
    checkpoint: str = "none"  # none | selective | full
    sequence_parallel: bool = True
    split: tuple = ()  # layers per stage; (): balanced by FLOPs, as the engine balances them
    checkpoint_every: int = 1  # full: every k-th block

    def name(self) -> str:
        pipe = f" pp{self.pp}" + (f"x{self.virtual}" if self.virtual > 1 else "") + (
            f" {self.schedule}" if self.pp > 1 else "")
        return f"tp{self.tp}{pipe} dp{self.dp} z{self.zero} mb{self.micro_batch} ac:{self.checkpoint}"


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    gpus_per_node: int = 8
    intra_busbw: float = 0.0  # GB/s; 0: the GPU table's
    inter_busbw: float = 0.0

    def busbw(self, group_span: int) -> float:
        """Bus bandwidth (bytes/s) of a collective whose group spans `group_span` consecutive ranks."""
        inside = group_span <= self.gpus_per_node
        gbps = (self.intra_busbw or self.gpu.intra_busbw) if inside else (self.inter_busbw or self.gpu.inter_busbw)
        return gbps * 1e9

    def latency(self, group_span: int) -> float:
        return self.gpu.intra_latency_s if group_span <= self.gpus_per_node else self.gpu.inter_latency_s


@dataclass
class Prediction:
    layout: Layout
    step_s: float
    terms: dict  # seconds per step of each part
    memory: dict  # bytes of the fullest rank
    model_flops: float  # per step, all GPUs (model FLOPs: recomputation not counted)
    hardware_flops: float  # per step, all GPUs, with recomputation (Megatron-LM's count when full)
    gpus: int
    tokens: int
    usable_bytes: float
    notes: list = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s

    @property
    def model_tflops(self) -> float:
        return self.model_flops / self.step_s / self.gpus / 1e12

    @property
    def hardware_tflops(self) -> float:
        return self.hardware_flops / self.step_s / self.gpus / 1e12

    @property
    def peak_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes


def gemm_time(gpu: GPU, m: int, n: int, k: int, batch: int = 1) -> float:
    """One bf16 GEMM [m, k] x [k, n] (batch of them): the slower of its FLOPs at the achievable
    GEMM rate and its three matrices through HBM."""
    flops = 2.0 * m * n * k * batch
    traffic = BF16 * (m * k + k * n + m * n) * batch
    return max(flops / gpu.gemm_flops, traffic / gpu.hbm_bytes_per_s)


def layer_gemms(shape: Shape, layout: Layout, gpu: GPU) -> tuple[float, float]:
    """Forward GEMM seconds of one layer and one micro-batch on one tp rank: (all, attention core)."""
    b, s, h, t = layout.micro_batch, shape.seq, shape.hidden, layout.tp
    tokens = b * s
    heads = b * shape.heads // t
    core = gemm_time(gpu, s, s, shape.head_dim, heads) + gemm_time(gpu, s, shape.head_dim, s, heads)
    dense = (gemm_time(gpu, tokens, 3 * h // t, h) + gemm_time(gpu, tokens, h, h // t)
             + gemm_time(gpu, tokens, shape.ffn // t, h) + gemm_time(gpu, tokens, h, shape.ffn // t))
    return dense + core, core


def elementwise_bytes(shape: Shape, layout: Layout, mode: str | None = None) -> float:
    """The element-wise traffic unit of one layer and micro-batch on one tp rank: the bytes a
    Megatron-style layer (unfused attention softmax) saves for backward (Korthikanti et al.,
    "Reducing Activation Recomputation in Large Transformer Models", 2022, bf16, with dropout):
    s b h (34 + 5 a s / h) / t under sequence parallelism, s b h (10 + 24 / t + 5 a s / (h t))
    without it; `selective` drops the attention core's 5 a s / h, `full` keeps the block input."""
    s, b, h, a, t = shape.seq, layout.micro_batch, shape.hidden, shape.heads, layout.tp
    mode = layout.checkpoint if mode is None else mode
    sp = layout.sequence_parallel and t > 1
    core = 5 * a * s / (h * t)
    if mode == "full":
        return s * b * h * 2 / (t if sp else 1)
    rest = 34 / t if sp else 10 + 24 / t
    return s * b * h * (rest + (0 if mode == "selective" else core))


def _layer_time(shape: Shape, layout: Layout, cluster: Cluster, terms: set) -> dict:
    """Seconds of one layer, one micro-batch, forward + backward (+ recompute), by part."""
    gpu = cluster.gpu
    gemm, core = layer_gemms(shape, layout, gpu)
    saved = elementwise_bytes(shape, layout, "none")
    recompute = {"none": 0.0, "selective": core, "full": gemm}[layout.checkpoint]
    # every element-wise op reads its input and writes its output forward (2 passes over the
    # saved bytes), and backward reads the saved tensor and the incoming gradient and writes the
    # outgoing one (3 passes); recomputation repeats the forward passes of what it recomputes
    recomputed = {"none": 0.0, "full": saved, "selective": saved - elementwise_bytes(shape, layout, "selective")}
    elementwise = (5 * saved + 2 * recomputed[layout.checkpoint]) / gpu.hbm_bytes_per_s
    t = layout.tp
    tp = 0.0
    if t > 1 and "tp_comm" in terms:
        # two all-reduces (or all-gather + reduce-scatter pairs) forward, two backward, two more
        # when the whole layer is recomputed; a group of t consecutive ranks
        collectives = 4 + (2 if layout.checkpoint == "full" else 0)
        volume = BF16 * layout.micro_batch * shape.seq * shape.hidden
        tp = collectives * (2 * (t - 1) / t * volume / cluster.busbw(t) + cluster.latency(t))
    return {"gemm": 3 * gemm, "recompute": recompute, "elementwise": elementwise, "tp_comm": tp}


def _head_time(shape: Shape, layout: Layout, cluster: Cluster) -> float:
    """The LM head on the last stage, forward + backward, one micro-batch: its GEMM FLOPs at the
    GEMM rate and the fp32 logits through HBM (softmax forward, its gradient backward)."""
    gpu = cluster.gpu
    rows = layout.micro_batch * shape.predicted
    logits = rows * shape.vocab / layout.tp
    return layout.micro_batch * shape.head_flops / layout.tp / gpu.gemm_flops + 3 * FP32 * logits / gpu.hbm_bytes_per_s


@functools.lru_cache(maxsize=None)
def _balanced(layers: int, stages: int, head_per_layer: float) -> tuple:
    from rapidnlp.parallel.pipeline import balanced_split

    return tuple(balanced_split(layers, stages, 1.0, 0.0, head_per_layer))


def stage_split(shape: Shape, layout: Layout) -> list[int]:
    """Layers per stage: the layout's, else the engine's split balanced by model FLOPs (the heads
    on the last stage), as rapidnlp.parallel.pipeline.layer_split makes it."""
    from rapidnlp.model.flops import layer_flops_per_sequence

    if layout.split:
        return list(layout.split)
    block = layer_flops_per_sequence(shape.hidden, shape.ffn, shape.seq)
    return list(_balanced(shape.layers, layout.pp * layout.virtual, round(shape.head_flops / block, 3)))


def predict(shape: Shape, layout: Layout, cluster: Cluster, global_batch: int, *, state: dict,
            terms: tuple = TERMS) -> Prediction:
    """Step time and the fullest rank's memory. `state`: that rank's parameter, gradient and
    optimizer bytes (rapidnlp.train.memory.state_bytes); `terms`: the communication and bubble
    terms to include (the ablation drops them)."""
    terms = set(terms)
    gpu, p, t, d, v = cluster.gpu, layout.pp, layout.tp, layout.dp, layout.virtual
    m = global_batch // (layout.micro_batch * d)  # micro-batches per step
    parts = _layer_time(shape, layout, cluster, terms)
    layer_s = sum(parts.values())
    head_s = _head_time(shape, layout, cluster)
    split = stage_split(shape, layout)
    stages = len(split)
    # torch places stage s on rank s % p (the V schedule mirrors it: same load per rank here)
    per_rank = [0.0] * p
    for s, n in enumerate(split):
        per_rank[s % p] += n * layer_s + (head_s if s == stages - 1 else 0.0)
    rank_s = max(per_rank)
    p2p = 0.0
    if p > 1 and "pp_comm" in terms:
        # forward activations out and their gradients back at each of the rank's v stage
        # boundaries; a p2p to the next pp rank, tp x dp ranks away
        volume = BF16 * layout.micro_batch * shape.seq * shape.hidden / (t if layout.sequence_parallel else 1)
        span = t * d + 1
        p2p = 2 * v * (volume / cluster.busbw(span) + cluster.latency(span))  # busbw ~ the link's bandwidth
    mb_s = rank_s + p2p
    bubble = (p - 1) / v * mb_s * BUBBLE_FACTOR[layout.schedule] if p > 1 and "bubble" in terms else 0.0
    pipeline = m * mb_s
    dp_s = _dp_time(layout, cluster, state, mb_s, m) if d > 1 and "dp_comm" in terms else 0.0
    optimizer = (state["mem_params_bytes"] + state["mem_grads_bytes"] + 2 * state["mem_optimizer_bytes"]) \
        / gpu.hbm_bytes_per_s  # read params, grads, state; write params, state
    step = pipeline + bubble + dp_s + optimizer
    layers_scale = m * sum(n for s, n in enumerate(split) if s % p == per_rank.index(rank_s))
    time_terms = {
        "gemm": layers_scale * parts["gemm"], "recompute": layers_scale * parts["recompute"],
        "elementwise": layers_scale * parts["elementwise"], "tp_comm": layers_scale * parts["tp_comm"],
        "head": m * (head_s if per_rank.index(rank_s) == (stages - 1) % p else 0.0),
        "pp_comm": m * p2p, "bubble": bubble, "dp_comm": dp_s, "optimizer": optimizer,
    }
    from rapidnlp.model.flops import recompute_flops_per_sequence

    model_seq = shape_model_flops(shape)
    hardware_seq = model_seq + recompute_flops_per_sequence(shape.layers, shape.hidden, shape.ffn, shape.seq,
                                                            layout.checkpoint)
    memory = _memory(shape, layout, state, m)
    return Prediction(layout, step, time_terms, memory, global_batch * model_seq, global_batch * hardware_seq,
                      t * p * d, global_batch * shape.seq, gpu.hbm_gib * 2**30 * USABLE_HBM)


def shape_model_flops(shape: Shape) -> float:
    from rapidnlp.model.flops import layer_flops_per_sequence

    return shape.layers * layer_flops_per_sequence(shape.hidden, shape.ffn, shape.seq) + shape.head_flops


def _dp_time(layout: Layout, cluster: Cluster, state: dict, mb_s: float, m: int) -> float:
    """Gradient (and ZeRO-3 parameter) traffic over the dp group that compute cannot hide. The dp
    group's ranks are tp apart (mesh order pp, dp, tp). ZeRO 0-2 reduce once per step, bucket by
    bucket during the last micro-batch's backward (2/3 of it overlaps); ZeRO-3 gathers the
    parameters before each micro-batch's forward and backward, prefetched under the compute."""
    d, t = layout.dp, layout.tp
    span = t * (d - 1) + 1
    bw, lat = cluster.busbw(span), cluster.latency(span)
    grads = state["mem_grads_bytes"] * (d if layout.zero >= 2 else 1)  # the rank's whole gradient, fp32
    reduce = 2 * (d - 1) / d * grads / bw + lat  # all-reduce, or reduce-scatter + all-gather of params
    hidden = 2 / 3 * mb_s
    if layout.zero < 3:
        return max(0.0, reduce - hidden) + lat
    gather = (d - 1) / d * grads / bw + lat  # one all-gather of the fp32 parameters
    return max(0.0, reduce / 2 - hidden) + m * max(0.0, 2 * gather - mb_s)


def layer_saved_bytes(shape: Shape, layout: Layout, mode: str = "none") -> float:
    """Bytes one block of this engine (rapidnlp/model/bert.py: LayerNorms, q/k/v/output and MLP
    linears, SDPA) saves for backward per micro-batch on one tp rank: the two LayerNorms' inputs
    (the fp32 residual stream, a sequence shard under sequence parallelism) and statistics, the
    LayerNorm outputs the linears take (whole: all-gathered under sequence parallelism), q, k,
    v and the attention output, fc1's output and GELU's (tp shards), SDPA's log-sum-exp (flash and
    memory-efficient attention keep no s^2 probabilities) and, with dropout, 1-byte masks. `full`
    keeps only the block's input; `selective` recomputes the attention core (its q, k, v stay:
    they are the checkpoint's inputs)."""
    s, b, h, t = shape.seq, layout.micro_batch, shape.hidden, layout.tp
    x = s * b * h
    shard = t if layout.sequence_parallel and t > 1 else 1
    if mode == "full":
        return FP32 * x / shard
    stats = 2 * 2 * s * b / shard * FP32
    masks = 2 * x / shard if shape.dropout else 0.0
    # fp32: q, k, v share the LayerNorm output they save; under autocast each casts it anew
    norm_outputs = 2 if shape.compute_bytes == FP32 else 4
    linears = shape.compute_bytes * (norm_outputs * x + 4 * x / t + 2 * s * b * shape.ffn / t)
    core = b * shape.heads * s / t * FP32 if mode == "none" else 0.0
    return FP32 * 2 * x / shard + stats + masks + linears + core


def head_saved_bytes(shape: Shape, layout: Layout) -> float:
    """The last stage's final LayerNorm input and LM head per micro-batch: the gathered rows
    (index and the head's inputs) and the fp32 log-probabilities the loss keeps."""
    b, t = layout.micro_batch, layout.tp
    shard = t if layout.sequence_parallel and t > 1 else 1
    rows = b * shape.predicted
    return (FP32 * shape.seq * b * shape.hidden / shard + rows * shape.hidden * (8 + 4 * shape.compute_bytes)
            + FP32 * rows * shape.vocab / t)


def first_rank_activation_bytes(shape: Shape, layout: Layout, m: int) -> float:
    """The saved activations on pp rank 0 at their peak (what `mem_activation_bytes` measures):
    its blocks x the micro-batches in flight there, as torch's schedules run them: 1 without
    pipelining, GPipe m, 1F1B min(p, m); the interleaved schedules (loop placement, torch's
    warm-up) (v - 1) r + k (p - 1) + 1 stage forwards (r micro-batches per round, k = 2 for
    interleaved 1F1B, 1 for zero-bubble), a stage being a v-th of the rank's blocks. Under ZBV rank 0
    holds the first stage (min(m, 2p) forwards in flight) and the last (one, with its head). The
    zero-bubble schedules keep one stage's linear inputs for its deferred weight gradients. The
    zero-bubble terms were written after comparing with the measurement (test_pipeline.py). Recomputed
    tensors live only inside backward and are not counted here (see `_memory`)."""
    p, v = layout.pp, layout.virtual
    split = stage_split(shape, layout)
    mine = [0, len(split) - 1] if layout.schedule == "zbv" and p > 1 else list(range(0, len(split), p))
    blocks = sum(split[s] for s in mine)
    if p == 1:
        in_flight = 1.0
    elif layout.schedule == "gpipe":
        in_flight = m
    elif layout.schedule == "1f1b" or v == 1:
        in_flight = min(p, m)
    elif layout.schedule == "zbv":  # the first stage's forwards, and one of the last stage's
        in_flight = (min(m, 2 * p) * split[0] + split[-1]) / blocks
    else:
        rounds = max(1, m // p)
        k = 1 if layout.schedule == "zero_bubble" else 2
        in_flight = min(m * v, (v - 1) * (m // rounds) + k * (p - 1) + 1) / v
    per_block = {}
    every = layout.checkpoint_every if layout.checkpoint == "full" else 1
    for i in range(blocks):
        mode = layout.checkpoint if i % every == 0 else "none"
        per_block[mode] = per_block.get(mode, 0) + 1
    saved = sum(n * layer_saved_bytes(shape, layout, mode) for mode, n in per_block.items()) * in_flight
    if layout.schedule == "zbv" or (layout.schedule == "zero_bubble" and v > 1):
        # one stage's deferred weight gradients: its linears' inputs outlive the input gradient
        x, t = shape.seq * layout.micro_batch * shape.hidden, layout.tp
        per_block_inputs = shape.compute_bytes * (2 * x + x / t + shape.seq * layout.micro_batch * shape.ffn / t)
        saved += blocks / v * per_block_inputs
    heads = (1 if p == 1 or layout.schedule == "zbv" else 0) * head_saved_bytes(shape, layout)
    return saved + heads


def _memory(shape: Shape, layout: Layout, state: dict, m: int) -> dict:
    """The fullest rank at its peak: state, whole parameters during the step under ZeRO-2, the
    bf16 weight copies autocast keeps (ZeRO 0-2), the saved activations of the first pp rank,
    one block's activations while it is recomputed, and the last stage's logits (bf16 + fp32)."""
    params = state["mem_params_bytes"] * (layout.dp if layout.zero >= 2 else 1)  # whole, fp32
    whole_params = params if layout.zero == 2 else 0  # FSDP without reshard: whole during the step
    copies = params // 2 if layout.zero < 3 and shape.compute_bytes == BF16 else 0
    recompute = layer_saved_bytes(shape, layout) if layout.checkpoint != "none" else 0
    logits = layout.micro_batch * shape.predicted * shape.vocab / layout.tp * (BF16 + FP32)
    return {**state, "mem_whole_params_bytes": whole_params, "mem_bf16_copies_bytes": copies,
            "mem_activation_bytes": int(first_rank_activation_bytes(shape, layout, m)),
            "mem_recompute_bytes": int(recompute), "mem_logits_bytes": int(logits)}
