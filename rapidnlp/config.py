"""Configuration as data: typed dataclasses loaded from TOML, overridable as `--section.field value`.

Validation (field types, layout arithmetic) happens here, once, before any process group
exists; every error names the field. Nothing here imports torch.distributed.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from rapidnlp.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The embedding and decoder rows are padded to a multiple of this, independently of tp, so a
# checkpoint saved at one tp loads at another. Pad rows are never predicted (labels < vocab).
VOCAB_PAD_MULTIPLE = 128


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    ffn_size: int = 512
    vocab_size: int = 0  # 0: taken from the tokenizer
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    fused_kernels: bool = False
    # post: BERT's LayerNorm after each residual add (and on the embeddings), transformers'
    # BertForMaskedLM; pre: Megatron's LayerNorm before each branch plus a final one,
    # MegatronBertForMaskedLM (steadier at 300M+ parameters). Unset in a checkpoint: pre.
    norm_position: str = "pre"

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 0  # 0: whatever the world size leaves after tp and pp
    zero: int = 3  # 0: DDP, 1: + sharded optimizer state, 2: + sharded gradients, 3: + sharded parameters (FSDP)
    hsdp_shard: int = 0  # HSDP (zero 2/3): shard within groups of this many dp ranks, replicate across; 0: off
    cpu_offload: bool = False  # zero 3: parameters, gradients and optimizer state live in CPU memory
    sequence_parallel: bool = True  # only meaningful with tp > 1
    loss_parallel: bool = True  # vocab-parallel cross-entropy; only meaningful with tp > 1
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved1f1b | zero_bubble | zbv; only with pp > 1
    pp_virtual_stages: int = 1  # stages per pp rank (interleaved1f1b, zero_bubble; zbv needs 2)
    pp_split: list = field(default_factory=list)  # layers per stage, e.g. [3, 5, 5, 3]; []: balanced by FLOPs


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    global_batch: int = 16
    micro_batch: int = 4
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 2
    lr_decay: str = "linear"  # linear | cosine | constant
    optimizer: str = "adamw"  # adamw | lamb
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    fused_adamw: bool = False  # AdamW's fused kernel on CPU too (on CUDA it is always used)
    clip_grad: float = 1.0  # 0 disables clipping (the norm is still reported)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: dynamic loss scaling) | auto (bf16 where the device has bf16 units)
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16: dtype of the dp gradient reduction (bf16 halves its traffic)
    loss_scale: float = 65536.0  # fp16: initial loss scale
    loss_scale_window: int = 1000  # fp16: grow the scale x2 after this many steps without inf/nan
    max_skipped_steps: int = 20  # stop when more steps than this in a row had a non-finite loss or gradient
    collective_timeout_s: float = 1800.0  # a collective that waits longer fails the run (a hung or lost rank)
    activation_checkpoint: str = "none"  # none | full | selective (attention core only)
    activation_checkpoint_every: int = 1  # full: checkpoint every k-th block
    compile: str = "auto"  # auto | true | false: per-block torch.compile (auto: on CUDA, off on CPU)
    run_dir: str = "runs/default"
    eval_interval: int = 0  # 0: no validation
    eval_batches: int = 2
    log_interval: int = 1
    tensorboard: bool = False
    peak_tflops: float = 0.0  # per device; 0: look the device up (CPU needs a configured value)
    backend: str = "torch"  # torch | deepspeed (the optional DeepSpeed engine, pip install ".[deepspeed]")
    deepspeed_config: str = ""  # deepspeed: a DeepSpeed JSON config; its ZeRO/offload/precision settings win


@dataclass
class DataConfig:
    path: str = ""  # indexed dataset prefix (PREFIX.bin / PREFIX.idx)
    tokenizer: str = ""  # default: ${data.path}.model
    seq_len: int = 128
    mask_prob: float = 0.15
    max_predictions: int = 0  # masked positions per sequence; 0: ceil(mask_prob * seq_len) + 2
    whole_word_mask: bool = False
    val_fraction: float = 0.01  # share of samples held out for validation
    # Masks drawn anew each epoch (RoBERTa), a pure function of (seed, epoch, sample); false: the
    # same masks every epoch (BERT's static masking).
    dynamic_mask: bool = False
    # Pack consecutive sentences into samples across document boundaries (RoBERTa's FULL-SENTENCES)
    # instead of within one document: short documents then leave no padding.
    cross_documents: bool = False


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps (0: only at the end and on SIGTERM/SIGUSR1)
    minutes: float = 0.0  # and/or every M minutes
    keep_last: int = 3
    keep_every: int = 0  # also keep every K-th step permanently
    enabled: bool = True  # false: no checkpoints at all (benchmarks)
    async_save: bool = False  # write shards in a background thread (a CPU copy of the state meanwhile)
    drop_unknown_modules: bool = False  # loading: drop checkpoint tensors of modules this run lacks
    continue_on_error: bool = False  # a failed save warns and training goes on (default: the run stops)


@dataclass
class KnowledgeConfig:
    """Knowledge-injected samples (rapidnlp/data/knowledge/samples.py) and the knowledge objectives'
    settings (pretrain/mention.py, spo.py, fusion.py). Every cap is a static shape."""
    enabled: bool = False  # samples from PREFIX.knowledge/: [CLS] sentence [SEP] s p o [SEP] ...
    max_triples: int = 4  # linked positive triples packed per sample (and scored by spo)
    triple_budget: int = 32  # tokens of the triple segment, [SEP]s included
    max_mentions: int = 8  # linked mention slots per sample
    negatives: int = 2  # spo: negatives per positive
    corrupt_object_prob: float = 0.5  # spo: a negative corrupts the object (else: a random triple)
    subgraph_nodes: int = 16  # fusion: sub-graph nodes per sample
    subgraph_edges: int = 32  # fusion: sub-graph edges per sample
    joint_mask: bool = True  # mask linked entities as wholes, in both segments at once with q_joint
    q_joint: float = 0.5
    fusion_layer: int = -1  # fusion runs after this block (0-based); -1: the middle block
    gcn_layers: int = 2
    margin: float = 0.2  # spo: hinge margin on cosine scores at the first step
    margin_growth: float = 1.0  # spo: the margin grows linearly to margin x (1 + growth) at the last step
    gain_margin: float = 0.1  # knowledge_gain: nats a masked entity token's loss must drop with the gate open
    # Filled from the data at start (like model.vocab_size): the objectives' table sizes.
    num_entities: int = 0
    num_relations: int = 0
    num_tags: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    # objective name (a module of rapidnlp.pretrain) -> loss weight, in training order
    objectives: dict = field(default_factory=lambda: {"mlm": 1.0})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = [f.name for f in dataclasses.fields(Config)]
# Fields that were removed: the line that says what replaces them.
REMOVED = {
    "parallel.dp_mode": "parallel.dp_mode was removed: set parallel.zero instead (fsdp = 3, ddp = 0)",
}


# Settings a run trains under for good: a resumed checkpoint keeps the value it was written with,
# whatever the config now says. A checkpoint written before a setting existed has its dataclass
# default, which is therefore always the old behaviour; the configs in configs/ set the new one.
RECORDED = (("model", "norm_position"), ("data", "dynamic_mask"), ("data", "cross_documents"),
            ("train", "precision"), ("train", "fused_adamw"))


def keep_recorded(config: Config, saved: dict, where: str) -> list[str]:
    """Set every RECORDED field to the checkpoint's (`saved`: its config.json as a dict; an absent
    field: the old default). Returns a line for each field that the checkpoint changed."""
    changed = []
    for section, key in RECORDED:
        default = getattr(type(getattr(config, section))(), key)
        stored = saved.get(section)
        value = stored.get(key, default) if isinstance(stored, dict) else default
        now = getattr(getattr(config, section), key)
        if value != now:
            apply(config, section, key, value, where)
            changed.append(f"{section}.{key} = {value!r} as the checkpoint was trained (the config says {now!r})")
    return changed


def _finite(where: str, value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected {what}, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: expected {what}, got {value!r}")
    return number


def _coerce(where: str, value: Any, target: Any) -> Any:
    """Convert a TOML value or a command-line string to the type of the field's default."""
    kind = type(target)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        as_float = _finite(where, value, "an integer")
        if as_float != int(as_float):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if kind is list:
        if isinstance(value, str):
            value = [x for x in value.strip().strip("[]").split(",") if x.strip()]
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, e.g. [3, 5], got {value!r}")
        try:
            return [_coerce(where, x, 0) for x in value]
        except UserError:
            raise UserError(f"{where}: expected a list of integers, e.g. [3, 5], got {value!r}") from None
    if kind is float:
        return _finite(where, value, "a finite number")
    return str(value)


