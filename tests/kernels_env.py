"""Import first in tests/test_kernels*.py: the kernels, decorated for the Triton interpreter.

`TRITON_INTERPRET` is read when `@triton.jit` decorates, and triton.language's own helpers
(tl.sum, tl.rand, ...) are decorated when triton is first imported: the variable must be set
before anything in the process imports triton. Run alone, these test files are first; in a
whole-suite run another test (torch.compile, a fused model) may import triton earlier, so
tests/conftest.py should set it at its top (`os.environ.setdefault("TRITON_INTERPRET", "1")`).
If triton was already imported without it, the kernel tests fail at collection with that fix,
rather than pass on the reference path. The variable stays set for the rest of the session
(a subprocess that must not inherit it removes it from its environment).
"""
import os
import sys

import pytest


def _interpreted_triton() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language as tl

    return isinstance(tl.sum, InterpretedFunction)


if "triton" in sys.modules and not _interpreted_triton():
    pytest.fail(
        "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU; "
        "add os.environ.setdefault('TRITON_INTERPRET', '1') at the top of tests/conftest.py",
        pytrace=False,
    )

os.environ["TRITON_INTERPRET"] = "1"  # stays set: kernels decorated later (a test's own) need it too

import rapidnlp.kernels as kernels  # noqa: E402
from rapidnlp.kernels import dispatch  # noqa: E402

HAVE_TRITON = dispatch.HAVE_TRITON
INTERPRETED = dispatch.INTERPRET

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def assert_launched(*names: str) -> None:
    """Each named Triton kernel ran at least once since the last reset: no silent fallback."""
    counts = kernels.launch_counts()
    missing = [n for n in names if counts.get(n, 0) == 0]
    assert not missing, f"Triton kernels never launched: {missing}; counts: {counts}"
