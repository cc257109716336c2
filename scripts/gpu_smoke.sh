#!/usr/bin/env bash
# GPU smoke test for a machine lent for a few minutes: is the GPU visible, does a
# one-process nccl group come up through rapidnlp's bootstrap, and does bf16 matmul agree
# with fp32. Standalone on purpose (no config, no model): it must work before anything
# else in the repository does.
#
#   scripts/gpu_smoke.sh            # from the repository root, rapidnlp installed or not
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi
else
    echo "nvidia-smi not found"
fi

# Not under any launcher: init_distributed takes the single-process path.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT SLURM_PROCID \
      OMPI_COMM_WORLD_RANK PMI_RANK
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python - <<'PY'
import sys, time

import torch

print("== versions")
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"cudnn {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    print("FAIL: torch.cuda.is_available() is False")
    sys.exit(1)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}  {p.total_memory / 2**30:.1f} GiB  sm_{p.major}{p.minor}")
try:
    import torch.cuda.nccl as nccl
    print("nccl", ".".join(map(str, nccl.version())))
except Exception as exc:  # informative only
    print("nccl version unknown:", exc)

failures = []

print("== 1-process nccl all_reduce via rapidnlp.distributed.bootstrap.init_distributed")
import torch.distributed as dist
from rapidnlp.distributed.bootstrap import init_distributed, shutdown

t0 = time.perf_counter()
env = init_distributed(timeout_s=120)
backend = dist.get_backend()
x = torch.arange(4, dtype=torch.float32, device="cuda") + 1
dist.all_reduce(x)
torch.cuda.synchronize()
ok = backend == "nccl" and x.tolist() == [1.0, 2.0, 3.0, 4.0] and torch.cuda.current_device() == env.local_rank
print(f"{env}  backend={backend}  result={x.tolist()}  {time.perf_counter() - t0:.2f}s  "
      f"{'ok' if ok else 'FAIL'}")
if not ok:
    failures.append("nccl all_reduce")

print("== bf16 matmul vs fp32 reference")
torch.manual_seed(0)
n = 4096
a = torch.randn(n, n, device="cuda")
b = torch.randn(n, n, device="cuda")
torch.backends.cuda.matmul.fp32_precision = "ieee"  # a true fp32 reference, no TF32
ref64 = a.double() @ b.double()
ref32 = a @ b


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def tflops(x, y, reps=20):
    x @ y
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        x @ y
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


checks = (
    ("fp32 vs fp64", rel_err(ref32, ref64), 1e-5, tflops(a, b)),
    # bf16 keeps 8 mantissa bits: ~4e-3 relative error per element, less after summing.
    ("bf16 vs fp32", rel_err(a.bfloat16() @ b.bfloat16(), ref32), 1e-2,
     tflops(a.bfloat16(), b.bfloat16())),
)
for name, rel, tol, tf in checks:
    ok = rel < tol
    print(f"{name}: relative error {rel:.2e} (limit {tol:.0e})  ~{tf:.0f} TFLOP/s  "
          f"{'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(name)

print("== result:", "FAIL " + ", ".join(failures) if failures else "all ok")
shutdown(1 if failures else 0)
PY
