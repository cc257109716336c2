"""The DeepSpeed backend against the single-process torch run: ZeRO 0-3, a user's JSON config
(ZeRO 2, and ZeRO 2 with offload_optimizer) and DeepSpeedCPUAdam offload (ZeRO 3), fp32, loss
and grad_norm to rtol 1e-4 over 20 steps; the per-rank memory each stage holds; the generated
DeepSpeed config and the JSON rules; the CLI end to end.

One 2-process world runs every DeepSpeed configuration (ZeRO-3 last: it replaces torch.nn.functional.linear
for the rest of the process). The first run on a cold machine JIT-compiles DeepSpeed's shm_comm and cpu_adam
ops (a minute or two each on 2 cores) into TORCH_EXTENSIONS_DIR; later runs load them in seconds.
"""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")

from conftest import REPO, launch_world, run_cli  # noqa: E402
from rapidnlp.config import Config  # noqa: E402
from rapidnlp.errors import UserError  # noqa: E402
from rapidnlp.train.deepspeed_backend import default_extensions_dir, deepspeed_config  # noqa: E402
from test_layouts import STEPS, base_overrides  # noqa: E402

WORKER = str(REPO / "tests" / "deepspeed_worker.py")
TINY = str(REPO / "configs" / "tiny.toml")
DS = {"train.backend": "deepspeed"}
ZERO2_JSON = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 50000}, "train_batch_size": "auto"}
OFFLOAD_JSON = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}


def runs(tmp) -> list[dict]:
    (tmp / "zero2.json").write_text(json.dumps(ZERO2_JSON))
    (tmp / "offload.json").write_text(json.dumps(OFFLOAD_JSON))
    return [{"name": f"zero{z}", "overrides": {**DS, "parallel.zero": z}} for z in (0, 1, 2)] + [
        # parallel.zero says 1, the JSON says 2: the JSON wins
        {"name": "json_zero2", "overrides": {**DS, "parallel.zero": 1, "train.deepspeed_config": str(tmp / "zero2.json")}},
        {"name": "json_offload", "overrides": {**DS, "parallel.zero": 1,
                                               "train.deepspeed_config": str(tmp / "offload.json")}},
        {"name": "bf16", "overrides": {**DS, "parallel.zero": 2, "train.precision": "bf16", "train.steps": 6}},
        {"name": "fp16", "overrides": {**DS, "parallel.zero": 1, "train.precision": "fp16", "train.steps": 6,
                                       "train.loss_scale": 1024.0}},
        {"name": "zero3", "overrides": {**DS, "parallel.zero": 3}},
        {"name": "offload", "overrides": {**DS, "parallel.zero": 3, "parallel.cpu_offload": True}},
    ]


@pytest.fixture(scope="module")
def curves(pd_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    base = base_overrides(tmp / "run")
    results = launch_world(WORKER, 1, pd_dataset, base, [{"name": "single", "overrides": {}}], tmp)
    results.update(launch_world(WORKER, 2, pd_dataset, base, runs(tmp), tmp))
    return results


def rows(curves, name) -> list[dict]:
    return curves[name]["rows"]


def series(rows, key):
    return np.array([r[key] for r in rows], dtype=np.float64)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "json_zero2", "json_offload", "offload"])
