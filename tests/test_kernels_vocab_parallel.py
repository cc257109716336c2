"""The cross-entropy kernels on a vocab-parallel head: 2 real processes over gloo, each holding
half of the vocabulary (500 of 1000 rows, not a multiple of 128), combined through the
kernels' per-row partials and three all-reduces; loss and gradients equal the dense twin's.
The Triton kernels run through the interpreter in each process (TRITON_INTERPRET=1).
"""
import kernels_env  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)

import subprocess
import sys

import pytest

from conftest import clean_env
from kernels_env import needs_triton
from rapidnlp.distributed.bootstrap import free_port

pytestmark = [needs_triton, pytest.mark.timeout(180)]

WORKER = r"""
import os, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F

rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
import rapidnlp.kernels as k

assert k.INTERPRET
OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def all_reduce(t, op):
    dist.all_reduce(t, OPS[op])


torch.manual_seed(0)  # every rank builds the same full tensors and keeps its slice
T, H, V = 37, 32, 1000
shard = V // world
lo = rank * shard
logits = torch.randn(T, V) * 3
labels = torch.randint(0, V, (T,))
labels[::4] = -100
hidden, weight, bias = torch.randn(T, H), torch.randn(V, H) * 0.1, torch.randn(V) * 0.1

# logits already sharded (a ColwiseParallel decoder's local output)
full = logits.clone().requires_grad_()
ref = F.cross_entropy(full, labels, reduction="sum")
ref.backward()
local = logits[:, lo:lo + shard].clone().requires_grad_()
loss = k.cross_entropy(local, labels, reduction="sum", vocab_start=lo, all_reduce=all_reduce)
loss.backward()
torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(local.grad, full.grad[:, lo:lo + shard], rtol=1e-5, atol=1e-6)

# the decoder fused in: hidden replicated, decoder rows sharded
h_ref, w_ref, b_ref = (t.clone().requires_grad_() for t in (hidden, weight, bias))
ref = F.cross_entropy(F.linear(h_ref, w_ref, b_ref), labels)
ref.backward()
h = hidden.clone().requires_grad_()
w = weight[lo:lo + shard].clone().requires_grad_()
b = bias[lo:lo + shard].clone().requires_grad_()
loss = k.linear_cross_entropy(h, w, b, labels, chunk_size=16, vocab_start=lo, all_reduce=all_reduce)
loss.backward()
torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(w.grad, w_ref.grad[lo:lo + shard], rtol=1e-5, atol=1e-6)
torch.testing.assert_close(b.grad, b_ref.grad[lo:lo + shard], rtol=1e-5, atol=1e-6)

counts = k.launch_counts()
assert counts.get("cross_entropy_fwd", 0) > 0 and counts.get("cross_entropy_bwd", 0) > 0, counts
print(f"rank {rank} ok", flush=True)
dist.destroy_process_group()
os._exit(0)  # see ARCHITECTURE.md: gloo may abort at interpreter exit
"""


def test_vocab_parallel_cross_entropy_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    env = clean_env(TRITON_INTERPRET="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), "2", port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append(out)
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and f"rank {rank} ok" in out, out[-3000:]
