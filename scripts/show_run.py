"""What a finished run looks like: its loss curve as a PNG beside metrics.jsonl, its latest
checkpoint exported as a transformers folder, and that folder's fill-mask predictions.

  python scripts/show_run.py runs/demo [--hf runs/demo/hf] [--text "北京是中国的[MASK]都。" ...]

The predictions go through transformers itself (AutoModelForMaskedLM and AutoTokenizer on the
exported folder, offline), as a user of the checkpoint would run them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ("北京是中国的首[MASK]。", "今天的天气很[MASK]。", "这本书写得很[MASK]，我很喜欢。", "经济发展取得了新的[MASK]就。")


def plot_losses(run_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = {r["step"]: r for r in rows}  # a resumed run rewrites some steps: the last row wins
    xs = sorted(steps)
    ax.plot(xs, [steps[s]["loss"] for s in xs], lw=0.8, label="train loss")
    val = [s for s in xs if "val_loss" in steps[s]]
    if val:
        ax.plot(val, [steps[s]["val_loss"] for s in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    out = os.path.join(run_dir, "loss.png")
    fig.savefig(out, dpi=120)
    return out


def fill_mask(hf_dir: str, texts, top: int = 5) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each text with one [MASK]: the top predictions and their probabilities."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    out = []
    for text in texts:
        left, _, right = text.partition("[MASK]")
        ids = ([tok.cls_token_id] + tok.encode(left, add_special_tokens=False) + [tok.mask_token_id]
               + tok.encode(right, add_special_tokens=False) + [tok.sep_token_id])
        at = ids.index(tok.mask_token_id)
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([ids])).logits[0, at].softmax(-1)
        best = probs.topk(top)
        # A piece that decodes to white space (a byte, the word-start mark) shows as the piece itself.
        words = [tok.decode([int(i)]).strip() or tok.convert_ids_to_tokens(int(i)) for i in best.indices]
        out.append((text, list(zip(words, best.values.tolist()))))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--hf", default="", help="where to export (default: RUN_DIR/hf, replaced)")
    p.add_argument("--text", action="append", help="a text with one [MASK] (repeatable)")
    args = p.parse_args(argv)
    import shutil

    from rapidnlp.convert.folders import export_hf
    from rapidnlp.train.checkpoint import latest_checkpoint

    print(f"loss curve: {plot_losses(args.run_dir)}")
    ckpt = latest_checkpoint(args.run_dir)
    if ckpt is None:
        print(f"{args.run_dir}: no checkpoint to export", file=sys.stderr)
        return 2
    hf = args.hf or os.path.join(args.run_dir, "hf")
    shutil.rmtree(hf, ignore_errors=True)
    stats = export_hf(ckpt, hf)
    print(f"exported {ckpt} -> {hf} ({stats['class']})")
    for text, best in fill_mask(hf, args.text or TEXTS):
        print(f"{text}  ->  " + "  ".join(f"{w} {p:.2f}" for w, p in best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
