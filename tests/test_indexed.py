"""Megatron indexed dataset: byte compatibility with Megatron-LM's own files, round trips, bad files."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from rapidnlp.data.indexed import IndexedDataset, IndexedDatasetWriter, dtype_for_vocab
from rapidnlp.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "megatron_indexed"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", ["uint16_docs", "int32_docs"])
def test_reads_megatron_files_token_for_token(name):
    exp = EXPECTED[name]
    ds = IndexedDataset(str(FIXTURES / name))
    assert ds.dtype == np.dtype(exp["dtype"])
    assert len(ds) == 13
    assert ds.num_documents == 7
    assert ds.sequence_lengths.dtype == np.int32
    assert ds.document_indices.dtype == np.int64
    assert ds.sequence_lengths.tolist() == exp["sequence_lengths"]
    assert ds.document_indices.tolist() == exp["document_indices"]
    docs = [[seq.tolist() for seq in ds.document(d)] for d in range(ds.num_documents)]
    assert docs == exp["documents"]
    assert ds[0].dtype == ds.dtype
    assert ds[-1].tolist() == exp["documents"][-1][-1]


@pytest.mark.parametrize("name", ["uint16_docs", "int32_docs"])
def test_writes_megatron_files_byte_for_byte(tmp_path, name):
    exp = EXPECTED[name]
    with IndexedDatasetWriter(str(tmp_path / name), exp["dtype"]) as w:
        for doc in exp["documents"]:
            w.add_document(doc)
    for ext in (".bin", ".idx"):
        assert (tmp_path / (name + ext)).read_bytes() == (FIXTURES / (name + ext)).read_bytes()
    assert sorted(os.listdir(tmp_path)) == [name + ".bin", name + ".idx"]


def test_dtype_for_vocab():
    assert dtype_for_vocab(8000) == np.uint16
    assert dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(65500) == np.int32
    assert dtype_for_vocab(250_000) == np.int32


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip_random_documents(tmp_path, dtype):
    rng = np.random.default_rng(0)
    high = 65_000 if dtype == np.uint16 else 1_000_000
    docs = [[rng.integers(0, high, size=rng.integers(0, 40)) for _ in range(rng.integers(1, 6))]
            for _ in range(200)]
    with IndexedDatasetWriter(str(tmp_path / "r"), dtype) as w:
        for i, doc in enumerate(docs):
            w.add_document(doc if i % 2 else [s.tolist() for s in doc])  # arrays and lists
    ds = IndexedDataset(str(tmp_path / "r.idx"))  # a file name works as well as a prefix
    assert ds.num_documents == 200
    assert len(ds) == sum(len(d) for d in docs)
    assert ds.document_indices[0] == 0 and ds.document_indices[-1] == len(ds)
    for d, doc in enumerate(docs):
        got = ds.document(d)
        assert len(got) == len(doc)
        for a, b in zip(got, doc):
            assert a.dtype == dtype
            np.testing.assert_array_equal(a, b)
    assert ds.num_tokens == sum(len(s) for d in docs for s in d)


def test_empty_document_refused_and_out_of_range_ids(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
        with pytest.raises(ValueError, match="empty document"):
            w.add_document([])
        with pytest.raises(ValueError, match="out of range"):
            w.add_document([np.array([1, 70_000])])
        w.add_document([[1, 2, 3]])
    assert IndexedDataset(str(tmp_path / "x"))[0].tolist() == [1, 2, 3]


def test_exception_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
            w.add_document([[1, 2, 3]])
            raise KeyError("boom")
    assert os.listdir(tmp_path) == []


def test_abandoned_writer_leaves_nothing(tmp_path):
    w = IndexedDatasetWriter(str(tmp_path / "x"), np.uint16)
    w.add_document([[1, 2, 3]])
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.idx").exists()
    del w
    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_old_dataset_consistent(tmp_path):
    prefix = str(tmp_path / "x")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document([[7, 8]])
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([[1, 2, 3]])
            raise RuntimeError
    assert IndexedDataset(prefix)[0].tolist() == [7, 8]
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx"]


def _copy_fixture(tmp_path, name="uint16_docs"):
    for ext in (".bin", ".idx"):
        shutil.copyfile(FIXTURES / (name + ext), tmp_path / (name + ext))
    return tmp_path / name


def test_missing_files_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.idx: indexed dataset file not found"):
        IndexedDataset(str(tmp_path / "nope"))
    prefix = _copy_fixture(tmp_path)
    os.remove(str(prefix) + ".bin")
    with pytest.raises(UserError, match=r"uint16_docs\.bin: indexed dataset file not found"):
        IndexedDataset(str(prefix))


def test_truncated_bin_names_the_file(tmp_path):
    prefix = _copy_fixture(tmp_path)
    with open(str(prefix) + ".bin", "r+b") as f:
        f.truncate(480)  # one uint16 token short
    with pytest.raises(UserError, match=r"uint16_docs\.bin: data file is 480 bytes .* needs 482"):
        IndexedDataset(str(prefix))


def test_truncated_idx_names_the_file(tmp_path):
    prefix = _copy_fixture(tmp_path)
    with open(str(prefix) + ".idx", "r+b") as f:
        f.truncate(200)
    with pytest.raises(UserError, match=r"uint16_docs\.idx: index is 200 bytes"):
        IndexedDataset(str(prefix))


def test_bad_magic_names_the_file(tmp_path):
    prefix = _copy_fixture(tmp_path)
    data = bytearray((tmp_path / "uint16_docs.idx").read_bytes())
    data[:4] = b"JUNK"
    (tmp_path / "uint16_docs.idx").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"uint16_docs\.idx: not a Megatron indexed dataset"):
        IndexedDataset(str(prefix))
    (tmp_path / "uint16_docs.idx").write_bytes(b"")
    with pytest.raises(UserError, match=r"uint16_docs\.idx: not a Megatron indexed dataset"):
        IndexedDataset(str(prefix))
