"""rapidnlp.io: atomic writes leave the old file or the complete new one, and no temporary file."""
import json
import os

import numpy as np
import pytest

from rapidnlp.io import atomic_open, atomic_path, atomic_write, write_json_atomic


def test_atomic_write_text_bytes_and_json(tmp_path):
    p = tmp_path / "sub" / "f.txt"  # the parent folder is created
    atomic_write(str(p), "人民日报\n")
    assert p.read_text(encoding="utf-8") == "人民日报\n"
    atomic_write(str(p), b"\x00\xff")  # replaces
    assert p.read_bytes() == b"\x00\xff"
    write_json_atomic(str(tmp_path / "m.json"), {"step": 3, "files": ["a"]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"step": 3, "files": ["a"]}
    assert sorted(os.listdir(tmp_path)) == ["m.json", "sub"]
    assert os.listdir(tmp_path / "sub") == ["f.txt"]


def test_atomic_open_to_a_library_that_takes_a_file(tmp_path):
    p = tmp_path / "a.npz"
    with atomic_open(str(p), "wb") as f:
        np.savez(f, x=np.arange(5))
    with np.load(p, allow_pickle=False) as z:
        assert z["x"].tolist() == [0, 1, 2, 3, 4]
    assert os.listdir(tmp_path) == ["a.npz"]


def test_failure_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(str(p), "w") as f:
            f.write("half of the new")
            f.flush()
            assert len(os.listdir(tmp_path)) == 2  # the new content is on a temporary name
            raise RuntimeError("disk full")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_path_suffix_and_failure_without_a_previous_file(tmp_path):
    p = tmp_path / "t.model"
    with atomic_path(str(p), suffix=".model") as tmp:
        assert tmp.startswith(str(p) + ".tmp-") and tmp.endswith(".model")
        with open(tmp, "wb") as f:
            f.write(b"model")
    assert p.read_bytes() == b"model" and os.listdir(tmp_path) == ["t.model"]

    q = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):  # BaseException too: a killed run cleans up
        with atomic_path(str(q)) as tmp:
            open(tmp, "wb").close()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["t.model"]


def test_append_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no 'w'"):
        with atomic_open(str(tmp_path / "f"), "a"):
            pass
