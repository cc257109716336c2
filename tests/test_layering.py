"""The design's layering, checked on the source: config knows no torch and no trainer; parallel/
and model/ know nothing of pretrain/ or train/; nothing below train/ names a BERT parameter;
and the README's config table lists exactly the fields that exist."""
import ast
import dataclasses
import re
import subprocess
import sys

import pytest

from conftest import REPO, clean_env


def imports(folder: str) -> set[str]:
    found = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return found


def test_config_imports_no_torch_and_no_trainer():
    code = "import sys, rapidnlp.config, rapidnlp.deepspeed_config; print(sorted(m for m in sys.modules " \
           "if m == 'torch' or m.startswith('rapidnlp.train')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("folder", ["rapidnlp/parallel", "rapidnlp/model"])
def test_lower_layers_do_not_import_objectives_or_the_trainer(folder):
    bad = {m for m in imports(folder) if m.startswith(("rapidnlp.pretrain", "rapidnlp.train"))}
    assert not bad, bad


def test_model_imports_no_torch_distributed():
    assert not {m for m in imports("rapidnlp/model") if m.startswith("torch.distributed")}


@pytest.mark.parametrize("folder", ["rapidnlp/train", "rapidnlp/optim", "rapidnlp/parallel/pipeline.py",
                                    "rapidnlp/parallel/data_parallel.py", "rapidnlp/parallel/__init__.py"])
def test_no_bert_parameter_names_below_the_model(folder):
    paths = [REPO / folder] if folder.endswith(".py") else list((REPO / folder).rglob("*.py"))
    for path in paths:
        text = path.read_text()
        assert not re.search(r"[\"'](embeddings|lm_head|layers)[.\"']", text), path


def test_readme_config_table_lists_every_field():
    from rapidnlp.config import Config

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Config reference"):readme.index("`metrics.jsonl` has one row")]
    listed = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        section = None
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if "." in name:
                section, _ = name.split(".", 1)
                listed.add(name)
            else:
                listed.add(f"{section}.{name}")
    config = Config()
    fields = {f"{s}.{f.name}" for s in ("model", "parallel", "train", "data", "checkpoint", "knowledge")
              for f in dataclasses.fields(getattr(config, s))}
    assert fields - listed == set(), "missing from the README"
    assert {n for n in listed - fields if not n.startswith("objectives.")} == set(), "not in the config"
