"""Sharded, resumable checkpoints: the one place that knows the checkpoint layout.

    <run_dir>/checkpoints/step_N/
        .metadata, __*.distcp      DCP: model + optimizer, sharded as trained (reloads at any layout)
        meta.json                  step, consumed samples/tokens, sampler, layout, file manifest
        config.json                the resolved config
        tokenizer.model            the sentencepiece model the run trained with
        rng/rank_R.json            python, numpy, torch CPU (and CUDA) RNG states of rank R
    <run_dir>/checkpoints/latest   "step_N", written last

A checkpoint is written under a temporary name and renamed when complete; `latest` is
replaced atomically after that, so a save killed midway leaves the previous one intact. With
async saves the shards are written by a background thread and the rename happens in `wait()`.
Loading never unpickles code (rapidnlp/train/safe_dcp.py): tensors through DCP, everything
else JSON. meta.json's manifest (size and CRC32 of every file) names a damaged file.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import sys
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from rapidnlp.errors import AgreedError, UserError
from rapidnlp.io import atomic_write, write_json_atomic
from rapidnlp.train.safe_dcp import SafeLoadPlanner, SafeReader, read_metadata

FORMAT_VERSION = 1
DEEPSPEED_KIND = "deepspeed"  # meta.json's kind of a DeepSpeed-backend checkpoint (rapidnlp/train/deepspeed_checkpoint.py)


def checkpoints_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(checkpoints_root(run_dir), f"step_{step}")


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint `latest` points to, or None when the run has none yet."""
    pointer = os.path.join(checkpoints_root(run_dir), "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(checkpoints_root(run_dir), name)
    if not os.path.isdir(path):
        raise UserError(f"{pointer}: points to '{name}', which does not exist")
    return path


def resolve_resume(resume: str | None, run_dir: str) -> str | None:
    """`--resume auto`: the run's latest checkpoint if any; `--resume PATH`: that checkpoint
    (a run dir or its checkpoints/ folder resolves through its `latest`)."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if not os.path.exists(resume):
        raise UserError(f"{resume}: checkpoint not found")
    for root in (resume, os.path.dirname(resume.rstrip("/"))):
        if os.path.isfile(os.path.join(root, "checkpoints", "latest")):
            return latest_checkpoint(root)
    if os.path.isfile(os.path.join(resume, "latest")):
        return latest_checkpoint(os.path.dirname(resume.rstrip("/")))
    if not os.path.isfile(os.path.join(resume, "meta.json")):
        raise UserError(f"{resume}: not a checkpoint folder (no meta.json)")
    return resume


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files_under(folder: str) -> list[str]:
    """Every file under folder, relative to it."""
    return [os.path.relpath(os.path.join(root, name), folder)
            for root, _, names in os.walk(folder) for name in names]


def manifest(folder: str) -> dict:
    """Size and CRC32 of every file under folder (but meta.json, which holds this)."""
    return {rel: {"bytes": os.path.getsize(os.path.join(folder, rel)), "crc32": _crc32(os.path.join(folder, rel))}
            for rel in sorted(_files_under(folder)) if rel != "meta.json"}


def inside(folder: str, name) -> bool:
    """Whether `name` (a path relative to folder) stays inside folder, symbolic links followed."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\0" in name:
        return False
    root = os.path.realpath(folder)
    return os.path.realpath(os.path.join(root, name)).startswith(root + os.sep)


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


# meta.json's fields: name -> (check, what it must be, required). An imported weights folder
# (kind "weights") has only the first three.
_META = {
    "format": (lambda v: _is(v, int) and 1 <= v <= FORMAT_VERSION, f"a format version 1..{FORMAT_VERSION}", True),
    "step": (lambda v: _is(v, int) and v >= 0, "a step number", True),
    "files": (lambda v: isinstance(v, dict), "the manifest of files", True),
}
_TRAINING_META = {
    "sampler": (lambda v: isinstance(v, dict) and all(_is(v.get(k), int) and v[k] >= 0
                                                      for k in ("consumed_samples", "seed", "num_samples")),
                "the sampler state {consumed_samples, seed, num_samples}", True),
    "layout": (lambda v: isinstance(v, dict) and all(_is(x, int) or isinstance(x, str) for x in v.values()),
               "the layout {pp, dp, tp, zero, ...}", True),
    "loss_scaler": (lambda v: v is None or (isinstance(v, dict) and _is(v.get("scale"), (int, float))
                                            and _is(v.get("clean_steps"), int)), "null or the loss scaler state", False),
    "nonpad_tokens": (lambda v: _is(v, int) and v >= 0, "the count of non-padding tokens trained on", False),
    "skipped": (lambda v: isinstance(v, dict) and all(_is(v.get(k, 0), int) for k in ("total", "in_a_row"))
                and (v.get("last_finite") is None or (isinstance(v["last_finite"], list) and len(v["last_finite"]) == 2
                                                      and _is(v["last_finite"][0], int)
                                                      and _is(v["last_finite"][1], (int, float)))),
                "the skipped-step counts", False),
}


def _check_meta(meta, meta_path: str, folder: str) -> None:
    """meta.json's fields as loading uses them; a file named outside the folder is refused."""
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: not a checkpoint's meta.json (not a JSON object)")
    fields = _META if meta.get("kind") == "weights" else {**_META, **_TRAINING_META}
    for name, (ok, what, required) in fields.items():
        if name not in meta:
            if required:
                raise UserError(f"{meta_path}: no '{name}' field ({what}); not a complete checkpoint")
            continue
        if not ok(meta[name]):
            raise UserError(f"{meta_path}: '{name}' must be {what}, not {json.dumps(meta[name])[:60]}")
    for name, want in meta["files"].items():
        if not inside(folder, name):
            raise UserError(f"{meta_path}: the manifest names '{name}', which leads outside the checkpoint folder; refused")
        if not (isinstance(want, dict) and _is(want.get("bytes"), int) and _is(want.get("crc32"), int)):
            raise UserError(f"{meta_path}: files['{name}'] must be {{\"bytes\": int, \"crc32\": int}}")


def verify(path: str) -> dict:
    """meta.json of a checkpoint whose files all match their manifest; else one clear error."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"{path}: not a checkpoint folder (no meta.json)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{meta_path}: corrupted ({e.__class__.__name__}: {e})") from None
    _check_meta(meta, meta_path, path)
    for name in _files_under(path):
        if not inside(path, name):
            raise UserError(f"{os.path.join(path, name)}: a link out of the checkpoint folder; refused")
    for name, want in meta["files"].items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise UserError(f"{full}: missing from the checkpoint")
        size = os.path.getsize(full)
        if size != want["bytes"]:
            raise UserError(f"{full}: truncated or damaged ({size} bytes, expected {want['bytes']})")
        if _crc32(full) != want["crc32"]:
            raise UserError(f"{full}: corrupted (checksum mismatch)")
    return meta


def checked_on_rank0(check):
    """check() run on rank 0 only (a checkpoint's files are read once, not by every rank); its
    result is returned on every rank, and its UserError raised on every rank."""
    out = [None, None]
    if dist.get_rank() == 0:
        try:
            out = [None, check()]
        except UserError as e:
            out = [str(e), None]
    dist.broadcast_object_list(out, src=0)
    if out[0]:
        raise AgreedError(out[0])
    return out[1]


def stored_tensors(path: str, prefix: str = "model.") -> dict[str, torch.Size]:
    """{name: shape} of the checkpoint's tensors under `prefix` (read from DCP's metadata)."""
    return {
        k[len(prefix):]: v.size for k, v in read_metadata(path).state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
    }


def check_shapes(path: str, expected: dict[str, torch.Size], prefix: str = "model.", optional=()) -> None:
    """Compare the checkpoint's tensor shapes with the model's; list the first mismatches.
    Tensors under an `optional` top-level module may be missing (they start from initialisation)."""
    stored = stored_tensors(path, prefix)
    problems = []
    for name, shape in expected.items():
        if name not in stored and name.split(".")[0] in optional:
            continue
        if name not in stored:
            problems.append(f"{name} missing (model has {tuple(shape)})")
        elif tuple(stored[name]) != tuple(shape):
            problems.append(f"{name}: checkpoint {tuple(stored[name])} vs model {tuple(shape)}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserError(f"{path}: checkpoint does not fit this model: {shown}")


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


# ----------------------------------------------------------------------------- what is saved
#
# DCP keys are the full model's parameter names in every layout, so a checkpoint reloads at any
# other: "model.<name>" for the weights (module.state_dict(): DTensor shards under TP/FSDP, whole
# tensors otherwise) and "optim.<name>.<state>" (exp_avg, exp_avg_sq, step) for the optimizer,
# keyed by name rather than torch's per-rank parameter numbering. That is what lets pipeline
# stages (each rank holds other parameters) and ZeRO-1 (each rank holds the state of other
# parameters, as whole tensors) save and load like every other layout. Optimizer
# hyper-parameters are not saved: they come from the config (the LR from the schedule).

# Under pipelining a stage may hold its own copy of a tied parameter (the MLM decoder's copy of
# the word embedding; rapidnlp.parallel.pipeline); both copies take the same steps, so the
# optimizer state of the copy is the original's, saved once under the original's name. The
# tied pairs are the model's (`tied_parameters()`).


def _module(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _tied(model: torch.nn.Module) -> dict[str, str]:
    return _module(model).tied_parameters()


def _local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state (ZeRO-1: the one over this rank's partition)."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _module(model).state_dict()


def _ensure_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Create the optimizer's state (zeros) where it has none yet, so that a checkpoint can be
    loaded into it (or a step-0 state saved): one step with zero gradients and LR 0, which
    changes no weight. Collective (ZeRO-1 and LAMB communicate in step), so every rank takes it
    when any rank needs it."""
    local = _local_optimizer(optimizer)
    params = [p for g in local.param_groups for p in g["params"]]
    missing = torch.tensor([float(any(p not in local.state for p in params))], device=device)
    dist.all_reduce(missing, op=dist.ReduceOp.MAX)
    if not missing.item():
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in _module(model).parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, dict]:
    """{parameter name: its optimizer state tensors} for the parameters whose state this rank
    holds, under the names every layout shares. The tensors are the optimizer's own, so a DCP
    load into this dict restores them in place. A tied copy whose original is on this rank too
    is left out (restored by `_sync_tied_copies`)."""
    _ensure_optimizer_state(model, optimizer, device)
    local = _local_optimizer(optimizer)
    names = {id(p): n for n, p in _module(model).named_parameters()}
    held = [(names[id(p)], p) for group in local.param_groups for p in group["params"]]
    local_names = {name for name, _ in held}
    tied = _tied(model)
    return {tied.get(name, name): local.state[p] for name, p in held if tied.get(name) not in local_names}


