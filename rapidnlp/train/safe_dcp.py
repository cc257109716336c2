"""Reading DCP checkpoints without executing pickled code from them.

DCP's `.metadata` file is a pickle, and its default planner unpickles non-tensor items with
`weights_only=False`. A checkpoint may come from anywhere, so: the metadata goes through an
unpickler that admits only DCP's own metadata classes (and the few torch/builtin types they
hold), and byte items through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import io
import os
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from rapidnlp.errors import UserError

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint._extension",
)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a name like "torch.strided" to the layout, nothing else
    ("pathlib", "PosixPath"),  # the checkpoint id recorded in StorageMeta
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("enum", "Enum"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}' from checkpoint metadata")


def read_metadata(path: str) -> Metadata:
    """The checkpoint's `.metadata`, unpickled with only DCP's own classes admitted."""
    meta_path = os.path.join(path, ".metadata")
    if not os.path.isfile(meta_path):
        raise UserError(f"{path}: not a checkpoint (no .metadata file)")
    try:
        with open(meta_path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{meta_path}: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{meta_path}: unreadable checkpoint metadata ({e.__class__.__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{meta_path}: does not hold DCP metadata")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise UserError(f"{meta_path}: names the shard file {name!r}, outside the checkpoint folder; refused")
    return metadata


class SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(str(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