def _unknown(where: str, key: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(known))}"
    return UserError(f"{where}: unknown key '{key}'{hint}")


def apply(config: Config, section: str, key: str, value: Any, where: str) -> None:
    """Set config.section.key = value (coerced), with errors that name the field."""
    if section not in SECTIONS:
        raise _unknown(where, section, list(SECTIONS))
    if f"{section}.{key}" in REMOVED:
        raise UserError(f"{where}: {REMOVED[section + '.' + key]}")
    if section == "objectives":
        config.objectives[key] = _coerce(f"{where}: objectives.{key}", value, 0.0)
        return
    obj = getattr(config, section)
    names = [f.name for f in dataclasses.fields(obj)]
    if key not in names:
        raise _unknown(where, f"{section}.{key}", [f"{section}.{n}" for n in names])
    setattr(obj, key, _coerce(f"{where}: {section}.{key}", value, getattr(obj, key)))


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML file (or the defaults) and apply `--section.field value` overrides. A file
    with an [objectives] table replaces the default objectives (mlm = 1.0) with its own."""
    config = Config()
    if path:
        if not os.path.isfile(path):
            raise UserError(f"{path}: config file not found")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: not valid TOML ({e})") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise _unknown(path, section, list(SECTIONS))
            if section == "objectives":
                config.objectives = {}
            for key, value in values.items():
                apply(config, section, key, value, path)
    for section, key, value in parse_overrides(overrides or []):
        apply(config, section, key, value, "command line")
    if not config.data.tokenizer and config.data.path:
        config.data.tokenizer = config.data.path + ".model"
    return config


def to_toml(config: Config) -> str:
    """The whole config as TOML that load_config reads back to an equal Config."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v), ensure_ascii=False)

    out = []
    for section, values in config.to_dict().items():
        out.append(f"[{section}]")
        out += [f"{key} = {value(v)}" for key, v in values.items()]
        out.append("")
    return "\n".join(out)


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """`--train.steps 20 --model.fused_kernels=true` -> [(train, steps, 20), (model, fused_kernels, true)]."""
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"command line: expected --section.field value, got '{arg}'")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise UserError(f"command line: --{name} needs a value")
            value = args[i + 1]
            i += 2
        section, key = name.split(".", 1)
        out.append((section, key, value))
    return out


