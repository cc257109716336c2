"""A worker for the multi-process training tests: one launched world runs several layouts.

    python tests/train_worker.py SPEC.json OUT.json

SPEC: {"data": PREFIX, "base": {"section.field": value, ...},
       "runs": [{"name": ..., "overrides": {...}, "dense_twin": bool, "table_unit": bool,
                 "inject": {"step": k, "value": "inf"|"nan", "into": "loss"|"grad", "rank": r}}, ...]}
Rank 0 writes OUT: {name: [metric rows]}; with dense_twin, the TP-vs-dense comparison instead;
with table_unit, where the entity table is gathered under FSDP.
Every rank ends through shutdown(), never through interpreter exit (ARCHITECTURE.md).
"""
import json
import sys
import warnings
from typing import Callable

import torch

from rapidnlp.config import Config, apply, resolve_layout
from rapidnlp.distributed.bootstrap import init_distributed, shutdown
from rapidnlp.distributed.mesh import ParallelDims

warnings.filterwarnings("ignore")


def make_config(data: str, overrides: dict, world: int) -> Config:
    config = Config()
    config.checkpoint.enabled = False  # the worker drives the Trainer without a Checkpointer
    config.data.path, config.data.tokenizer = data, data + ".model"
    for name, value in overrides.items():
        section, key = name.split(".")
        apply(config, section, key, value, "test")
    resolve_layout(config, world)
    return config


def dense_twin_check(config: Config) -> dict:
    """Each parameter's gradient, the head's output (logits, or the fused head's transformed
    states) and the MLM loss of a TP model against the same model unsharded, each forward from
    the same RNG state (dropout draws alike); and the Triton launches of the TP model's step."""
    from contextlib import nullcontext

    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from rapidnlp import kernels
    from rapidnlp.parallel import parallelize, uses_loss_parallel
    from rapidnlp.parallel.tensor_parallel import reduce_partial_grads
    from rapidnlp.pretrain.objective import build_model, build_objectives
    from rapidnlp.train.trainer import load_data

    data = load_data(config)
    batch = data.train.collate(range(4))
    dense_objectives, objectives = build_objectives(config), build_objectives(config)  # each decodes with its head
    torch.manual_seed(0)
    dense = build_model(config, dense_objectives)
    torch.manual_seed(0)
    model = build_model(config, objectives)
    args = (batch["input_ids"], batch["attention_mask"], *(batch[k] for k in model.field_names))
    dims = ParallelDims.from_config(config.parallel)
    model = parallelize(model, dims, config.parallel, config.train)

    def mlm_loss(o, outputs):
        return o[0].loss_sum(dict(zip(dense.head_names, outputs)), batch)

    torch.manual_seed(5)
    dense_out = dense(*args)[0]
    dense_loss = mlm_loss(dense_objectives, (dense_out,))
    dense_loss.backward()
    kernels.reset_launch_counts()
    torch.manual_seed(5)
    with loss_parallel() if uses_loss_parallel(dims, config.parallel) else nullcontext():
        out = model(*args)[0]
        loss = mlm_loss(objectives, (out,))
        loss.backward()
    launches = kernels.launch_counts()
    reduce_partial_grads(list(model.parameters()))

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    dense_grads = dict(dense.named_parameters())
    grad_diff = {}
    for name, p in model.named_parameters():
        ref = dense_grads[name].grad
        grad_diff[name] = float((full(p.grad) - ref).abs().max() / (ref.abs().max() + 1e-12))
    sharded = {name: list(p.to_local().shape) for name, p in model.named_parameters() if isinstance(p, DTensor)}
    return {
        "logits_max_abs_diff": float((full(out).detach() - dense_out.detach()).abs().max()),
        "loss_rel_diff": float(abs(float(full(loss)) - float(dense_loss)) / abs(float(dense_loss))),
        "grad_rel_diff": grad_diff,
        "local_shapes": sharded,
        "full_shapes": {name: list(p.shape) for name, p in dense.named_parameters()},
        "launch_counts": launches,
    }


