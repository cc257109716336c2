"""HF export and import: transformers' own classes load the folder offline and give our logits;
the tokenizer gives sentencepiece's ids; native -> HF -> native is exact; an imported folder
starts pretraining at another layout."""
import json
import os

import pytest
import torch

from conftest import REPO, run_cli

TINY = str(REPO / "configs" / "tiny.toml")


@pytest.fixture(scope="module")
def trained(pd_dataset, tmp_path_factory):
    """A 2-step tp=2 run (sharded checkpoint) on the real People's Daily slice."""
    run_dir = tmp_path_factory.mktemp("conv") / "run"
    res = run_cli("pretrain", "--config", TINY, "--nproc", "2", "--parallel.tp", "2", "--data.path", pd_dataset,
                  "--train.run_dir", str(run_dir), "--train.steps", "2", "--train.eval_interval", "0",
                  "--data.seq_len", "64", "--train.global_batch", "8", "--train.micro_batch", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir / "checkpoints" / "step_2"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    res = run_cli("convert", "--to", "hf", str(trained), str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _texts(n):
    from rapidnlp.data.demo import people_daily_lines

    out = []
    for line in people_daily_lines():
        out.append(line[:60])
        if len(out) == n:
            return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_transformers_loads_export_and_matches_our_logits(trained, exported):
    from rapidnlp.convert.folders import read_native

    config, state, extras = read_native(str(trained))
    assert extras == {}
    assert_hf_logits_equal_ours(exported, config, state)


def assert_hf_logits_equal_ours(exported, config, state) -> None:
    """transformers loads the exported folder offline (model and tokenizer), and its logits on real
    text equal those of our BertForMLM holding `state`, to 1e-4."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM, MegatronBertForMaskedLM

    from rapidnlp.model.bert import BertForMLM

    hf = AutoModelForMaskedLM.from_pretrained(exported).eval()
    assert isinstance(hf, {"post": BertForMaskedLM, "pre": MegatronBertForMaskedLM}[config.model.norm_position])
    tok = AutoTokenizer.from_pretrained(exported)
    ours = BertForMLM(config.model).eval()
    ours.load_state_dict(state)

    batch = tok(_texts(4), padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    types = torch.zeros_like(ids)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        mine = ours.mlm_logits(ids, types, mask, positions)
    real = mask.bool()
    diff = (theirs - mine)[real].abs().max().item()
    assert diff <= 1e-4, diff
    assert theirs.shape[-1] == config.model.padded_vocab_size


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tokenizer_ids_equal_sentencepiece(pd_dataset, exported):
    from transformers import AutoTokenizer

    from rapidnlp.data.tokenizer import Tokenizer

    hf = AutoTokenizer.from_pretrained(exported)
    sp = Tokenizer(pd_dataset + ".model")
    texts = _texts(500) + ["hello  world", " leading space", "Windows 95 系统", "emoji 😀 ok", "罕见字：龘靐齉"]
    mismatched = [t for t in texts if hf(t)["input_ids"] != [sp.cls_id, *sp.encode(t), sp.sep_id]]
    assert mismatched == []
    assert hf.decode(hf("北京欢迎你", add_special_tokens=False)["input_ids"]) == "北京欢迎你"
    assert hf.mask_token_id == sp.mask_id and hf.pad_token_id == sp.pad_id


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_round_trip_native_hf_native_is_exact(trained, exported, tmp_path):
    from rapidnlp.convert.folders import read_native

    back = tmp_path / "back"
    res = run_cli("convert", "--from", "hf", str(exported), str(back))
    assert res.returncode == 0, res.stderr[-3000:]
    cfg_a, a, _ = read_native(str(trained))
    cfg_b, b, _ = read_native(str(back))
    assert cfg_a.model == cfg_b.model
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = run_cli("ckpt", "info", str(back))
    assert info.returncode == 0 and "kind: weights" in info.stdout and "model: 75 tensors" in info.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretraining_continues_from_imported_weights_at_another_layout(pd_dataset, exported, tmp_path):
    native = tmp_path / "native"
    assert run_cli("convert", "--from", "hf", str(exported), str(native)).returncode == 0
    common = ["pretrain", "--config", TINY, "--data.path", pd_dataset, "--train.steps", "1",
              "--train.eval_interval", "0", "--data.seq_len", "64", "--train.global_batch", "8",
              "--train.micro_batch", "2"]
    res = run_cli(*common, "--nproc", "2", "--train.run_dir", str(tmp_path / "a"), "--resume", str(native))
    assert res.returncode == 0, res.stderr[-3000:]
    fresh = run_cli(*common, "--train.run_dir", str(tmp_path / "b"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    loaded = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    scratch = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert loaded["resumed_from"] == 0
    assert loaded["loss"] < scratch["loss"] - 0.05  # the imported weights were trained two steps


def test_bad_folders(tmp_path):
    res = run_cli("convert", "--from", "hf", str(tmp_path), str(tmp_path / "x"))
    assert res.returncode == 2 and "no config.json" in res.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    res = run_cli("convert", "--from", "hf", str(tmp_path), str(tmp_path / "x"))
    assert res.returncode == 2 and "neither bert nor megatron-bert" in res.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    res = run_cli("convert", "--from", "hf", str(tmp_path), str(tmp_path / "x"))
    assert res.returncode == 2 and "no num_hidden_layers" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("convert", "--to", "hf", str(tmp_path), str(tmp_path / "y"))
    assert res.returncode == 2 and "not a checkpoint" in res.stderr
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretraining_only_modules_are_saved_beside(trained, tmp_path):
    import shutil

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from rapidnlp.convert.folders import read_native
    from rapidnlp.io import write_json_atomic
    from rapidnlp.train.checkpoint import manifest

    _, state, _ = read_native(str(trained))
    gate = torch.randn(128, 64)
    ckpt = tmp_path / "with_fusion"
    dcp.save({"model": {**state, "knowledge_fusion.gate.weight": gate}}, checkpoint_id=str(ckpt), no_dist=True)
    shutil.copyfile(trained / "config.json", ckpt / "config.json")
    write_json_atomic(str(ckpt / "meta.json"), {"format": 1, "kind": "weights", "step": 2, "layout": None,
                                                "files": manifest(str(ckpt))})
    out = tmp_path / "hf"
    res = run_cli("convert", "--to", "hf", str(ckpt), str(out))
    assert res.returncode == 0 and "1 pretraining-only tensors" in res.stdout, res.stderr[-2000:]
    assert torch.equal(load_file(out / "pretraining_modules.safetensors")["knowledge_fusion.gate.weight"], gate)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_show_run_plots_exports_and_fills_masks(trained, tmp_path):
    """scripts/show_run.py (the demo's last step): loss.png beside metrics.jsonl, the latest
    checkpoint as a transformers folder, and top-5 fill-mask predictions through transformers."""
    import subprocess
    import sys

    from conftest import clean_env

    run_dir = trained.parent.parent
    hf = tmp_path / "hf"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "show_run.py"), str(run_dir), "--hf", str(hf),
                          "--text", "北京是中国的首[MASK]。"], capture_output=True, text=True, env=clean_env(), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert (hf / "model.safetensors").is_file() and "BertForMaskedLM" in res.stdout
    line = [l for l in res.stdout.splitlines() if l.startswith("北京是中国的首[MASK]。")]
    assert len(line) == 1 and len(line[0].split("->")[1].split()) == 10  # 5 predictions, 5 probabilities
