"""torchrun process setup and FSDP2 sharding: one shard unit per backbone block."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from training.model import TrainableReward


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; nccl on CUDA, gloo on CPU. One process: no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if world == 1:
        return Dist(device=torch.device("cuda" if use_cuda else device if device != "auto" else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(
        dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    )


def shard(model: TrainableReward, world: int, device: torch.device) -> None:
    """FSDP2: one shard unit per block (gathered for its forward, freed after), then the root (embedders, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in model.backbone.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def all_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # sync point: only on log steps
        values /= d.world
    return values


__all__ = ["Dist", "all_mean", "setup_distributed", "shard"]