def resolve_layout(config: Config, world_size: int) -> None:
    """Check the layout arithmetic for a given world size and fill parallel.dp when it is 0.

    Every violation is one line naming the field. Runs before any process group exists.
    """
    m, p, t = config.model, config.parallel, config.train
    for name, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp)):
        if value < 1:
            raise UserError(f"{name} = {value}: must be at least 1")
    if p.dp == 0:
        if world_size % (p.tp * p.pp):
            raise UserError(
                f"world size {world_size} is not divisible by parallel.tp ({p.tp}) x parallel.pp ({p.pp})"
            )
        p.dp = world_size // (p.tp * p.pp)
    if p.pp * p.dp * p.tp != world_size:
        raise UserError(
            f"parallel.pp ({p.pp}) x parallel.dp ({p.dp}) x parallel.tp ({p.tp}) = {p.pp * p.dp * p.tp}, "
            f"but the world size is {world_size}"
        )
    if p.zero not in (0, 1, 2, 3):
        raise UserError(f"parallel.zero = {p.zero}: choose 0, 1, 2 or 3")
    if p.zero == 1 and p.tp > 1:
        raise UserError(
            "parallel.zero = 1 with parallel.tp > 1: torch 2.13's ZeroRedundancyOptimizer cannot hold DTensor "
            "parameters; use parallel.zero = 2 (sharded gradients and optimizer state)"
        )
    if p.hsdp_shard:
        if p.zero < 2:
            raise UserError(f"parallel.hsdp_shard = {p.hsdp_shard} needs parallel.zero = 2 or 3")
        if p.dp % p.hsdp_shard:
            raise UserError(f"parallel.dp ({p.dp}) is not divisible by parallel.hsdp_shard ({p.hsdp_shard})")
    if p.cpu_offload and p.zero != 3 and t.backend != "deepspeed":
        raise UserError("parallel.cpu_offload needs parallel.zero = 3 (FSDP2's CPUOffloadPolicy)")
    if m.num_heads % p.tp:
        raise UserError(f"model.num_heads ({m.num_heads}) is not divisible by parallel.tp ({p.tp})")
    if m.hidden_size % m.num_heads:
        raise UserError(f"model.hidden_size ({m.hidden_size}) is not divisible by model.num_heads ({m.num_heads})")
    if m.hidden_size % p.tp:
        raise UserError(f"model.hidden_size ({m.hidden_size}) is not divisible by parallel.tp ({p.tp})")
    if m.ffn_size % p.tp:
        raise UserError(f"model.ffn_size ({m.ffn_size}) is not divisible by parallel.tp ({p.tp})")
    if p.tp > 1 and p.sequence_parallel and config.data.seq_len % p.tp:
        raise UserError(
            f"data.seq_len ({config.data.seq_len}) is not divisible by parallel.tp ({p.tp}), "
            "which sequence parallelism needs; set parallel.sequence_parallel = false or change data.seq_len"
        )
    if config.data.seq_len > m.max_position_embeddings:
        raise UserError(
            f"data.seq_len ({config.data.seq_len}) exceeds model.max_position_embeddings ({m.max_position_embeddings})"
        )
    if t.micro_batch < 1 or t.global_batch < 1:
        raise UserError("train.micro_batch and train.global_batch must be at least 1")
    if t.global_batch % (t.micro_batch * p.dp):
        raise UserError(
            f"train.global_batch ({t.global_batch}) is not divisible by train.micro_batch ({t.micro_batch}) "
            f"x parallel.dp ({p.dp}); global batch = micro batch x accumulation steps x dp"
        )
    if t.precision not in ("fp32", "bf16", "fp16", "auto"):
        raise UserError(f"train.precision = '{t.precision}': choose fp32, bf16, fp16 or auto")
    if t.grad_reduce_dtype not in ("fp32", "bf16"):
        raise UserError(f"train.grad_reduce_dtype = '{t.grad_reduce_dtype}': choose fp32 or bf16")
    t.compile = t.compile.lower()  # a TOML `compile = true` arrives as "True"
    if t.compile not in ("auto", "true", "false"):
        raise UserError(f"train.compile = '{t.compile}': choose auto, true or false")
    if t.backend not in ("torch", "deepspeed"):
        raise UserError(f"train.backend = '{t.backend}': choose torch or deepspeed")
    if t.backend == "deepspeed":
        _check_deepspeed(config)
    if t.activation_checkpoint not in ("none", "full", "selective"):
        raise UserError(f"train.activation_checkpoint = '{t.activation_checkpoint}': choose none, full or selective")
    if t.activation_checkpoint_every < 1:
        raise UserError("train.activation_checkpoint_every must be at least 1")
    if t.max_skipped_steps < 0:
        raise UserError(f"train.max_skipped_steps = {t.max_skipped_steps}: must be at least 0")
    if not t.collective_timeout_s > 0:
        raise UserError(f"train.collective_timeout_s = {t.collective_timeout_s}: must be more than 0 seconds")
    if t.optimizer not in ("adamw", "lamb"):
        raise UserError(f"train.optimizer = '{t.optimizer}': choose adamw or lamb")
    if t.lr_decay not in ("linear", "cosine", "constant"):
        raise UserError(f"train.lr_decay = '{t.lr_decay}': choose linear, cosine or constant")
    if config.data.cross_documents and config.knowledge.enabled:
        raise UserError("data.cross_documents with knowledge.enabled: knowledge samples are one document's "
                        "sentences with their linked triples; set data.cross_documents = false")
    if config.model.norm_position not in ("post", "pre"):
        raise UserError(f"model.norm_position = '{config.model.norm_position}': choose post (BERT) or pre (Megatron)")
    if not 0.0 < config.data.mask_prob < 1.0:
        raise UserError(f"data.mask_prob ({config.data.mask_prob}) must be between 0 and 1")
    if p.pp > 1:
        _check_pipeline(config)
    _check_objectives(config)
    _check_knowledge(config)