def table_unit_check(config: Config) -> dict:
    """The entity table under FSDP, over one training step: whether the fusion module's and the SPO
    head's table share one unit of its own, and, at points of the step, whether the table is
    sharded there (a DTensor) or gathered whole."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    from rapidnlp.train.trainer import Trainer

    trainer = Trainer(config, ParallelDims.from_config(config.parallel), stream=open("/dev/null", "w"))
    model = trainer.parts.model
    fusion, spo = model.knowledge_fusion, model.spo_head
    sharded = {}

    def record(point):
        return lambda *_: sharded.__setitem__(point, isinstance(fusion.entities.weight, DTensor))

    first, last = model.layers["0"], model.layers[str(len(model.layers) - 1)]
    first.register_forward_pre_hook(record("block 0"))
    fusion.gcn[0].register_forward_pre_hook(record("fusion, after its lookup"))
    last.register_forward_pre_hook(record("last block"))
    spo.triple.register_forward_pre_hook(record("SPO head, after its lookup"))
    model.register_forward_hook(record("after the forward"))
    trainer.fit()
    record("after the step")()
    return {"own_units": all(isinstance(m, FSDPModule) for m in (fusion.entities, spo.entities)),
            "one_unit": fully_shard.state(fusion.entities) is fully_shard.state(spo.entities),
            "root_unit": fully_shard.state(fusion.entities) is fully_shard.state(model),
            "sharded": sharded}


def inject(trainer, step: int, value: str = "inf", into: str = "loss", rank: int | None = None) -> None:
    """Make optimizer step `step` (1-based) non-finite on `rank` (default: every rank) in the loss
    function, which every layout's step calls (the pipeline schedule's too, on the last stage):
    into="loss" multiplies the loss by `value` (an fp16 overflow, a diverged loss); into="grad"
    leaves the loss alone and multiplies its gradient, so only the gradients are non-finite."""
    import torch.distributed as dist

    base = type(trainer.loss_fn)
    poison = float(value)

    class Injected(base):
        def __call__(self, outputs, index):
            loss = base.__call__(self, outputs, index)
            if trainer.step != step - 1 or rank not in (None, dist.get_rank()):
                return loss
            if into == "loss":
                return loss * poison
            loss.register_hook(lambda g: g * poison)
            return loss

    trainer.loss_fn.__class__ = Injected


def run_layouts(run_one: Callable[[dict, Config], object], *, timeout_s: float = 120) -> None:
    """Run SPEC's layouts (argv[1]) one after another in this launched world, each as
    run_one(run, config); rank 0 writes {name: result} to OUT (argv[2]). Ends through shutdown()."""
    spec = json.load(open(sys.argv[1]))
    env = init_distributed(timeout_s=timeout_s)
    torch.set_num_threads(1)
    out = {}
    code = 0
    try:
        for run in spec["runs"]:
            config = make_config(spec["data"], {**spec["base"], **run["overrides"]}, env.world_size)
            out[run["name"]] = run_one(run, config)
        if env.rank == 0:
            with open(sys.argv[2], "w") as f:
                json.dump(out, f)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    shutdown(code)


def train_run(run: dict, config: Config):
    if run.get("dense_twin"):
        return dense_twin_check(config)
    if run.get("table_unit"):
        return table_unit_check(config)
    from rapidnlp.train.trainer import Trainer

    if config.train.compile == "true":
        # Each run compiles afresh: the runs of one world would otherwise share this process's
        # compiled graphs and Dynamo's recompile limit (past it, blocks silently run eagerly).
        torch._dynamo.reset()
    trainer = Trainer(config, ParallelDims.from_config(config.parallel), stream=open("/dev/null", "w"))
    if "inject" in run:
        inject(trainer, **run["inject"])
    return trainer.fit()


if __name__ == "__main__":
    run_layouts(train_run)
