"""Which path a kernel call takes (Triton or the PyTorch reference), and the launch counters.

The rule, one place for every kernel:

- CUDA tensors run the Triton kernel;
- CPU tensors run the PyTorch reference, except when the kernels were decorated under
  `TRITON_INTERPRET=1`: then the Triton kernel runs on CPU through the interpreter (that is how
  the tests exercise it; the interpreter is ~100x slower than torch, never for production);
- DTensors (tensor/sequence parallelism) run on their local shards (`on_local_shards`, through
  `local_map`): a row-wise kernel needs whole rows and a per-feature parameter the slice of
  features its shard holds; each shard then takes the path a plain tensor would. Other tensor
  subclasses run the reference;
- without triton installed everything runs the reference: `import rapidnlp.kernels` never
  needs triton.

`TRITON_INTERPRET` is read by `@triton.jit` when a kernel module is imported, so the flag is
captured here once, at import; setting it later changes nothing (and would not make the
already-decorated kernels run on CPU). Launching without a GPU and without the interpreter
raises "0 active drivers", which the `is_cuda` test avoids.

Every Triton launch goes through `launch()`, which counts it per kernel name, so a test can
assert that the fused path really ran rather than silently falling back to the reference.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch

try:  # triton is a dependency only where it installs (linux)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAVE_TRITON = False

    class _NoTriton:
        """Just enough of `triton` / `triton.language` for the kernel modules to define (never
        run) their kernels: `@triton.jit` returns the function, `tl.constexpr` annotates."""

        @staticmethod
        def constexpr(value=None):
            return value

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, int(n) - 1).bit_length()

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    triton = tl = _NoTriton()

INTERPRET = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

_launches: Counter = Counter()
_reference_only = False


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when this call should run the Triton kernel (see the module docstring)."""
    if not HAVE_TRITON or _reference_only:
        return False
    present = [t for t in tensors if t is not None]
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in present):
        return False
    first = present[0]
    if first.numel() == 0:
        return False
    return first.is_cuda or (INTERPRET and first.device.type == "cpu")


class _Settled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.trigger_wait()

    @staticmethod
    def backward(ctx, grad):
        return grad


def settled(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, or, for the result of a tensor-parallel collective still in flight (a row-parallel
    layer's reduce-scatter returns an AsyncCollectiveTensor, a tensor subclass), the plain tensor
    it becomes once waited for (gradients pass through), so that it can take the Triton path."""
    # Private API (torch.distributed._functional_collectives); no public one names this type yet.
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return _Settled.apply(t) if isinstance(t, AsyncCollectiveTensor) else t


def is_dtensor(t) -> bool:
    return t is not None and type(t).__name__ == "DTensor" and hasattr(t, "device_mesh")


def on_local_shards(fn, x, params: tuple, *args, split_last: bool):
    """fn(x, *params, *args) run on the local shards of DTensor `x` and of `params` (DTensors or
    None, 1-D over x's last dimension: a bias, a norm's weight); returns a DTensor laid out as x.

    x keeps its sharding, except a partial sum (made whole first: the kernels are not linear) and,
    unless `split_last` (element-wise kernels), a sharded last dimension (a row-wise kernel needs
    whole rows). A parameter follows x's last dimension: sharded alike where x's features are,
    replicated elsewhere; its gradient is then a partial sum over the ranks that hold other rows
    (rapidnlp.parallel.tensor_parallel.reduce_partial_grads completes it, as for DTensor's own ops)."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import local_map

    last = x.ndim - 1
    x_places, p_places, grad_places = [], [], []
    for place in x.placements:
        dim = place.dim % x.ndim if isinstance(place, Shard) else None
        if place.is_partial() or (dim == last and not split_last):
            place, dim = Replicate(), None
        x_places.append(Shard(dim) if dim is not None else place)
        p_places.append(Shard(0) if dim == last else Replicate())
        grad_places.append(Shard(0) if dim == last else Partial() if dim is not None else Replicate())
    if any(p is not None and not is_dtensor(p) for p in params):
        raise TypeError("a DTensor input needs DTensor parameters (a module under a tensor-parallel plan)")
    x = x.redistribute(placements=x_places)
    present = [p.redistribute(placements=p_places) for p in params if p is not None]

    def local(x_local, *present_local):  # absent parameters and plain arguments stay out of local_map
        rest = iter(present_local)
        return fn(x_local, *(None if p is None else next(rest) for p in params), *args)

    x_places, p_places, grad_places = tuple(x_places), tuple(p_places), tuple(grad_places)
    return local_map(
        local, out_placements=(x_places,), device_mesh=x.device_mesh,
        in_placements=(x_places, *(p_places,) * len(present)),
        in_grad_placements=(x_places, *(grad_places,) * len(present)),
    )(x, *present)


@contextlib.contextmanager
def reference_only():
    """Run the PyTorch references inside this block, whatever the device: for debugging a
    kernel, and for tests that compare the two paths on one model."""
    global _reference_only
    previous, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = previous


def launch(name: str, kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), counted under `name`."""
    _launches[name] += 1
    kernel[grid](*args, **kwargs)


def launch_counts() -> dict[str, int]:
    """Triton launches per kernel since the last reset (forward and backward kernels apart)."""
    return dict(_launches)


def reset_launch_counts() -> None:
    _launches.clear()


def rows_per_program(block_n: int, rows: int) -> int:
    """Rows one program handles for a row-wise kernel whose row tile is `block_n` wide.

    On a GPU a few thousand elements per program keep registers in bounds; the interpreter runs
    each program in Python, so it gets fat tiles (far fewer programs, the same numbers)."""
    budget = 1 << 15 if INTERPRET else 4096
    cap = triton.next_power_of_2(max(rows, 1))
    return max(1, min(budget // block_n, cap, 128 if INTERPRET else 16))


def num_warps_for(block_elems: int) -> int:
    """About 16 elements per thread (untuned: no GPU was at hand when this was written)."""
    return max(1, min(16, block_elems // 512))


def num_programs(blocks: int, device: torch.device) -> int:
    """Programs of a persistent grid (each loops over row blocks), for kernels that reduce
    per-column partial sums: a few per SM on a GPU, a handful in the interpreter."""
    if device.type == "cuda":
        return max(1, min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(blocks, 4))


def tile_2d(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of an element-wise tile over a [rows, cols] view."""
    max_n, budget = (4096, 1 << 15) if INTERPRET else (1024, 4096)
    block_n = min(triton.next_power_of_2(max(cols, 1)), max_n)
    block_m = max(1, min(budget // block_n, triton.next_power_of_2(max(rows, 1))))
    return block_m, block_n