def test_matches_single_process(curves, name):
    ref, got = rows(curves, "single"), rows(curves, name)
    assert len(got) == STEPS
    np.testing.assert_allclose(series(got, "loss"), series(ref, "loss"), rtol=1e-4)
    np.testing.assert_allclose(series(got, "grad_norm"), series(ref, "grad_norm"), rtol=1e-4)
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_engine_ran_what_was_asked(curves):
    """The JSON's ZeRO stage and offload win over parallel.zero; offload means DeepSpeedCPUAdam."""
    ran = {name: (curves[name]["stage"], curves[name]["optimizer"]) for name in
           ("zero0", "zero1", "zero2", "zero3", "json_zero2", "json_offload", "offload")}
    assert ran == {"zero0": (0, "AdamW"), "zero1": (1, "AdamW"), "zero2": (2, "AdamW"), "zero3": (3, "AdamW"),
                   "json_zero2": (2, "AdamW"), "json_offload": (2, "DeepSpeedCPUAdam"),
                   "offload": (3, "DeepSpeedCPUAdam")}
    # the ops it compiled are cached where the next run will find them
    ext = os.environ.get("TORCH_EXTENSIONS_DIR") or default_extensions_dir()
    assert os.path.isdir(os.path.join(ext, "cpu_adam")), os.listdir(ext)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_memory_per_zero_stage(curves):
    """Stage 1 and 2 hold 1/dp of the AdamW state, stage 3 also 1/dp of the parameters (dp = 2)."""
    mem = {z: rows(curves, f"zero{z}")[-1] for z in range(4)}
    p0, o0 = mem[0]["mem_params_bytes"], mem[0]["mem_optimizer_bytes"]
    assert o0 == pytest.approx(2 * p0, rel=0.01)  # exp_avg + exp_avg_sq
    for z in (1, 2, 3):
        assert mem[z]["mem_optimizer_bytes"] == pytest.approx(o0 / 2, rel=0.01)
    assert mem[1]["mem_params_bytes"] == mem[2]["mem_params_bytes"] == p0
    assert mem[3]["mem_params_bytes"] == pytest.approx(p0 / 2, rel=0.01)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mixed_precision(curves):
    """bf16 (DeepSpeed casts the module, fp32 master weights) tracks fp32; fp16 trains where the
    CPU accelerator offers it and is otherwise refused with one line."""
    ref = series(rows(curves, "single"), "loss")[:6]
    bf16 = series(rows(curves, "bf16"), "loss")
    assert not np.array_equal(bf16, ref)  # it really ran in bf16
    np.testing.assert_allclose(bf16, ref, rtol=2e-2)
    fp16 = curves["fp16"]
    if "error" in fp16:
        assert "fp16" in fp16["error"] and "use bf16 or fp32" in fp16["error"]
    else:
        np.testing.assert_allclose(series(fp16["rows"], "loss"), ref, rtol=2e-2)
        assert fp16["rows"][0]["loss_scale"] == 1024.0


def _config(**overrides) -> Config:
    from rapidnlp.config import apply, resolve_layout

    config = Config()
    config.checkpoint.enabled = False
    for name, value in {"train.backend": "deepspeed", "train.global_batch": 8, "train.micro_batch": 2,
                        **overrides}.items():
        section, key = name.split(".")
        apply(config, section, key, value, "test")
    resolve_layout(config, 2)
    return config


def test_generated_config_follows_our_knobs():
    ds = deepspeed_config(_config(**{"parallel.zero": 3, "parallel.cpu_offload": True, "train.precision": "bf16",
                                     "train.clip_grad": 0.5}))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}}
    assert ds["bf16"] == {"enabled": True} and not ds["fp16"]["enabled"]
    fp16 = deepspeed_config(_config(**{"train.precision": "fp16", "train.loss_scale": 1024.0}))["fp16"]
    assert fp16["enabled"] and fp16["initial_scale_power"] == 10 and fp16["loss_scale"] == 0


def test_user_json_wins_for_zero_and_precision(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False},
                                "bf16": {"enabled": True}, "train_batch_size": "auto",
                                "train_micro_batch_size_per_gpu": 2}))
    ds = deepspeed_config(_config(**{"parallel.zero": 1, "train.deepspeed_config": str(path)}))
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2


@pytest.mark.parametrize("content, message", [
    ({"train_batch_size": 16}, r"sets train_batch_size = 16, but train.global_batch gives 8"),
    ({"gradient_clipping": 5.0}, r"sets gradient_clipping = 5.0, but train.clip_grad gives 1.0"),
    ({"optimizer": {"type": "Adam"}}, r"sets 'optimizer'; remove it, train.lr"),
    ({"scheduler": {"type": "WarmupLR"}}, r"sets 'scheduler'; remove it, train.warmup_steps"),
    ("[1, 2]", r"must hold a JSON object"),
    ("{not json", r"cannot read"),
])
def test_user_json_that_contradicts_train_is_one_line(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError, match=message):
        deepspeed_config(_config(**{"train.deepspeed_config": str(path)}))


