"""ParallelDims: the one object that owns the device mesh and answers layout questions.

The mesh always has the three axes (pp, dp, tp), in that order (tp innermost, so a tp group
is the ranks of one node); an axis of size 1 is simply inactive. With HSDP the dp axis is built
as (dp_replicate, dp_shard) and flattened into "dp", so that everything else still sees one dp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    pp: int
    dp: int
    tp: int
    mesh: DeviceMesh
    hsdp_shard: int = 0

    @classmethod
    def build(cls, pp: int, dp: int, tp: int, hsdp_shard: int = 0) -> "ParallelDims":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if not hsdp_shard:
            mesh = init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
            return cls(pp=pp, dp=dp, tp=tp, mesh=mesh)
        mesh = init_device_mesh(
            device_type, (pp, dp // hsdp_shard, hsdp_shard, tp), mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp")
        )
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return cls(pp=pp, dp=dp, tp=tp, mesh=mesh, hsdp_shard=hsdp_shard)

    @classmethod
    def from_config(cls, parallel) -> "ParallelDims":
        """From a resolved rapidnlp.config.ParallelConfig."""
        return cls.build(parallel.pp, parallel.dp, parallel.tp, parallel.hsdp_shard)

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh FSDP shards over: dp, or (dp_replicate, dp_shard) for HSDP."""
        return self.mesh["dp_replicate", "dp_shard"] if self.hsdp_shard else self.mesh["dp"]

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank()

    @property
    def device(self) -> torch.device:
        if self.mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
