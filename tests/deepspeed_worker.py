"""A worker for the DeepSpeed backend tests: one launched world runs several configurations.

    python tests/deepspeed_worker.py SPEC.json OUT.json

SPEC and the spec loop are tests/train_worker.py's. Runs whose config says train.backend =
deepspeed go through DeepSpeedTrainer, the rest through Trainer. A run with "checkpoint_interval"
saves DeepSpeed-backend checkpoints into its train.run_dir; one with "resume" (a checkpoint
folder) starts from it. Each run's result in OUT is {"rows": [metric rows]} and
"torch_load_weights_only" (the weights_only argument of every torch.load call the run made), plus
for DeepSpeed "stage" and "optimizer" (what the engine really ran) and, when it built
DeepSpeedCPUAdam, "op_load_seconds" (its JIT compile, or the cached load); or {"error": the
UserError's line}.
"""
import torch

from rapidnlp.config import Config
from rapidnlp.distributed.mesh import ParallelDims
from rapidnlp.errors import UserError
from train_worker import run_layouts


def run_one(run: dict, config: Config) -> dict:
    if config.train.backend == "deepspeed":
        from rapidnlp.train.deepspeed_backend import DeepSpeedTrainer as cls
    else:
        from rapidnlp.train.trainer import Trainer as cls
    try:
        trainer = cls(config, ParallelDims.from_config(config.parallel), stream=open("/dev/null", "w"))
    except UserError as e:  # every rank raises it, before any collective DeepSpeed would start
        return {"error": str(e)}
    checkpointer = None
    if "checkpoint_interval" in run or "resume" in run:
        from rapidnlp.train.deepspeed_checkpoint import DeepSpeedCheckpointer

        checkpointer = DeepSpeedCheckpointer(config.train.run_dir, interval=run.get("checkpoint_interval", 0),
                                             tokenizer=config.data.tokenizer)
    loads = []  # weights_only of every torch.load call during the run
    original = torch.load

    def recorded_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    torch.load = recorded_load  # DeepSpeed's modules call torch.load through the module attribute
    try:
        result = {"rows": trainer.fit(checkpointer, run.get("resume")), "torch_load_weights_only": loads}
    except UserError as e:  # a refused resume: every rank raises it, before DeepSpeed reads a file
        return {"error": str(e)}
    finally:
        torch.load = original
    if hasattr(trainer, "base_optimizer"):
        result.update(stage=trainer.model.zero_optimization_stage(), optimizer=type(trainer.base_optimizer).__name__)
    if hasattr(trainer, "op_load_seconds"):
        result["op_load_seconds"] = trainer.op_load_seconds
    return result


if __name__ == "__main__":
    run_layouts(run_one, timeout_s=300)  # a cold cpu_adam build holds the ranks a few minutes