KNOWLEDGE_OBJECTIVES = ("mention", "spo", "fusion", "knowledge_gain")


def fusion_layer(config: Config) -> int:
    k = config.knowledge
    return k.fusion_layer if k.fusion_layer >= 0 else max(0, config.model.num_layers // 2 - 1)


def _check_knowledge(config: Config) -> None:
    k, seq = config.knowledge, config.data.seq_len
    needs = [name for name in config.objectives if name in KNOWLEDGE_OBJECTIVES]
    if needs and not k.enabled:
        raise UserError(f"objectives.{needs[0]} needs knowledge samples: set knowledge.enabled = true "
                        "(and a dataset prepared with its PREFIX.knowledge/ folder)")
    if not k.enabled:
        return
    if "knowledge_gain" in config.objectives:
        if "fusion" not in config.objectives:
            raise UserError("objectives.knowledge_gain compares the MLM loss with the fusion gate open and shut: "
                            "it needs objectives.fusion")
        if config.model.fused_kernels:
            raise UserError("objectives.knowledge_gain needs each masked token's loss; model.fused_kernels decodes "
                            "them summed, chunk by chunk: set model.fused_kernels = false")
    for name in ("max_triples", "max_mentions", "negatives", "subgraph_nodes", "subgraph_edges", "gcn_layers"):
        if getattr(k, name) < 1:
            raise UserError(f"knowledge.{name} = {getattr(k, name)}: must be at least 1")
    if not 4 <= k.triple_budget <= seq - 8:
        raise UserError(f"knowledge.triple_budget = {k.triple_budget}: must be between 4 and data.seq_len - 8 "
                        f"({seq - 8}); the sentence needs the rest of the sequence")
    if not fusion_layer(config) < config.model.num_layers:
        raise UserError(f"knowledge.fusion_layer = {k.fusion_layer} is beyond the model's depth "
                        f"(model.num_layers = {config.model.num_layers}; blocks 0..{config.model.num_layers - 1})")
    for name in ("q_joint", "corrupt_object_prob"):
        if not 0.0 <= getattr(k, name) <= 1.0:
            raise UserError(f"knowledge.{name} = {getattr(k, name)}: must be between 0 and 1")


def _check_objectives(config: Config) -> None:
    """Each objective is a module of rapidnlp.pretrain (found without importing torch); the
    masked-LM objective is always there (the engine pretrains and exports a masked LM)."""
    import importlib.util

    if "mlm" not in config.objectives:
        raise UserError("objectives: mlm is missing; every run trains the masked-LM objective "
                        "(its weight may be 0)")
    for name, weight in config.objectives.items():
        if not name.isidentifier() or name in ("objective",) or \
                importlib.util.find_spec(f"rapidnlp.pretrain.{name}") is None:
            raise UserError(f"objectives.{name}: no such objective (a module pretrain/{name}.py "
                            "exporting OBJECTIVE)")
        if weight < 0:
            raise UserError(f"objectives.{name} = {weight}: a loss weight must be at least 0")


def _check_deepspeed(config: Config) -> None:
    """What the DeepSpeed backend runs: its own engine over data parallelism (ZeRO 0-3, CPU
    offload); tensor and pipeline parallelism stay with the torch backend."""
    p, t = config.parallel, config.train
    if p.pp > 1 and p.zero >= 2:
        raise UserError(
            f"train.backend = deepspeed with parallel.pp > 1 and parallel.zero = {p.zero}: DeepSpeed's pipeline "
            "engine cannot combine with ZeRO-2/3; use train.backend = torch (pipelines compose with ZeRO-2/3 there)"
        )
    if p.pp > 1 or p.tp > 1:
        raise UserError(
            "train.backend = deepspeed runs data parallelism only (parallel.tp = 1, parallel.pp = 1); "
            "use train.backend = torch for tensor and pipeline parallelism"
        )
    if p.hsdp_shard:
        raise UserError("train.backend = deepspeed: parallel.hsdp_shard is torch's HSDP; DeepSpeed's is hpZ in its JSON config")
    if t.optimizer != "adamw":
        raise UserError(f"train.backend = deepspeed: train.optimizer = {t.optimizer} is not offered; use adamw")
    if t.compile == "true":
        raise UserError("train.backend = deepspeed: train.compile = true is the torch backend's; set it to auto or false")
    if t.deepspeed_config and not os.path.isfile(t.deepspeed_config):
        raise UserError(f"train.deepspeed_config: {t.deepspeed_config} not found")
    if p.cpu_offload and p.zero == 0:
        raise UserError("train.backend = deepspeed: parallel.cpu_offload needs parallel.zero >= 1 "
                        "(DeepSpeed's offload_optimizer is a ZeRO feature)")
    if config.checkpoint.enabled and config.checkpoint.async_save:
        raise UserError("checkpoint.async_save: train.backend = deepspeed saves synchronously (DeepSpeed writes "
                        "its own files); set checkpoint.async_save = false")
    from rapidnlp.deepspeed_config import deepspeed_config  # torch-free

    ds = deepspeed_config(config)  # the user's JSON, checked before any process starts
    if config.model.fused_kernels and ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise UserError("model.fused_kernels with DeepSpeed ZeRO-3: the fused MLM loss decodes after the forward, when "
                        "ZeRO-3 has released the decoder; use ZeRO stage 2 or train.backend = torch (FSDP)")


def accumulation_steps(config: Config) -> int:
    t = config.train
    return t.global_batch // (t.micro_batch * config.parallel.dp)


def max_predictions(config: Config) -> int:
    d = config.data
    return d.max_predictions or math.ceil(d.mask_prob * d.seq_len) + 2


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "zero_bubble", "zbv")
ZERO_BUBBLE = ("zero_bubble", "zbv")  # split backward (input, then weight gradients)


