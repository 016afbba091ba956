"""Every process-group helper in one place: who this process is, starting the group, and the collectives the
trainer, the sampler and the checkpoints use (each a no-op in a single process)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun or deepspeed), or (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous port of a lone process, a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, deepspeed: bool) -> None:
    """Start the process group when launched with several processes (gloo on CPU, nccl on GPU).

    DeepSpeed wants a process group even alone; a lone process gets a local one-member group.
    """
    rank, size = world()
    if dist.is_initialized() or (size == 1 and not deepspeed):
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    else:
        dist.init_process_group(backend=backend, rank=rank, world_size=size)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_distributed() -> bool:
    """A process group of more than one process (however it was started: torchrun, deepspeed, mp.spawn)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate ``t`` from every rank (on ``device``: nccl takes no CPU tensors); returned on the CPU."""
    if not is_distributed():
        return t.cpu()
    t = t.to(device).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).cpu()


def mean_across(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each value (every rank passes the same keys)."""
    if not is_distributed() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def all_ranks(flag: bool, device: torch.device) -> bool:
    """``flag`` on every process of the job (True only if True on all); ``flag`` when not distributed.

    Ranks must run the same number of forwards: ZeRO-3 gathers the weights in each and DDP syncs buffers."""
    return not max_across(0.0 if flag else 1.0, device)  # any rank's False is the job's False


def max_across(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks (``value`` itself in a single process)."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