CKPT_STEPS = 6  # saved at step 3 and 6; the resumed run continues from step 3
SETUPS = {f"zero{z}": {"parallel.zero": z} for z in (0, 1, 2, 3)}
SETUPS["bf16"] = {"parallel.zero": 2, "train.precision": "bf16"}  # fp32 master weights in DeepSpeed's optimizer
SETUPS["offload"] = {"parallel.zero": 2, "parallel.cpu_offload": True}  # DeepSpeedCPUAdam
SETUPS["offload_zero3"] = {"parallel.zero": 3, "parallel.cpu_offload": True}  # and the parameters offloaded
SETUPS["fp16"] = {"parallel.zero": 1, "train.precision": "fp16", "train.loss_scale": 1024.0}  # its loss scaler too
SETUPS["fp16_zero0"] = {**SETUPS["fp16"], "parallel.zero": 0}  # DeepSpeed's FP16_Optimizer


def checkpoint_runs(tmp) -> list[dict]:
    """Per set-up: an uninterrupted run that saves at steps 3 and 6, and a run resumed from its
    step 3; and a resume at another ZeRO stage, refused. ZeRO-3 last (it patches torch for the process)."""
    def pair(name):
        full = {"name": f"full_{name}", "checkpoint_interval": 3}
        resumed = {"name": f"resumed_{name}", "resume": str(saved(tmp, name, 3))}
        return [{**run, "overrides": {**DS, **SETUPS[name], "train.run_dir": str(tmp / run["name"])}}
                for run in (full, resumed)]

    refused = [{"name": name, "overrides": {**DS, "parallel.zero": 2, **overrides, "train.run_dir": str(tmp / name)},
                "resume": str(saved(tmp, "zero2", 3))}
               for name, overrides in (("other_stage", {"parallel.zero": 1}), ("other_objectives", {"objectives.toy": 0.5}))]
    last = [name for name in SETUPS if SETUPS[name]["parallel.zero"] == 3]
    return [run for name in SETUPS if name not in last for run in pair(name)] + refused + \
        [run for name in last for run in pair(name)]


def saved(tmp, name: str, step: int):
    return tmp / f"full_{name}" / "checkpoints" / f"step_{step}"


