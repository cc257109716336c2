"""Checkpoints of the DeepSpeed backend, in this engine's folder conventions, loaded without
unpickling code.

    <run_dir>/checkpoints/step_N/
        deepspeed/                 DeepSpeed's own engine.save_checkpoint (tag "deepspeed"): its model
                                   states and each rank's ZeRO partition of the fp32 master weights and
                                   optimizer state (torch.save pickles)
        .metadata, __*.distcp      DCP: the full fp32 master weights as "model.<name>", named as every
                                   checkpoint of this engine names them (`rapidnlp convert` reads these)
        meta.json                  as rapidnlp.train.checkpoint's, with kind "deepspeed" and zero_stage
        config.json, tokenizer.model, rng/rank_R.json

The temporary folder, the rename, `latest`, the manifest, pruning and the step, sampler and RNG
states are Checkpointer's. What goes in differs: DeepSpeed's own files, from which DeepSpeed
restores its engine (partitions, optimizer state, step counters, loss scale) bit for bit at the
same layout, and the gathered weights, from which `rapidnlp convert` makes a native or HF folder
without reading a pickle.

DeepSpeed reads its files through its checkpoint engine: ours reads them with
torch.load(weights_only=True), admitting, for that load only, the four DeepSpeed classes its files
hold besides tensors and containers (`deepspeed_globals`, measured on ZeRO 0-3 in fp32, bf16 and
fp16). A file that needs anything else is refused with one line; rank 0 checks every file so
before any rank loads, so that all stop together, outside DeepSpeed's collectives.

Must not: unpickle anything with weights_only=False; resume at another layout or ZeRO stage
(DeepSpeed's partitions are per dp rank; convert and start from the weights instead); import
deepspeed at module level (rapidnlp.train.deepspeed_backend.import_deepspeed sets it up first).
"""
from __future__ import annotations

import os
import pickle
import re

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from rapidnlp.errors import UserError
from rapidnlp.train.checkpoint import (DEEPSPEED_KIND, Checkpointer, check_shapes, checked_on_rank0, layout,
                                       stored_tensors, verify)

TAG = "deepspeed"  # the sub-folder DeepSpeed writes its files into
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed copies them beside it (ZeRO, bf16)


def deepspeed_globals() -> list[type]:
    """The classes DeepSpeed 0.19.8's checkpoint files hold besides tensors, dtypes and containers:
    plain data (a dataclass, an IntEnum, loss scalers' attributes), rebuilt without running code of
    theirs. Measured by loading every file of ZeRO 0-3 checkpoints in fp32, bf16 and fp16."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location=None, *, mmap: bool = False):
    """torch.load(weights_only=True) of one of DeepSpeed's files, with only deepspeed_globals()
    admitted (for this call alone); anything else is one UserError line. With mmap, the tensors'
    bytes are not read (a check of the pickle alone)."""
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to unpickle ({_reason(e)}); "
                        "DeepSpeed checkpoints are read without running code from them") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path}: unreadable ({e.__class__.__name__}: {first})") from None


def _reason(e: pickle.UnpicklingError) -> str:
    """What torch's weights_only unpickler refused, from its many-line message."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it names {found.group(1)}, not an allowed type"
    lines = [line.strip() for line in text.splitlines() if "nsupported" in line] or text.strip().splitlines()
    return lines[0] if lines else e.__class__.__name__


def install_safe_loading(engine) -> None:
    """Make every load DeepSpeed's engine does go through safe_load. Replaces the checkpoint engine
    a JSON config may choose: checkpoints are this engine's to write."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    engine.checkpoint_engine.zipfile_serialization = True  # the format check_pickles can read without the tensors


def check_pickles(folder: str) -> None:
    """Every DeepSpeed file of a checkpoint through safe_load, tensors left unread: run on rank 0
    before DeepSpeed loads, so that a refused file stops every rank at once, before any of them
    enters DeepSpeed's collectives (each rank reads only its own partition's files)."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".pt"):
            safe_load(os.path.join(folder, name), mmap=True)


def _fp16_masters(engine) -> dict[int, torch.Tensor]:
    """fp16 without ZeRO: DeepSpeed's FP16_UnfusedOptimizer (what it wraps our torch AdamW in) keeps
    an fp32 master copy of each parameter, unlinked from it."""
    if not engine.fp16_enabled() or engine.zero_optimization():
        return {}
    optimizer = engine.optimizer
    return {id(p): master for group, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups)
            for p, master in zip(group, masters)}