def _sync_tied_copies(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A rank holding both a tied copy and its original (zbv's V placement puts the first and
    last stage on one rank) gives the copy the original's loaded optimizer state."""
    local = _local_optimizer(optimizer)
    params = dict(_module(model).named_parameters())
    for copy, original in _tied(model).items():
        if copy in params and original in params and params[copy] in local.state:
            for k, v in local.state[params[original]].items():
                local.state[params[copy]][k].copy_(v)


def _load_sampler(trainer, state: dict, path: str, *, changed_objectives: bool) -> None:
    """The data position of the checkpoint. A run that adds objectives may draw other samples (a
    knowledge run starting from a plain-MLM checkpoint): then its data order starts from the
    beginning, said in one line. Otherwise other samples mean another dataset: refused."""
    if state["num_samples"] == trainer.sampler.num_samples and state["seed"] == trainer.sampler.seed:
        trainer.sampler.load_state_dict(state)
    elif changed_objectives:
        if dist.get_rank() == 0:
            print(f"{path}: the checkpoint's data stream had {state['num_samples']} samples, this run's has "
                  f"{trainer.sampler.num_samples}: the data order starts from the beginning", flush=True)
    else:
        raise UserError(f"{path}: the checkpoint was trained on {state['num_samples']} samples with seed "
                        f"{state['seed']}, this run has {trainer.sampler.num_samples} with seed "
                        f"{trainer.sampler.seed}; resume with the same data.path, data.seq_len and train.seed")


def _reinit_new_modules(model: torch.nn.Module, names: set[str]) -> None:
    """New objective modules that initialise from the model's weights (an entity table from the
    word embedding) do it again from the loaded weights. Collective: every rank calls it."""
    whole = _module(model)
    for name in sorted(names):
        module = getattr(whole, name, None)
        if module is not None and hasattr(module, "init_weights"):
            module.init_weights(whole)


def layout(trainer) -> dict:
    p = trainer.config.parallel
    return {"pp": p.pp, "dp": p.dp, "tp": p.tp, "zero": p.zero,
            "hsdp_shard": p.hsdp_shard, "world_size": dist.get_world_size()}


class SaveFailed(AgreedError):
    """A checkpoint could not be written (what failed is gathered from every rank)."""


def _root_cause(error: BaseException) -> BaseException:
    """The OSError behind an error (a full disk), if there is one; else the error."""
    cause = error
    while cause.__context__ is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    return cause if isinstance(cause, OSError) else error


class ShardFileSystem(FileSystem):
    """DCP's file system, but a failed shard write raises the OSError that caused it: torch.save's
    zip writer replaces it with an 'unexpected pos' RuntimeError as it closes, and DCP passes
    errors between ranks without their context."""

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except Exception as e:
            root = _root_cause(e)
            if root is e:
                raise
            raise root from None


def storage_writer(path: str) -> FileSystemWriter:
    writer = FileSystemWriter(path)
    writer.fs = ShardFileSystem()
    return writer


def _describe(error: BaseException) -> list[str]:
    """'rank R: what failed' for a save's error: DCP's per-rank failures unwrapped, each as its
    root cause where that is an OSError (a full disk), on one line."""
    failures = ({rank: exc for rank, (exc, _) in error.failures.items()} if isinstance(error, CheckpointException)
                else {dist.get_rank(): error})
    lines = []
    for rank, exc in sorted(failures.items()):
        exc = _root_cause(exc)
        text = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        lines.append(f"rank {rank}: {' '.join(text.split())}")
    return lines


def _gather_errors(error: BaseException | None, src: int | None = None) -> list[str]:
    """What failed in a save, on every rank alike (src: only that rank's error counts). Collective."""
    mine = _describe(error) if error is not None and src in (None, dist.get_rank()) else []
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return list(dict.fromkeys(line for lines in everyone for line in lines))


class Checkpointer:
    """Saves every `interval` steps and/or `minutes`, keeps the last `keep_last` (and every
    `keep_every`-th permanently), and loads them back into a Trainer."""

    def __init__(self, run_dir: str, *, interval: int = 0, minutes: float = 0.0, keep_last: int = 3,
                 keep_every: int = 0, tokenizer: str | None = None, async_save: bool = False,
                 drop_unknown_modules: bool = False, continue_on_error: bool = False):
        self.run_dir = run_dir
        self.interval = interval
        self.minutes = minutes
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.tokenizer = tokenizer
        self.async_save = async_save
        self.drop_unknown_modules = drop_unknown_modules
        self.continue_on_error = continue_on_error
        self.writer = storage_writer  # tmp folder -> DCP storage writer (a test makes one that fails)
        self._async_group = None
        self._pending = None  # (future, tmp folder, final folder, meta, step, error) of the save to finish
        self.last_save_time = time.monotonic()

    def due(self, step: int) -> bool:
        """This rank's opinion; the trainer all-reduces it so that every rank agrees."""
        if self.interval and step % self.interval == 0:
            return True
        return bool(self.minutes) and time.monotonic() - self.last_save_time >= self.minutes * 60

    def save(self, trainer) -> str:
        """Write step_N (as a temporary folder); synchronous saves also finish it. An async save
        returns once the state is copied to CPU memory; the shards are written by a background
        thread and the checkpoint is finished (manifest, rename, `latest`) by `wait()`, which
        the next save, a load and the end of training call."""
        self.wait()
        rank = dist.get_rank()
        final = step_dir(self.run_dir, trainer.step)
        tmp = final + ".tmp"
        if rank == 0:
            os.makedirs(checkpoints_root(self.run_dir), exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
            os.makedirs(os.path.join(tmp, "rng"))
        dist.barrier()
        future, error = None, None
        try:
            future = self._write_state(trainer, tmp)
            self._write_own_files(trainer, tmp)
        except (Exception, CheckpointException) as e:  # a full disk, a lost mount: agreed in wait()
            error = e
        meta = self._meta(trainer) if rank == 0 else None
        self._pending = (future, tmp, final, meta, trainer.step, error)
        if not self.async_save:
            self.wait()
        self.last_save_time = time.monotonic()
        return final

    def _write_state(self, trainer, tmp: str):
        """Model and optimizer into tmp (DCP shards); returns the async save's future, or None."""
        state = {"model": model_state(trainer.model), "optim": optimizer_state(trainer.model, trainer.optimizer, trainer.device)}
        if not self.async_save:
            dcp.save(state, storage_writer=self.writer(tmp))
            return None
        # The writer thread runs collectives of its own: on a separate gloo group, so that
        # they never interleave with training's on the default group.
        if self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return dcp.async_save(state, storage_writer=self.writer(tmp), process_group=self._async_group)

    def _write_own_files(self, trainer, tmp: str) -> None:
        """What each rank writes beside the shards: its RNG state; rank 0 the config and tokenizer."""
        with open(os.path.join(tmp, "rng", f"rank_{dist.get_rank()}.json"), "w") as f:
            json.dump(rng_state(), f)
        if dist.get_rank() == 0:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(trainer.config.to_json())
            if self.tokenizer and os.path.isfile(self.tokenizer):
                shutil.copyfile(self.tokenizer, os.path.join(tmp, "tokenizer.model"))

    def _meta(self, trainer) -> dict:
        """meta.json's content (rank 0), less the file manifest written when the save is complete."""
        return {
            "format": FORMAT_VERSION,
            "step": trainer.step,
            "consumed_samples": trainer.sampler.consumed_samples,
            "consumed_tokens": trainer.sampler.consumed_samples * trainer.config.data.seq_len,  # padding included
            "nonpad_tokens": trainer.consumed_tokens,
            "sampler": trainer.sampler.state_dict(),
            "layout": layout(trainer),
            "loss_scaler": trainer.scaler.state_dict() if trainer.scaler else None,
            "skipped": {"total": trainer.skipped_steps, "in_a_row": trainer.skipped_in_a_row,
                        "last_finite": trainer.last_finite},
            "saved_at": time.time(),
        }

    def wait(self) -> None:
        """Finish the save in flight, if any: wait for its shards on every rank, then (rank 0)
        write meta.json with the manifest, rename the folder and point `latest` at it. A save
        that failed on any rank is removed, `latest` left where it was, and reported."""
        if self._pending is None:
            return
        future, tmp, final, meta, step, error = self._pending
        self._pending = None
        if future is not None and error is None:
            try:
                future.result()
            except (Exception, CheckpointException) as e:
                error = e
        failures = _gather_errors(error)
        if not failures and dist.get_rank() == 0:
            try:
                write_json_atomic(os.path.join(tmp, "meta.json"), {**meta, "files": manifest(tmp)})
                if os.path.isdir(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
                atomic_write(os.path.join(checkpoints_root(self.run_dir), "latest"), os.path.basename(final))
                self._prune(step)
            except Exception as e:
                error = e
        failures = failures or _gather_errors(error, src=0)
        if failures:
            self._failed(step, tmp, failures)

    def _failed(self, step: int, tmp: str, failures: list[str]) -> None:
        """A failed save: its partial folder removed (rank 0), then one line, and either the run
        stops (SaveFailed on every rank) or, with checkpoint.continue_on_error, it trains on."""
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        last = latest_checkpoint(self.run_dir)
        message = (f"step {step}: saving the checkpoint failed ({failures[0]}); the partial folder was removed "
                   f"and the last checkpoint is {last or 'none'}")
        if not self.continue_on_error:
            raise SaveFailed(f"{message}; free the space (or fix the storage) and resume: --resume auto")
        if dist.get_rank() == 0:
            print(f"warning: {message}; training goes on (checkpoint.continue_on_error)", file=sys.stderr, flush=True)

    def _module_changes(self, path: str, trainer) -> list[str]:
        """The objective modules this run adds to the checkpoint's model (loaded as initialised).
        Tensors of modules this run lacks are refused in one line, unless
        checkpoint.drop_unknown_modules says to drop them."""
        stored = stored_tensors(path)
        extra = sorted({k.split(".")[0] for k in stored if k not in trainer.model_names})
        if extra and not self.drop_unknown_modules:
            raise UserError(f"{path}: the checkpoint holds modules this run does not have: {', '.join(extra)} "
                            "(an objective left out of [objectives]?); add the objective back, or set "
                            "checkpoint.drop_unknown_modules = true to drop them")
        return sorted({k.split(".")[0] for k in trainer.model_names if k not in stored} & set(trainer.piece_names))

    def _prune(self, current: int) -> None:
        root = checkpoints_root(self.run_dir)
        steps = sorted(
            int(n[5:]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit()
        )
        keep = set(steps[-self.keep_last:]) if self.keep_last > 0 else set(steps)
        keep |= {s for s in steps if self.keep_every and s % self.keep_every == 0}
        keep.add(current)
        for s in steps:
            if s not in keep:
                shutil.rmtree(step_dir(self.run_dir, s), ignore_errors=True)

    def load(self, trainer, path: str) -> dict:
        """Restore model, optimizer, step, sampler and (same layout) RNG states from `path`."""
        self.wait()
        model_sd = model_state(trainer.model)

        def check() -> list[str]:
            if verify(path).get("kind") == DEEPSPEED_KIND:
                raise UserError(f"{path}: a train.backend = deepspeed checkpoint; resume it with that backend, "
                                f"or start from its weights: rapidnlp convert --from deepspeed {path} OUT")
            check_shapes(path, {k: v.shape for k, v in model_sd.items() if isinstance(v, torch.Tensor)},
                         optional=trainer.piece_names)
            return self._module_changes(path, trainer)

        news = checked_on_rank0(check)
        if news and dist.get_rank() == 0:
            print(f"{path}: new objective modules start from initialisation: {', '.join(news)}", flush=True)
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        new = set(news)
        state = {"model": {k: v for k, v in model_sd.items() if k.split(".")[0] not in new}}
        if meta.get("kind") != "weights":  # imported (rapidnlp convert --from hf): a fresh run from these weights
            optim = optimizer_state(trainer.model, trainer.optimizer, trainer.device)
            state["optim"] = {k: v for k, v in optim.items() if k.split(".")[0] not in new}
        dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
        _module(trainer.model).load_state_dict(state["model"], strict=False)
        _reinit_new_modules(trainer.model, new)
        if "optim" not in state:
            return meta
        _sync_tied_copies(trainer.model, trainer.optimizer)
        self._restore_progress(trainer, path, meta, changed_objectives=bool(new))
        return meta

    def _restore_progress(self, trainer, path: str, meta: dict, *, changed_objectives: bool = False) -> None:
        """Step, data position, loss scale and (same layout) this rank's RNG streams."""
        trainer.step = meta["step"]
        # Older checkpoints counted padding too: their count is all there is.
        trainer.consumed_tokens = int(meta.get("nonpad_tokens", meta.get("consumed_tokens", 0)))
        _load_sampler(trainer, meta["sampler"], path, changed_objectives=changed_objectives)
        if trainer.scaler and meta.get("loss_scaler"):
            trainer.scaler.load_state_dict(meta["loss_scaler"])
        skipped = meta.get("skipped", {})
        trainer.skipped_steps = skipped.get("total", 0)
        trainer.skipped_in_a_row = skipped.get("in_a_row", 0)
        trainer.last_finite = tuple(skipped["last_finite"]) if skipped.get("last_finite") else None
        rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank()}.json")
        # RNG streams only mean something on the same layout (they drive dropout per rank).
        saved = {k: v for k, v in meta["layout"].items() if k != "dp_mode"}  # dp_mode: before zero alone
        if saved == layout(trainer) and os.path.isfile(rng_file):
            with open(rng_file) as f:
                set_rng_state(json.load(f))
        self.last_save_time = time.monotonic()
