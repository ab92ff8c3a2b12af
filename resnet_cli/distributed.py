"""torch.distributed glue for torchrun: who am I, and the one run dir all ranks share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def from_env() -> DistInfo:
    """torchrun's variables; a plain process is rank 0 of 1."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def uses_cuda(device: str) -> bool:
    """Whether `trainer.device` puts this run on a GPU (auto: when there is one)."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def backend_for(device: str) -> str:
    return "cpu:gloo,cuda:nccl" if uses_cuda(device) else "gloo"


def init(info: DistInfo, device: str = "auto") -> None:
    """Process group from torchrun's environment, on the device the run trains on: NCCL (and
    this rank's GPU) only for a CUDA run. `trainer.device=cpu` on a machine with fewer GPUs than
    processes must not touch CUDA at all (issue 11: set_device(1) failed on a 1-GPU machine)."""
    if not info.enabled or dist.is_initialized():
        return
    if uses_cuda(device):
        if info.local_rank >= torch.cuda.device_count():
            from .config import ConfigError

            raise ConfigError(f"trainer.device={device}: local rank {info.local_rank} has no GPU (this machine "
                              f"has {torch.cuda.device_count()}); start fewer processes per node or use "
                              "trainer.device=cpu")
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend_for(device))


def from_rank0(value: Any) -> Any:
    """Rank 0's value, on every rank: a run folder whose name holds a time stamp (Hydra would
    give each rank its own, as they start at slightly different times)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when one rank says so (used to stop all ranks at the same step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopPoll:
    """Whether to stop, asked before every step: `flag()` on this rank, agreed by all ranks
    under DDP. The agreement is an all-reduce whose result the host must read: on CUDA that
    stalls the launch queue, so there it is asked every `every` calls (all ranks make the same
    calls, so they ask at the same steps) and a signal stops the run up to `every` steps later.
    `force=True` always asks (the end of an epoch)."""

    def __init__(self, flag: Callable[[], bool], agree: Callable[[bool], bool] | None, every: int = 1):
        self.flag, self.agree, self.every, self.calls = flag, agree, max(int(every), 1), 0

    def __call__(self, force: bool = False) -> bool:
        if self.agree is None:
            return self.flag()
        self.calls += 1
        if not force and (self.calls - 1) % self.every:
            return False
        return self.agree(self.flag())


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank; nothing outside DDP."""
    if dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def params_identical(model: torch.nn.Module) -> bool:
    """Every rank holds bit-identical parameters and buffers (DDP's promise, checked once at
    the end of a run by comparing against rank 0's copy)."""
    if not dist.is_initialized():
        return True
    tensors = [t.detach() for t in model.state_dict().values() if t.is_floating_point()]
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    mismatch = torch.tensor([0 if torch.equal(flat, reference) else 1], device=flat.device)
    dist.all_reduce(mismatch)
    return int(mismatch.item()) == 0