def full_weights(engine) -> dict[str, torch.Tensor]:
    """{state_dict name: full fp32 tensor} on rank 0 ({} on the others): DeepSpeed's fp32 master
    weights where it keeps them (ZeRO, bf16, fp16), else the parameter itself. Collective: every
    rank gathers each parameter in the same order, one at a time."""
    from deepspeed.utils import safe_get_full_fp32_param

    keep = dist.get_rank() == 0
    fp16_masters = _fp16_masters(engine)
    gathered = {}
    for p in engine.module.parameters():  # each parameter once, tied ones too
        full = safe_get_full_fp32_param(p)
        if keep:
            gathered[id(p)] = (fp16_masters.get(id(p), p.detach()) if full is None else full).float().cpu()
    if not keep:
        return {}
    return {name: gathered[id(t)] if isinstance(t, torch.nn.Parameter) else t.detach().cpu()
            for name, t in engine.module.state_dict(keep_vars=True).items()}


def _placement(layout: dict, zero_stage) -> dict:
    """What DeepSpeed's partitions depend on."""
    return {"dp": layout.get("dp"), "world_size": layout.get("world_size"), "zero_stage": zero_stage}


def _describe(placement: dict) -> str:
    return f"dp={placement['dp']} (world size {placement['world_size']}), ZeRO stage {placement['zero_stage']}"


class DeepSpeedCheckpointer(Checkpointer):
    """Checkpointer for a DeepSpeedTrainer: DeepSpeed's files plus the gathered weights in, DeepSpeed's
    own (safe) load out. Saves are synchronous: DeepSpeed writes its files itself."""

    def _write_state(self, trainer, tmp: str):
        engine = trainer.model
        engine.save_checkpoint(tmp, tag=TAG, save_latest=False)
        for script in RECOVERY_SCRIPTS:  # DeepSpeed's copies of its scripts, which unpickle in full
            if dist.get_rank() == 0 and os.path.isfile(os.path.join(tmp, script)):
                os.remove(os.path.join(tmp, script))
        dcp.save({"model": full_weights(engine)}, storage_writer=self.writer(tmp))
        return None

    def _meta(self, trainer) -> dict:
        return {**super()._meta(trainer), "kind": DEEPSPEED_KIND, "zero_stage": trainer.model.zero_optimization_stage()}

    def load(self, trainer, path: str) -> dict:
        engine = trainer.model
        here = _placement(layout(trainer), engine.zero_optimization_stage())
        model_shapes = {name: getattr(t, "ds_shape", t.shape)  # ZeRO-3 leaves an empty tensor and the shape
                        for name, t in engine.module.state_dict(keep_vars=True).items()}

        def check() -> dict:
            meta = verify(path)
            if meta.get("kind") != DEEPSPEED_KIND:
                raise UserError(f"{path}: not a train.backend = deepspeed checkpoint (kind "
                                f"{meta.get('kind', 'training')}); the DeepSpeed backend resumes only its own")
            saved = _placement(meta.get("layout") or {}, meta.get("zero_stage"))
            if saved != here:
                raise UserError(f"{path}: saved at {_describe(saved)}, this run is {_describe(here)}; DeepSpeed "
                                "resumes at the layout it saved (its ZeRO partitions are per rank): use that layout, "
                                f"or start from the weights: rapidnlp convert --from deepspeed {path} OUT")
            # DeepSpeed loads the module strictly, with a traceback: the same model and objectives, said first
            check_shapes(path, model_shapes)
            extra = sorted(set(stored_tensors(path)) - set(model_shapes))
            if extra:
                raise UserError(f"{path}: the checkpoint holds tensors this run's model lacks ({', '.join(extra[:3])}"
                                f"{', ...' if len(extra) > 3 else ''}); DeepSpeed resumes the model and objectives "
                                "it saved")
            check_pickles(os.path.join(path, TAG))
            return meta

        meta = checked_on_rank0(check)
        engine.load_checkpoint(path, tag=TAG, load_lr_scheduler_states=False)  # the LR is train.*'s schedule
        self._restore_progress(trainer, path, meta)
        return meta
