"""`rapidnlp bench`: the real trainer over layouts and world sizes, one `rapidnlp pretrain` run each
(local workers over gloo on CPU, nccl on GPU), and a report: results.csv, results.md (tokens/s per
device, MFU, peak memory, scaling efficiency against world 1, the planner's prediction and its
error) and PNG plots (throughput and efficiency against world size, one line per layout).

`--collect RUN_DIR...` reports runs made elsewhere (the SLURM sweep: each run's config.json and
metrics.jsonl say everything), `--merge DIR...` merges report folders into one.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys

from rapidnlp.config import Config, apply, load_config
from rapidnlp.errors import UserError

FIELDS = ["model", "layout", "scaling", "world", "tp", "pp", "dp", "zero", "global_batch", "seq", "steps",
          "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "peak_mem_bytes",
          "efficiency", "predicted_tokens_per_s", "prediction_error", "status"]
LAYOUT_KEYS = {"tp": "parallel.tp", "pp": "parallel.pp", "dp": "parallel.dp", "zero": "parallel.zero",
               "z": "parallel.zero", "v": "parallel.pp_virtual_stages"}
NAMED = {"fsdp": {"parallel.zero": 3}, "ddp": {"parallel.zero": 0}, "dp": {},
         "interleaved": {"parallel.pp_schedule": "interleaved1f1b"}, "zbv": {"parallel.pp_schedule": "zbv"},
         "acfull": {"train.activation_checkpoint": "full"}, "acsel": {"train.activation_checkpoint": "selective"}}


def parse_layouts(text: str) -> dict[str, dict]:
    """'tp1,dp2;tp2;pp2' -> {name: overrides}; tokens tpN ppN dpN zeroN vN, fsdp, ddp, dp,
    interleaved, zbv, acfull, acsel."""
    layouts = {}
    for item in filter(None, (x.strip() for x in text.split(";"))):
        overrides = {}
        for token in filter(None, (x.strip() for x in item.split(","))):
            if token in NAMED:
                overrides.update(NAMED[token])
                continue
            key = token.rstrip("0123456789")
            if key not in LAYOUT_KEYS or key == token:
                raise UserError(f"--layouts '{text}': '{token}' is not a layout token (tpN, ppN, dpN, zeroN, vN, "
                                f"{', '.join(NAMED)})")
            overrides[LAYOUT_KEYS[key]] = int(token[len(key):])
        layouts[item] = overrides
    if not layouts:
        raise UserError(f"--layouts '{text}': no layout given, e.g. 'dp;tp2;pp2'")
    return layouts


def parse_worlds(text: str) -> list[int]:
    try:
        worlds = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--world '{text}': expected sizes like 1,2,4") from None
    if not worlds or worlds[0] < 1:
        raise UserError(f"--world '{text}': expected sizes of at least 1, like 1,2,4")
    return worlds


def run_sweep(config_path: str, layouts: dict[str, dict], worlds: list[int], steps: int, output: str,
              scalings: list[str], extra: list[str], log=print) -> list[str]:
    """Train every (scaling, layout, world) that divides; returns the run folders."""
    base = load_config(config_path, extra)
    run_dirs = []
    for scaling in scalings:
        for name, overrides in layouts.items():
            for world in worlds:
                tp, pp = overrides.get("parallel.tp", 1), overrides.get("parallel.pp", 1)
                dp = overrides.get("parallel.dp", 0)
                if world % (tp * pp) or (dp and dp * tp * pp != world):
                    log(f"skip {name} at world {world}: tp x pp x dp does not make {world}")
                    continue
                batch = base.train.global_batch * (world if scaling == "weak" else 1)
                run_dir = os.path.join(output, "runs", f"{_slug(name)}_{scaling}_w{world}")
                args = [f"--{k}={v}" for k, v in overrides.items()] + [
                    f"--train.global_batch={batch}", f"--train.steps={steps}", f"--train.run_dir={run_dir}",
                    "--train.eval_interval=0", "--checkpoint.enabled=false", f"--train.log_interval={steps}"]
                if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                    os.remove(os.path.join(run_dir, "metrics.jsonl"))  # metrics are appended: start clean
                log(f"run {name} ({scaling}) at world {world}: global batch {batch}")
                res = subprocess.run([sys.executable, "-m", "rapidnlp.cli", "pretrain", "--config", config_path,
                                      "--nproc", str(world), *extra, *args], capture_output=True, text=True)
                os.makedirs(run_dir, exist_ok=True)
                with open(os.path.join(run_dir, "bench.json"), "w") as f:
                    json.dump({"layout": name, "scaling": scaling, "returncode": res.returncode,
                               "error": res.stderr.strip().splitlines()[-1:] if res.returncode else []}, f)
                run_dirs.append(run_dir)
    return run_dirs


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def config_from_json(path: str) -> Config:
    """A run's resolved config.json back as a Config."""
    with open(path) as f:
        data = json.load(f)
    config = Config()
    for section, values in data.items():
        if section == "objectives":
            config.objectives = dict(values)
            continue
        for key, value in values.items():
            apply(config, section, key, value, path)
    return config