@pytest.fixture(scope="module")
def checkpointed(pd_dataset, tmp_path_factory):
    """(results by run name, the folder holding every run's run dir)."""
    tmp = tmp_path_factory.mktemp("dsckpt")
    # dropout on: the resumed runs need each rank's RNG stream back
    base = {**base_overrides(tmp / "run"), "train.steps": CKPT_STEPS, "train.eval_interval": 3, "model.dropout": 0.1}
    return launch_world(WORKER, 2, pd_dataset, base, checkpoint_runs(tmp), tmp), tmp


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_resume_is_bit_exact(checkpointed, name):
    """Resumed from step 3 at the same layout, every later metric equals the uninterrupted run's
    bit for bit (the engine's partitions, optimizer state and step, the data position and the
    dropout RNG all come back)."""
    results, tmp = checkpointed
    skip_without_fp16(results, name)
    full, resumed = rows(results, f"full_{name}"), rows(results, f"resumed_{name}")
    assert resumed[0]["resumed_from"] == 3 and [r["step"] for r in resumed] == [4, 5, 6]
    keys = ("loss", "grad_norm", "lr", "val_loss", "loss_scale", "skipped_steps")
    assert [{k: r.get(k) for k in keys} for r in resumed] == [{k: r.get(k) for k in keys} for r in full[3:]]
    assert "val_loss" in resumed[-1]
    # DeepSpeed read its files, and never with a full unpickle
    loads = results[f"resumed_{name}"]["torch_load_weights_only"]
    assert loads and all(w is True for w in loads), loads

    zero = SETUPS[name]["parallel.zero"]
    meta = json.loads((saved(tmp, name, 3) / "meta.json").read_text())
    assert (meta["kind"], meta["zero_stage"], meta["step"]) == ("deepspeed", zero, 3)
    files = set(meta["files"])
    assert {".metadata", "config.json", "tokenizer.model", "rng/rank_0.json", "rng/rank_1.json"} <= files
    assert any(f.startswith("deepspeed/") and f.endswith("optim_states.pt") for f in files) or zero == 0
    assert not {"zero_to_fp32.py", "zero_to_torch.py"} & files  # DeepSpeed's full-unpickle scripts
    assert (tmp / f"full_{name}" / "checkpoints" / "latest").read_text() == "step_6"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_of_another_stage_or_model_is_one_line(checkpointed):
    results, tmp = checkpointed
    error = results["other_stage"]["error"]
    assert error.startswith(f"{saved(tmp, 'zero2', 3)}: saved at dp=2 (world size 2), ZeRO stage 2, this run is "
                            "dp=2 (world size 2), ZeRO stage 1;"), error
    assert "rapidnlp convert --from deepspeed" in error
    error = results["other_objectives"]["error"]
    assert error.startswith(f"{saved(tmp, 'zero2', 3)}: checkpoint does not fit this model: toy"), error


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["zero2", "zero3", "bf16", "offload_zero3"])
def test_convert_to_native_and_hf(checkpointed, name, tmp_path):
    """`convert --from deepspeed` gives a native weights-only checkpoint holding DeepSpeed's
    own fp32 master weights (as its zero_to_fp32 reassembles them from the partitions; under bf16
    too, not the module's bf16 copy), exactly;
    `--to hf` gives a folder transformers loads, with our logits."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from rapidnlp.convert.folders import export_hf, import_deepspeed, read_native
    from test_convert import assert_hf_logits_equal_ours

    _, tmp = checkpointed
    ckpt = saved(tmp, name, 6)
    native, hf = tmp_path / "native", tmp_path / "hf"
    import_deepspeed(str(ckpt), str(native))  # the CLI's: test_torch_backend_starts_from_converted_weights runs it
    export_hf(str(ckpt), str(hf))

    # DeepSpeed's reassembly, a full unpickle: acceptable here only, on files this test just wrote
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
    config, state, extras = read_native(str(native))
    assert json.loads((native / "meta.json").read_text())["kind"] == "weights" and extras == {}
    assert set(state) == set(reference)
    for key, tensor in reference.items():
        assert state[key].dtype == tensor.dtype == torch.float32 and torch.equal(state[key], tensor), key
    assert_hf_logits_equal_ours(hf, config, reference)


def skip_without_fp16(results, name) -> None:
    if "error" in results[f"full_{name}"]:  # fp16 where DeepSpeed's CPU accelerator lacks it (test_mixed_precision)
        pytest.skip(results[f"full_{name}"]["error"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fp16_without_zero_saves_its_fp32_master_weights(checkpointed):
    """FP16_Optimizer keeps the fp32 master weights unlinked from the fp16 module: the checkpoint's
    weights (what convert exports) are those masters, of which the module's are the fp16 rounding."""
    from rapidnlp.convert.folders import read_native
    from rapidnlp.train.deepspeed_checkpoint import safe_load

    results, tmp = checkpointed
    skip_without_fp16(results, "fp16_zero0")
    ckpt = saved(tmp, "fp16_zero0", 6)
    _, state, _ = read_native(str(ckpt))
    module = safe_load(str(ckpt / "deepspeed" / "mp_rank_00_model_states.pt"))["module"]
    assert set(state) == set(module)
    for key, fp16 in module.items():
        assert fp16.dtype == torch.float16 and state[key].dtype == torch.float32, key
        assert torch.equal(state[key].half(), fp16), key
    assert sum(not torch.equal(state[key], fp16.float()) for key, fp16 in module.items()) > len(module) // 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torch_backend_starts_from_converted_weights(checkpointed, pd_dataset, tmp_path):
    """The torch backend refuses a DeepSpeed checkpoint in one line naming the conversion, and
    starts from the converted weights-only checkpoint at another layout (dp=1, its own optimizer)."""
    from test_checkpoint import ok, one_error_line, train_args

    _, tmp = checkpointed
    ckpt, native = saved(tmp, "zero3", 6), tmp_path / "native"
    args = ("--model.max_position_embeddings", "64")  # the checkpoint's
    line = one_error_line(run_cli(*train_args(pd_dataset, tmp_path / "a", 2, *args), "--resume", str(ckpt)))
    assert line == (f"error: {ckpt}: a train.backend = deepspeed checkpoint; resume it with that backend, "
                    f"or start from its weights: rapidnlp convert --from deepspeed {ckpt} OUT")
    ok(run_cli("convert", "--from", "deepspeed", str(ckpt), str(native)))
    res = ok(run_cli(*train_args(pd_dataset, tmp_path / "b", 2, *args), "--resume", str(native)))
    assert f"resuming from {native}" in res.stdout
    started = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in started] == [1, 2]  # a fresh run (step 0, its own optimizer) from those weights


