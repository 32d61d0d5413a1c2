"""Process-group plumbing for ``torchrun --nproc_per_node=N`` (NCCL on GPU, gloo on CPU).

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything is a single process and
the collectives are identities.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # this module started the process group and must end it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_sum(t).item() > 0)

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def setup(device: str | None) -> Dist:
    """Join torchrun's process group if there is one and pick this process's device:
    ``cuda:LOCAL_RANK`` under torchrun with CUDA, else ``device`` (None: CUDA when available)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r}: expected cpu, cuda or cuda:N ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if world > 1:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"process {rank} (LOCAL_RANK {local_rank}) has no GPU: this machine has "
                                 f"{torch.cuda.device_count()}; start fewer processes or use --device cpu")
            dev = torch.device("cuda", local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
        owns = True
    if world > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev, owns_group=owns)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()
