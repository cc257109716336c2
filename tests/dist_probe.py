"""A worker for the launcher tests: joins the ranks via init_distributed, all-reduces its
rank, prints one line, and ends through shutdown().

    python tests/dist_probe.py [--expect-world N] [--expect-launcher NAME]
                               [--pid-dir DIR] [--sleep S] [--fail-rank R --fail-code C]

--pid-dir writes DIR/<rank>.pid once the group is up (for tests that kill the launcher);
--sleep then keeps the worker alive; --fail-rank makes that rank exit with --fail-code
while the others sleep.
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from rapidnlp.distributed.bootstrap import init_distributed, shutdown


def _say(line: str) -> None:
    # One write() per line: under `python -u`, print() writes the text and its newline
    # separately, and the ranks' lines interleave on the shared stdout.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect-world", type=int)
    ap.add_argument("--expect-launcher")
    ap.add_argument("--pid-dir")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--fail-rank", type=int)
    ap.add_argument("--fail-code", type=int, default=3)
    args = ap.parse_args()

    env = init_distributed(timeout_s=60)
    assert init_distributed() is env, "init_distributed must be idempotent"

    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    expected = env.world_size * (env.world_size + 1) / 2
    problems = []
    if t.item() != expected:
        problems.append(f"sum {t.item()} != {expected}")
    if args.expect_world is not None and env.world_size != args.expect_world:
        problems.append(f"world {env.world_size} != {args.expect_world}")
    if args.expect_launcher is not None and env.launcher != args.expect_launcher:
        problems.append(f"launcher {env.launcher} != {args.expect_launcher}")
    if dist.get_rank() != env.rank or os.environ["RANK"] != str(env.rank):
        problems.append("RANK disagrees with the process group")

    if args.pid_dir:
        path = os.path.join(args.pid_dir, f"{env.rank}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)  # readers never see a half-written file
    if args.fail_rank is not None and env.rank == args.fail_rank:
        _say(f"probe rank={env.rank} failing with {args.fail_code}")
        os._exit(args.fail_code)
    if args.sleep:
        time.sleep(args.sleep)

    status = "ok" if not problems else "FAIL " + "; ".join(problems)
    _say(f"probe rank={env.rank} world={env.world_size} local={env.local_rank}/"
         f"{env.local_world_size} launcher={env.launcher} master={env.master_addr}:"
         f"{env.master_port} sum={t.item():g} {status}")
    shutdown(0 if not problems else 1)


if __name__ == "__main__":
    sys.exit(main())