def pp_split_counts(p: ParallelConfig) -> list[int]:
    """parallel.pp_split: layer counts per stage; [] when unset (balanced by FLOPs)."""
    return list(p.pp_split)


def _check_pipeline(config: Config) -> None:
    """Pipeline layout arithmetic (pp > 1): schedule, stages, layer split, micro-batches."""
    m, p = config.model, config.parallel
    if p.pp_schedule not in PP_SCHEDULES:
        raise UserError(f"parallel.pp_schedule = '{p.pp_schedule}': choose {', '.join(PP_SCHEDULES)}")
    v = p.pp_virtual_stages
    if v < 1:
        raise UserError(f"parallel.pp_virtual_stages = {v}: must be at least 1")
    if p.pp_schedule in ("gpipe", "1f1b") and v != 1:
        raise UserError(
            f"parallel.pp_virtual_stages = {v} needs an interleaved schedule: set parallel.pp_schedule "
            "to interleaved1f1b or zero_bubble, or parallel.pp_virtual_stages = 1"
        )
    if p.pp_schedule == "zbv" and v != 2:
        raise UserError("parallel.pp_schedule = zbv places exactly 2 stages per rank: set parallel.pp_virtual_stages = 2")
    if p.pp_schedule in ("zero_bubble", "zbv") and p.zero == 3 and (p.dp > 1 or p.cpu_offload):
        raise UserError(
            f"parallel.pp_schedule = {p.pp_schedule} with parallel.zero = 3: torch 2.13's split backward (weight "
            "gradients after input gradients) loses gradients of parameters FSDP reshards after forward; "
            "use parallel.zero = 2 or 0, or another schedule"
        )
    if p.zero == 1 and p.dp > 1:
        raise UserError(
            "parallel.zero = 1 with parallel.pp > 1: pipeline stages are data-parallel through the composable "
            "replicate (DTensor parameters), which torch 2.13's ZeroRedundancyOptimizer cannot hold; "
            "use parallel.zero = 2"
        )
    if p.pp_schedule in ZERO_BUBBLE and config.train.compile == "true":
        raise UserError(
            f"parallel.pp_schedule = {p.pp_schedule} with train.compile = true: compiled blocks cannot split their "
            "backward into input and weight gradients, which zero-bubble schedules do; use 1f1b or interleaved1f1b, "
            "or train.compile = false"
        )
    stages = p.pp * v
    counts = pp_split_counts(p)
    if counts:
        if len(counts) != stages or min(counts) < 1 or sum(counts) != m.num_layers:
            raise UserError(
                f"parallel.pp_split = {p.pp_split}: needs {stages} counts (parallel.pp x parallel.pp_virtual_stages), "
                f"each at least 1, summing to model.num_layers ({m.num_layers})"
            )
    elif m.num_layers % stages:
        raise UserError(
            f"model.num_layers ({m.num_layers}) is not divisible by parallel.pp ({p.pp}) x parallel.pp_virtual_stages "
            f"({v}); change them or give explicit layer counts per stage in parallel.pp_split"
        )
    n = accumulation_steps(config)
    where = f"{n} micro-batches per step (train.global_batch / (train.micro_batch x parallel.dp))"
    if p.pp_schedule == "1f1b" and n < p.pp:
        raise UserError(
            f"{where}, but parallel.pp_schedule = 1f1b needs at least parallel.pp ({p.pp}); "
            "raise train.global_batch, lower train.micro_batch, or use gpipe"
        )
    rounds = max(1, n // p.pp)
    if p.pp_schedule in ("interleaved1f1b", "zero_bubble") and n % rounds:
        raise UserError(
            f"{where} do not form equal rounds of parallel.pp ({p.pp}), which parallel.pp_schedule = "
            f"{p.pp_schedule} needs: use fewer than parallel.pp or a multiple of it"
        )
