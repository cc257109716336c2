#!/usr/bin/env python
"""Fused Triton kernels (rapidnlp.kernels) against PyTorch eager and torch.compile, forward + backward.

For each kernel at training shapes (tokens x hidden), on one GPU:

  fused ms      forward + backward of the Triton kernel (triton.testing.do_bench, median)
  GB/s, % peak  the bytes a fused kernel must move (inputs read + outputs written, forward and
                backward) over its time, against the device's peak HBM bandwidth (table below)
  x eager       eager time / fused time (eager: the same math as separate torch ops)
  x compile     torch.compile(eager) time / fused time
  err           max |fused - reference| / max |reference| on the same inputs (the kernel's
                PyTorch reference; for bf16 about one ulp, 4e-3 to 8e-3)

The cross-entropy rows are judged by peak memory (MiB allocated during forward + backward,
above the inputs) against the unfused loss (`F.cross_entropy(logits.float())`, and the
decoder GEMM + that loss for `linear_cross_entropy`) at no more time. Targets (issue 4, H100):
>= 80% of peak HBM bandwidth for element-wise kernels, >= 1.3x eager for the fused chains
(bias-GeLU, bias-dropout-add, masked softmax), >= 1.0x for the norms, cross-entropy peak memory
<= 1/4 of unfused at <= its time.

    python scripts/bench_kernels.py                       # tokens 8192 16384 65536 x hidden 1024 2048
    python scripts/bench_kernels.py --tokens 16384 --hidden 1024 --only layer_norm bias_gelu

Without CUDA it says so, runs a tiny CPU smoke (the reference paths; with TRITON_INTERPRET=1
the Triton kernels through the interpreter, checked against the references), and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import rapidnlp.kernels as K

# Peak HBM bandwidth per device, bytes/s (vendor data sheets). Longest key first when matching.
PEAK_HBM_BYTES_PER_S = {
    "A100-SXM4-40GB": 1555e9,
    "A100-PCIE-40GB": 1555e9,
    "A100-SXM4-80GB": 2039e9,
    "A100 80GB PCIe": 1935e9,
    "A100": 1555e9,
    "H100 PCIe": 2000e9,
    "H100 NVL": 3900e9,
    "H100": 3350e9,  # SXM5 80GB
    "H200": 4800e9,
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEQ_LEN = 512  # attention rows for the softmax: [tokens / SEQ_LEN, hidden / 64 heads, SEQ_LEN, SEQ_LEN]
TARGET_CHAIN, TARGET_NORM, TARGET_BANDWIDTH = 1.3, 1.0, 0.80


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_HBM_BYTES_PER_S, key=len, reverse=True):
        if key in name:
            return PEAK_HBM_BYTES_PER_S[key]
    return None


@dataclass
class Case:
    name: str
    shape: str
    leaves: list[torch.Tensor]  # inputs that receive gradients
    fused: Callable[[], torch.Tensor]
    eager: Callable[[], torch.Tensor]
    bytes: int  # minimal HBM traffic of the fused forward + backward; 0: not a bandwidth kernel
    kind: str  # "chain" | "norm" | "loss"


def _leaf(shape, dtype, device, scale=1.0, shift=0.0):
    return (torch.randn(shape, device=device) * scale + shift).to(dtype).requires_grad_()


# One builder per kernel (each its own closure): (tokens, hidden, dtype, device, args) -> Case.

def case_bias_gelu(tokens, hidden, dtype, device, args):
    ffn, e = 4 * hidden, dtype.itemsize
    x, b = _leaf((tokens, ffn), dtype, device), _leaf((ffn,), dtype, device)
    return Case("bias_gelu", f"{tokens}x{ffn}", [x, b], lambda: K.bias_gelu(x, b), lambda: F.gelu(x + b),
                5 * tokens * ffn * e, "chain")


def case_bias_dropout_add(tokens, hidden, dtype, device, args):
    x, r = _leaf((tokens, hidden), dtype, device), _leaf((tokens, hidden), dtype, device)
    b = _leaf((hidden,), dtype, device)
    return Case("bias_dropout_add", f"{tokens}x{hidden} p=0.1", [x, r, b],
                lambda: K.bias_dropout_add(x, b, r, 0.1, seed=1234), lambda: r + F.dropout(x + b, 0.1),
                5 * tokens * hidden * dtype.itemsize, "chain")


def case_layer_norm(tokens, hidden, dtype, device, args):
    x = _leaf((tokens, hidden), dtype, device, 2.0, 1.0)
    w, b = _leaf((hidden,), dtype, device, 0.1, 1.0), _leaf((hidden,), dtype, device, 0.1)
    return Case("layer_norm", f"{tokens}x{hidden}", [x, w, b], lambda: K.layer_norm(x, w, b, 1e-5),
                lambda: F.layer_norm(x, (hidden,), w, b, 1e-5), 5 * tokens * hidden * dtype.itemsize, "norm")


def case_rms_norm(tokens, hidden, dtype, device, args):
    x, w = _leaf((tokens, hidden), dtype, device, 2.0, 1.0), _leaf((hidden,), dtype, device, 0.1, 1.0)
    return Case("rms_norm", f"{tokens}x{hidden}", [x, w], lambda: K.rms_norm(x, w, 1e-6),
                lambda: F.rms_norm(x, (hidden,), w, 1e-6), 5 * tokens * hidden * dtype.itemsize, "norm")


def case_softmax(tokens, hidden, dtype, device, args):
    seq = min(SEQ_LEN, tokens)
    batch, heads = max(1, tokens // seq), max(1, hidden // 64)
    x = _leaf((batch, heads, seq, seq), dtype, device, 3.0)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), device=device)
    mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    scale = 1.0 / 8.0
    return Case("softmax", f"{batch}x{heads}x{seq}x{seq}", [x], lambda: K.scaled_masked_softmax(x, mask, scale),
                lambda: torch.softmax((x * scale).masked_fill(~mask, float("-inf")), -1),
                5 * x.numel() * dtype.itemsize, "chain")


def _mlm_labels(tokens, device, args):
    masked = max(1, int(tokens * args.mlm_fraction))
    labels = torch.randint(0, args.vocab, (masked,), device=device)
    labels[::10] = -100
    return masked, labels


def case_cross_entropy(tokens, hidden, dtype, device, args):
    masked, labels = _mlm_labels(tokens, device, args)
    logits = _leaf((masked, args.vocab), dtype, device, 3.0)
    return Case("cross_entropy", f"{masked}x{args.vocab}", [logits],
                lambda: K.cross_entropy(logits, labels, reduction="sum"),
                lambda: F.cross_entropy(logits.float(), labels, reduction="sum"), 0, "loss")


def case_linear_cross_entropy(tokens, hidden, dtype, device, args):
    masked, labels = _mlm_labels(tokens, device, args)
    h, w = _leaf((masked, hidden), dtype, device), _leaf((args.vocab, hidden), dtype, device, 0.02)
    return Case("linear_cross_entropy", f"{masked}x{hidden}->{args.vocab}", [h, w],
                lambda: K.linear_cross_entropy(h, w, None, labels, reduction="sum"),
                lambda: F.cross_entropy(F.linear(h, w).float(), labels, reduction="sum"), 0, "loss")


CASES = {
    "bias_gelu": case_bias_gelu, "bias_dropout_add": case_bias_dropout_add, "layer_norm": case_layer_norm,
    "rms_norm": case_rms_norm, "softmax": case_softmax, "cross_entropy": case_cross_entropy,
    "linear_cross_entropy": case_linear_cross_entropy,
}


def step_of(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    grad_cache = {}

    def step():
        out = fn()
        if out.dim() == 0:
            out.backward()
            return
        if "g" not in grad_cache:
            grad_cache["g"] = torch.randn_like(out)
        out.backward(grad_cache["g"])
    return step


def time_ms(step, leaves, device, warmup: int, iters: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(step, warmup=warmup, rep=iters, grad_to_none=leaves)
    times = []
    for i in range(max(1, warmup // 25) + iters // 25 + 1):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def peak_mib(step, leaves, device) -> float | None:
    if device.type != "cuda":
        return None
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def max_error(case: Case) -> float:
    """max |fused - reference| / max |reference|, on the same inputs (and dropout seed)."""
    with torch.no_grad():
        got = case.fused().float()
        with K.reference_only():
            want = case.fused().float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def verdict(case: Case, fused_ms, eager_ms, fraction_of_peak, mem_fused, mem_eager, device) -> str:
    if device.type != "cuda":
        return "n/a"
    if case.kind == "loss":
        if mem_fused is None or mem_eager is None:
            return "n/a"
        ok = mem_fused <= mem_eager / 4 and fused_ms <= eager_ms
        return "ok" if ok else "MISS"
    speedup = eager_ms / fused_ms
    need = TARGET_CHAIN if case.kind == "chain" else TARGET_NORM
    ok = speedup >= need and (fraction_of_peak is None or fraction_of_peak >= TARGET_BANDWIDTH)
    return "ok" if ok else "MISS"


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def run(args, device: torch.device) -> list[dict]:
    dtype = DTYPES[args.dtype]
    peak = args.peak_gbps * 1e9 if args.peak_gbps else peak_bandwidth(device)
    rows = []
    header = ("| kernel | shape | fused ms | GB/s | % peak | eager ms | x eager | compile ms | x compile "
              "| MiB fused | MiB eager | err | target |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for tokens in args.tokens:
        for hidden in args.hidden:
            torch.manual_seed(0)
            for name in args.only or CASES:
                case = CASES[name](tokens, hidden, dtype, device, args)
                fused_step = step_of(case.fused, case.leaves)
                eager_step = step_of(case.eager, case.leaves)
                fused_ms = time_ms(fused_step, case.leaves, device, args.warmup, args.iters)
                eager_ms = time_ms(eager_step, case.leaves, device, args.warmup, args.iters)
                compile_ms = None
                if args.compile:
                    torch._dynamo.reset()
                    try:
                        compiled = torch.compile(case.eager)
                        compile_ms = time_ms(step_of(compiled, case.leaves), case.leaves, device, args.warmup,
                                             args.iters)
                    except Exception as e:  # a benchmark row, not a crash: say why
                        print(f"  torch.compile failed for {case.name}: {type(e).__name__}: {e}".splitlines()[0],
                              file=sys.stderr)
                gbps = case.bytes / (fused_ms * 1e-3) / 1e9 if case.bytes else None
                fraction = gbps * 1e9 / peak if gbps is not None and peak else None
                mem_fused = peak_mib(fused_step, case.leaves, device)
                mem_eager = peak_mib(eager_step, case.leaves, device)
                err = max_error(case)
                row = dict(kernel=case.name, shape=case.shape, fused_ms=fused_ms, gbps=gbps, fraction=fraction,
                           eager_ms=eager_ms, compile_ms=compile_ms, mem_fused=mem_fused, mem_eager=mem_eager,
                           err=err, verdict=verdict(case, fused_ms, eager_ms, fraction, mem_fused, mem_eager, device))
                rows.append(row)
                print(f"| {case.name} | {case.shape} | {fused_ms:.3f} | {fmt(gbps, '.0f')} "
                      f"| {fmt(fraction and 100 * fraction, '.0f')} | {eager_ms:.3f} | {eager_ms / fused_ms:.2f} "
                      f"| {fmt(compile_ms, '.3f')} | {fmt(compile_ms and compile_ms / fused_ms, '.2f')} "
                      f"| {fmt(mem_fused, '.0f')} | {fmt(mem_eager, '.0f')} | {err:.2e} | {row['verdict']} |",
                      flush=True)
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 65536])
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--vocab", type=int, default=30592, help="padded vocabulary of the cross-entropy rows")
    p.add_argument("--mlm-fraction", type=float, default=0.15,
                   help="share of tokens the MLM head (and so the loss) sees")
    p.add_argument("--only", nargs="+", help="kernels to run (default: all)",
                   choices=list(CASES))
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile baseline")
    p.add_argument("--warmup", type=int, default=25, help="ms of warm-up per measurement (do_bench)")
    p.add_argument("--iters", type=int, default=100, help="ms of timed repetitions per measurement (do_bench)")
    p.add_argument("--peak-gbps", type=float, default=0.0, help="peak HBM GB/s (default: the table, by device name)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        what = "the Triton kernels through the interpreter" if K.INTERPRET else "the PyTorch reference paths"
        print("bench_kernels: no CUDA device here. The Triton kernels are GPU kernels: run this on a GPU "
              f"for the bandwidth table. Running a tiny CPU smoke of {what} instead (timings meaningless; "
              "err compares against the references).")
        args.tokens, args.hidden, args.vocab, args.compile, args.warmup, args.iters = [512], [64], 1000, False, 0, 50
        run(args, torch.device("cpu"))
        return 0
    device = torch.device("cuda")
    if not K.HAVE_TRITON:
        print("bench_kernels: triton is not installed; nothing to measure.")
        return 0
    name = torch.cuda.get_device_name(device)
    peak = args.peak_gbps * 1e9 if args.peak_gbps else peak_bandwidth(device)
    print(f"device: {name}; peak HBM {fmt(peak and peak / 1e9, '.0f')} GB/s; dtype {args.dtype}; "
          f"torch {torch.__version__}; triton {__import__('triton').__version__}")
    rows = run(args, device)
    misses = [f"{r['kernel']} {r['shape']}" for r in rows if r["verdict"] == "MISS"]
    print(f"\n{len(rows) - len(misses)}/{len(rows)} rows meet the issue's targets"
          + (f"; missed: {', '.join(misses)}" if misses else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