class Hostile:
    """Unpickled in full, it runs a command (which would leave `marker`)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_pickle_is_refused_without_running_it(tmp_path):
    """DeepSpeed's files are read with torch's weights_only unpickler: a pickle whose __reduce__
    would run a command is refused in one line and runs nothing; DeepSpeed's own types load."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from rapidnlp.train.deepspeed_checkpoint import safe_load

    marker = tmp_path / "ran"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "evil": Hostile(marker)}, path)
    with pytest.raises(UserError) as e:
        safe_load(str(path))
    assert "\n" not in str(e.value) and "refused to unpickle (it names posix.system, not an allowed type)" in str(e.value)
    assert not marker.exists()

    torch.save({"loss_scaler": LossScaler(1.0), "w": torch.ones(2)}, path)
    loaded = safe_load(str(path))
    assert isinstance(loaded["loss_scaler"], LossScaler) and loaded["loss_scaler"].cur_scale == 1.0
    with pytest.raises(pickle.UnpicklingError):  # the allowlist holds for that load only
        torch.load(path, weights_only=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_pretrain_with_deepspeed(pd_dataset, tmp_path):
    """As a user runs it: pretrain with checkpoints; a resume from a checkpoint whose DeepSpeed file
    was replaced by a pickle that runs a command (its manifest rewritten to match) is one line and
    runs nothing; async saves are refused before anything starts."""
    from rapidnlp.train.checkpoint import manifest
    from test_checkpoint import one_error_line

    run_dir = tmp_path / "run"
    common = ("pretrain", "--config", TINY, "--data.path", pd_dataset, "--train.backend", "deepspeed",
              "--train.steps", "4", "--train.eval_interval", "2", "--data.val_fraction", "0.05",
              "--train.log_interval", "1", "--nproc", "2", "--parallel.zero", "2")
    res = run_cli(*common, "--train.run_dir", str(run_dir), "--checkpoint.interval", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert "val_loss" in rows[1] and "val_loss" in rows[3]
    assert "step 4/4" in res.stdout
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_4"

    hostile, marker = tmp_path / "hostile", tmp_path / "ran"
    shutil.copytree(run_dir / "checkpoints" / "step_2", hostile)
    target = hostile / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's alone
    torch.save({"optimizer_state_dict": Hostile(marker)}, target)
    meta = json.loads((hostile / "meta.json").read_text())
    (hostile / "meta.json").write_text(json.dumps({**meta, "files": manifest(str(hostile))}))
    res = run_cli(*common, "--train.run_dir", str(tmp_path / "again"), "--resume", str(hostile))
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]  # rank 0's, once
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert errors == [f"error: {target}: refused to unpickle (it names posix.system, not an allowed type); "
                      "DeepSpeed checkpoints are read without running code from them"], res.stderr
    assert not marker.exists()

    res = run_cli(*common, "--train.run_dir", str(run_dir), "--checkpoint.async_save", "true")
    assert one_error_line(res) == ("error: checkpoint.async_save: train.backend = deepspeed saves synchronously "
                                   "(DeepSpeed writes its own files); set checkpoint.async_save = false")
