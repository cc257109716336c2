"""The speed tooling's CPU-side parts: the CPU bf16 probe and the warning it drives, the
throughput benchmark's table, and scripts/gpu_check.sh's argument handling and dry run."""
import os
import re

import pytest

from conftest import REPO


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def test_bf16_probe_agrees_with_the_cpu_flags():
    import torch

    from rapidnlp.train.flops import cpu_low_precision_speedup

    speedup = cpu_low_precision_speedup(torch.bfloat16)
    assert 0 < speedup < 1000
    if {"amx_bf16", "avx512_bf16"} & _cpu_flags():
        assert speedup > 1.0, speedup  # measured 3-26x with AMX on the project's machines
    elif "avx512f" not in _cpu_flags():
        assert speedup < 1.0, speedup  # emulated: 66x slower measured on an AMD EPYC


@pytest.mark.parametrize("speedup, warned", [(0.015, True), (4.0, False)])
def test_cpu_precision_warning_only_where_slow(monkeypatch, capsys, speedup, warned):
    import rapidnlp.train.flops as flops
    from rapidnlp.cli import _warn_slow_cpu_precision

    monkeypatch.setattr(flops, "cpu_low_precision_speedup", lambda dtype: speedup)
    _warn_slow_cpu_precision("bf16")
    out = capsys.readouterr().out
    assert ("warning: train.precision = bf16 on this CPU: its bf16 matmuls ran at 0.01x fp32's rate" in out) == warned
    assert warned or out == ""


def test_bench_throughput_prints_its_table(tmp_path):
    """A tiny run of scripts/bench_throughput.py (eager only: compiling takes a minute on CPU)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "scripts" / "bench_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "t.md"
    assert bench.main(["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--seq-len", "32",
                       "--batch", "2", "--vocab", "300", "--steps", "2", "--warmup", "1", "--threads", "1",
                       "--impls", "ours", "hf", "--precision", "fp32", "--out", str(out)]) == 0
    text = out.read_text()
    for what in ("whole", "encoder"):
        assert re.search(rf"\| {what} \| GEMM peak: 12 Linear GEMMs of a block at 64 tokens \| \| \| [\d,.]+ \| 100% \|",
                         text), text
        for impl in ("ours", "hf"):
            assert re.search(rf"\| {what} \| {impl} \| [\d,]+ \| [\d,.]+ \| [\d,.]+ \| \d+% \| [\d.]+x \|", text), text
    assert re.search(r"- fp32 whole ours: \d+% of GEMM peak \(target 85%\), [\d.]+x hf eager \(target 1.05x\): (met|MISS)",
                     text), text


GPU_CHECK = str(REPO / "scripts" / "gpu_check.sh")


def _gpu_check(*args: str, timeout: float = 600):
    import subprocess

    from conftest import clean_env

    return subprocess.run(["bash", GPU_CHECK, *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(PYTHON=__import__("sys").executable))


@pytest.mark.parametrize("args, message", [
    (("--bogus",), "gpu_check.sh: unknown argument '--bogus' (expected --out DIR, --dry-run or --help)"),
    (("--out",), "gpu_check.sh: --out needs a folder"),
])
def test_gpu_check_refuses_bad_arguments(args, message):
    done = _gpu_check(*args)
    assert done.returncode == 2 and done.stderr.strip() == message, done.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_dry_run_writes_every_table(tmp_path):
    """Every stage of scripts/gpu_check.sh on the CPU at toy sizes, through the same staging of the
    package (a copy on PYTHONPATH, not the installed one) that the GPU machine uses."""
    out = tmp_path / "gpu"
    done = _gpu_check("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for stage in ("env", "kernels", "train", "throughput"):
        assert re.search(rf"\| {stage} \| ok \| \d+ \|", summary), summary
    env = (out / "env.md").read_text()
    assert re.search(r"\| torch \| 2\.\d+", env) and "| import rapidnlp.train.trainer | ok |" in env, env
    kernels = (out / "kernels.md").read_text()
    assert "| kernel | shape | fused ms | GB/s | % peak | eager ms | x eager | compile ms | x compile" in kernels
    assert re.search(r"\| bias_gelu \| ", kernels), kernels
    train = (out / "train.md").read_text()
    assert "- backend gloo: ok" in train and "- loss falls" in train and "FAIL" not in train, train
    assert len(re.findall(r"^\| \d+ \| [\d.]+ \| [\d.]+ \|", train, re.M)) == 4, train
    throughput = (out / "throughput_300m.md").read_text()
    assert re.search(r"\| whole \| ours \| [\d,]+ \|", throughput) and "GEMM peak" in throughput, throughput
