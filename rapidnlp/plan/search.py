"""`rapidnlp plan`: every layout the engine accepts on N GPUs (the config's own validation decides),
each predicted by the cost model (cost.py), ranked by tokens/s among those that fit; the best is
written as a config `rapidnlp pretrain` loads. User errors are one line (UserError)."""
from __future__ import annotations

import copy
import functools

from rapidnlp.config import Config, max_predictions, resolve_layout, to_toml
from rapidnlp.errors import UserError
from rapidnlp.plan.cost import TERMS, Cluster, Layout, Prediction, Shape, predict

SCHEDULES = (("1f1b", 1), ("interleaved1f1b", 2), ("interleaved1f1b", 4), ("zero_bubble", 2), ("gpipe", 1))
CHECKPOINTING = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8, 16)


def gpt_config(layers: int, hidden: int, heads: int, *, seq: int = 2048, vocab: int = 51200) -> Config:
    """A GPT-shaped model as this engine's config (ffn 4h; the planner treats it as causal)."""
    config = Config()
    m = config.model
    m.num_layers, m.hidden_size, m.num_heads, m.ffn_size = layers, hidden, heads, 4 * hidden
    m.vocab_size, m.max_position_embeddings = vocab, seq
    config.data.seq_len = seq
    config.train.precision = "bf16"
    return config


