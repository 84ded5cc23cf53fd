"""torch.distributed helpers: one code path for 1 process, torchrun, and torch.distributed.launch.

Launchers export WORLD_SIZE / RANK / LOCAL_RANK (``--local_rank`` from the old launcher is read
by the argparser and ignored: the environment carries the same value).  gloo serves CPU runs,
nccl CUDA runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def share_cpus(device: torch.device) -> int:
    """On the CPU, one intra-op thread per core of this rank's share but one, which is left to the
    data pipeline (DataLoader workers, collation): torch's one thread per core oversubscribes the
    cores (2 cores, 1 worker: two epochs of the demo take 26.4 s with 2 threads, 20.8 s with 1).
    Not tied to ``--num_workers``: the thread count changes float rounding, and a resume may change
    the workers.  An explicit OMP_NUM_THREADS wins.  Returns the thread count in use."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, available_cpus() // local_ranks - 1))
    return torch.get_num_threads()


def init_distributed(device_name: str = "auto") -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=_restart_store(world_size), rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def _restart_store(world_size: int):
    """The rendezvous store; under ``torchrun --max-restarts`` the agent's store with the restart
    number as key prefix.  The agent keeps one store across restarts, and without the prefix the
    restarted ranks can read the addresses the killed ones published and wait for them forever
    (seen with gloo after rank 0 was killed)."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # init_method env://
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"cssbench/restart{restart}", store)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor in place over all ranks (no-op in a single process)."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
