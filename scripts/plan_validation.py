"""The planner against Megatron-LM's published weak-scaling table (Narayanan et al., SC'21,
Table 1), with and without its communication and bubble terms: the README's table.

    python scripts/plan_validation.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_plan import TABLE1, megatron_row  # noqa: E402  (one copy of the rows and of the protocol)


def main() -> None:
    print("| params (B) | tp | pp | GPUs | batch | published TFLOP/s | predicted | error | layout chosen "
          "| no comm, no bubble | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    errs, ablated = [], []
    for row in TABLE1:
        full, bare = megatron_row(row), megatron_row(row, terms=())
        e, a = full.hardware_tflops / row[-1] - 1, bare.hardware_tflops / row[-1] - 1
        errs.append(abs(e))
        ablated.append(abs(a))
        lay = full.layout
        print(f"| {row[0]} | {row[4]} | {row[5]} | {row[6]} | {row[7]} | {row[-1]} | {full.hardware_tflops:.0f} | "
              f"{e:+.1%} | mb {lay.micro_batch}, {lay.schedule}{' x' + str(lay.virtual) if lay.virtual > 1 else ''} "
              f"| {bare.hardware_tflops:.0f} | {a:+.1%} |")
    n = len(errs)
    print(f"\nmean |error| {sum(errs) / n:.1%}, rows within 15%: {sum(e <= 0.15 for e in errs)}/{n}; "
          f"without communication and bubble: mean |error| {sum(ablated) / n:.1%}, "
          f"within 15%: {sum(a <= 0.15 for a in ablated)}/{n}")


if __name__ == "__main__":
    main()