class Planner:
    """One model on one cluster: the shape and the per-rank parameter counts, computed once."""

    def __init__(self, config: Config, cluster: Cluster, *, causal: bool = False):
        from rapidnlp.train.memory import meta_model

        self.source = config  # what the written config starts from (vocabulary left to the tokenizer)
        self.config, self.cluster, self.causal = copy.deepcopy(config), cluster, causal
        config = self.config
        m, seq = config.model, config.data.seq_len
        if m.vocab_size == 0:
            m.vocab_size = 30592  # as `rapidnlp params`: configs that take it from the tokenizer
        self.model = meta_model(config)
        if causal:  # every position predicted through the tied vocabulary projection
            head_flops, predicted = 6.0 * m.hidden_size * m.padded_vocab_size * seq, seq
        else:
            head_flops = sum(p.flops_per_sequence for p in self.model.pieces.values())
            predicted = max_predictions(config)
        self.shape = Shape(m.num_layers, m.hidden_size, m.num_heads, m.ffn_size, m.padded_vocab_size, seq,
                           head_flops, predicted, compute_bytes=4 if config.train.precision == "fp32" else 2,
                           dropout=m.dropout > 0 or m.attention_dropout > 0)

    @functools.lru_cache(maxsize=None)
    def _rank_parameters(self, tp: int, pp: int, virtual: int, schedule: str, split: tuple) -> float:
        from rapidnlp.train.memory import rank_parameter_count

        config = copy.deepcopy(self.config)
        config.parallel.pp_split = list(split)
        return rank_parameter_count(self.model, config, tp=tp, pp=pp, virtual=virtual, schedule=schedule)

    def predict(self, layout: Layout, global_batch: int, terms: tuple = TERMS) -> Prediction:
        from rapidnlp.train.memory import state_bytes

        count = self._rank_parameters(layout.tp, layout.pp, layout.virtual, layout.schedule, tuple(layout.split))
        state = state_bytes(count, dp=layout.dp, zero=layout.zero)
        return predict(self.shape, layout, self.cluster, global_batch, state=state, terms=terms)

    def layout_config(self, layout: Layout, global_batch: int, base: Config | None = None) -> Config:
        """`base` (the planned model's config) running `layout`; UserError where the engine refuses it."""
        base = base or self.config
        config = copy.copy(base)  # only the parallel and train sections change
        config.parallel, config.train = copy.copy(base.parallel), copy.copy(base.train)
        p, t = config.parallel, config.train
        p.tp, p.pp, p.dp, p.zero = layout.tp, layout.pp, layout.dp, layout.zero
        p.pp_schedule, p.pp_virtual_stages, p.pp_split = layout.schedule, layout.virtual, list(layout.split)
        p.sequence_parallel, p.hsdp_shard, p.cpu_offload = layout.sequence_parallel, 0, False
        t.micro_batch, t.global_batch, t.activation_checkpoint = layout.micro_batch, global_batch, layout.checkpoint
        resolve_layout(config, layout.tp * layout.pp * layout.dp)
        return config

    def layouts(self, gpus: int, global_batch: int):
        """Every layout of `gpus` ranks the engine accepts."""
        for tp in _divisors(gpus):
            for pp in _divisors(gpus // tp):
                dp = gpus // (tp * pp)
                for schedule, virtual in (SCHEDULES if pp > 1 else (("1f1b", 1),)):
                    for zero in (0, 1, 2, 3):
                        for mb in MICRO_BATCHES:
                            for ac in CHECKPOINTING:
                                layout = Layout(tp, pp, dp, zero, mb, schedule, virtual, ac)
                                try:
                                    self.layout_config(layout, global_batch)
                                except UserError:
                                    continue
                                yield layout

    def plan(self, gpus: int, global_batch: int) -> list[Prediction]:
        """Predictions of every accepted layout, fitting ones first, fastest first."""
        if gpus < 1:
            raise UserError(f"--gpus {gpus}: must be at least 1")
        preds = [self.predict(layout, global_batch) for layout in self.layouts(gpus, global_batch)]
        if not preds:
            raise UserError(
                f"no layout of this model uses {gpus} GPUs with global batch {global_batch}: tp must divide "
                f"heads ({self.shape.heads}), hidden and ffn, pp the layers ({self.shape.layers}), and global "
                f"batch = micro batch x accumulation x dp; use fewer GPUs or another --global-batch")
        preds.sort(key=lambda q: (not q.fits, -q.tokens_per_s if q.fits else q.peak_bytes))
        if not preds[0].fits:
            least = preds[0]
            raise UserError(
                f"the model fits no layout on {gpus} x {self.cluster.gpu.name} ({self.cluster.gpu.hbm_gib:g} GiB): the "
                f"smallest needs {least.peak_bytes / 2**30:.1f} GiB per GPU ({least.layout.name()}), "
                f"{least.usable_bytes / 2**30:.1f} GiB usable; add GPUs or use a larger GPU")
        return preds


def layout_of(config: Config) -> Layout:
    """The layout a (resolved) config runs."""
    p, t = config.parallel, config.train
    return Layout(p.tp, p.pp, p.dp, p.zero, t.micro_batch, p.pp_schedule, p.pp_virtual_stages, t.activation_checkpoint,
                  p.sequence_parallel, tuple(p.pp_split), t.activation_checkpoint_every)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def table(preds: list[Prediction], peak_flops: float, limit: int = 15) -> str:
    """The ranked table `rapidnlp plan` prints."""
    lines = [f"{'#':>3} {'layout':<44}{'tokens/s':>12}{'step s':>9}{'model TF/s':>11}{'hw TF/s':>9}{'MFU':>7}"
             f"{'GiB/GPU':>9}  fits"]
    for i, q in enumerate(preds[:limit], 1):
        lines.append(f"{i:>3} {q.layout.name():<44}{q.tokens_per_s:>12,.0f}{q.step_s:>9.3f}{q.model_tflops:>11.1f}"
                     f"{q.hardware_tflops:>9.1f}{q.model_tflops * 1e12 / peak_flops:>7.1%}"
                     f"{q.peak_bytes / 2**30:>9.1f}  {'yes' if q.fits else 'no'}")
    return "\n".join(lines)


def write_config(planner: Planner, best: Prediction, global_batch: int, path: str) -> None:
    with open(path, "w") as f:
        f.write(f"# written by `rapidnlp plan`: {best.layout.name()}, predicted {best.tokens_per_s:,.0f} tokens/s, "
                f"{best.peak_bytes / 2**30:.1f} GiB per GPU\n")
        config = planner.layout_config(best.layout, global_batch, base=copy.deepcopy(planner.source))
        if config.data.tokenizer == config.data.path + ".model":
            config.data.tokenizer = ""  # derived again from data.path, which a run may override
        f.write(to_toml(config))