def collect(run_dir: str, model: str, gpu_key: str = "") -> dict:
    """One result row from a run folder (its config.json, metrics.jsonl and, from a sweep, bench.json)."""
    meta_path = os.path.join(run_dir, "bench.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    config_path, metrics_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(config_path):
        raise UserError(f"{run_dir}: no config.json; not a `rapidnlp pretrain` run folder")
    config = config_from_json(config_path)
    p, t = config.parallel, config.train
    world = p.tp * p.pp * p.dp
    row = {"model": model, "layout": meta.get("layout", f"tp{p.tp},pp{p.pp},dp{p.dp},zero{p.zero}"), "scaling": meta.get("scaling", ""),
           "world": world, "tp": p.tp, "pp": p.pp, "dp": p.dp, "zero": p.zero, "global_batch": t.global_batch,
           "seq": config.data.seq_len, "steps": 0, "status": "ok"}
    rows = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
    if meta.get("returncode") or not rows:
        row["status"] = "failed: " + " ".join(meta.get("error") or ["no metrics"])
        return row
    timed = rows[1:] or rows  # the first step includes start-up
    row["steps"] = len(rows)
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
    row["tokens_per_s_per_device"] = row["tokens_per_s"] / world
    row["tflops_per_device"] = statistics.median(r["tflops_per_device"] for r in timed)
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    row["mfu"] = statistics.median(mfus) if mfus else ""
    row["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in rows)
    if gpu_key:
        row["predicted_tokens_per_s"] = predicted_tokens_per_s(config, gpu_key)
        row["prediction_error"] = row["tokens_per_s"] / row["predicted_tokens_per_s"] - 1
    return row


def predicted_tokens_per_s(config: Config, gpu_key: str) -> float:
    from rapidnlp.plan.cost import Cluster
    from rapidnlp.plan.hardware import gpu
    from rapidnlp.plan.search import Planner, layout_of

    return Planner(config, Cluster(gpu(gpu_key))).predict(layout_of(config), config.train.global_batch).tokens_per_s


def with_efficiency(rows: list[dict]) -> list[dict]:
    """Scaling efficiency: tokens/s per device against the same model and scaling at world 1 (the
    same layout's run there if it has one, else any layout's: at world 1 every layout is the single
    process); without a world-1 run, against the layout's smallest world."""
    ok = [r for r in rows if r["status"] == "ok"]
    for row in ok:
        group = [r for r in ok if (r["model"], r["scaling"]) == (row["model"], row["scaling"])]
        ones = [r for r in group if r["world"] == 1]
        base = next((r for r in ones if r["layout"] == row["layout"]), ones[0] if ones else None)
        if base is None:
            base = min((r for r in group if r["layout"] == row["layout"]), key=lambda r: r["world"])
        row["efficiency"] = row["tokens_per_s_per_device"] / base["tokens_per_s_per_device"]
    return rows


def write_report(rows: list[dict], output: str) -> None:
    """results.csv, results.md and the two plots in `output`."""
    os.makedirs(output, exist_ok=True)
    rows = sorted(with_efficiency(rows), key=lambda r: (r["model"], r["scaling"], r["layout"], r["world"]))
    with open(os.path.join(output, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(markdown(rows))
    plot(rows, output)


def _fmt(value, spec: str) -> str:
    return "" if value in ("", None) else format(value, spec)


def markdown(rows: list[dict]) -> str:
    lines = ["| model | layout | scaling | world | tp | pp | dp | zero | global batch | tokens/s per device | MFU "
             "| peak memory GiB | efficiency vs smallest world | predicted tokens/s | prediction error | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['scaling']} | {r['world']} | {r['tp']} | {r['pp']} | {r['dp']} "
            f"| {r['zero']} | {r['global_batch']} | {_fmt(r.get('tokens_per_s_per_device'), ',.1f')} "
            f"| {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('peak_mem_bytes', '') and r['peak_mem_bytes'] / 2**30, '.2f')} "
            f"| {_fmt(r.get('efficiency'), '.2f')} | {_fmt(r.get('predicted_tokens_per_s'), ',.0f')} "
            f"| {_fmt(r.get('prediction_error'), '+.1%')} | {r['status']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    lines = sorted({(r["model"], r["layout"], r["scaling"]) for r in ok})
    for key, ylabel, name in (("tokens_per_s_per_device", "tokens/s per device", "throughput.png"),
                              ("efficiency", "scaling efficiency (per device, vs smallest world)", "efficiency.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, layout, scaling in lines:
            pts = sorted((r["world"], r[key]) for r in ok if (r["model"], r["layout"], r["scaling"]) == (model, layout, scaling))
            ax.plot([w for w, _ in pts], [v for _, v in pts], marker="o", label=f"{model} {layout} ({scaling})")
        ax.set_xscale("log", base=2)
        worlds = sorted({r["world"] for r in ok})
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("world size (devices)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(output, name), dpi=100)
        plt.close(fig)


def read_results(folder: str) -> list[dict]:
    path = os.path.join(folder, "results.csv")
    if not os.path.exists(path):
        raise UserError(f"--merge {folder}: no results.csv there")
    integers = {"world", "tp", "pp", "dp", "zero", "global_batch", "seq", "steps", "peak_mem_bytes"}
    reals = {"tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "efficiency",
             "predicted_tokens_per_s", "prediction_error"}

    def value(key, text):
        if text == "" or key not in integers | reals:
            return text
        return int(text) if key in integers else float(text)

    with open(path) as f:
        return [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
