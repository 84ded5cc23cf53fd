"""torch.distributed helpers: one code path for 1 process, torchrun, and torch.distributed.launch.

Launchers export WORLD_SIZE / RANK / LOCAL_RANK (``--local_rank`` from the old launcher is read
by the argparser and ignored: the environment carries the same value).  gloo serves CPU runs,
nccl CUDA runs.
"""
from __future__ import annotations

import os
import threading
import time
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
        agent_store = _agent_store()
        dist.init_process_group(backend, store=agent_store, rank=rank, world_size=world_size)
        global _peers
        _peers = PeerFailures(world_size, hosts_store=agent_store is None and rank == 0)
    return DistInfo(rank, world_size, local_rank, device)


def _agent_store() -> dist.Store | None:
    """Under torchrun, the agent's rendezvous store with the restart number as key prefix; None
    under a plain env:// launch, where rank 0 hosts it.  The agent keeps one store across
    ``--max-restarts``, and without the prefix the restarted ranks can read the addresses the
    killed ones published and wait for them forever (seen with gloo after rank 0 was killed)."""
    if (os.environ.get("TORCHELASTIC_RESTART_COUNT") is None
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"):
        return None
    return _store_client(timedelta(minutes=30))


def _store_client(timeout: timedelta) -> dist.Store:
    """A new connection to the launcher's store (torchrun's agent, or rank 0 under env://), its keys
    prefixed by the restart number so that a restarted launch never reads the killed one's."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"cssbench/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)


class PeerFailures:
    """An error on one rank ends every rank at once, and is named once.

    Without it a rank that stops -- a corrupt image only it reads, a checkpoint or results file
    only rank 0 writes, a NaN it sees an iteration before the others -- leaves the others waiting
    in their next collective until the process group's timeout (30 minutes by default), and each
    rank that does fail prints the same line.  A failing rank counts itself in a key of the
    launcher's store; a thread on every rank polls that key over its own connection (the process
    group's is busy in collectives) and ends its process with exit code 2 and no word, so the
    first rank to fail names the problem, once.  A process ended this way loses nothing a kill
    would not: every file is written by atomic rename.  Under a plain env:// launch rank 0 hosts
    the store, so it leaves last: a store op that finds its host gone fails with C++ warnings on
    stderr.
    """

    FAILED, ENDED, LEFT = "failed", "ended", "left"  # counters in the store
    POLL_SECONDS, GRACE_SECONDS = 0.1, 5.0

    def __init__(self, world_size: int, hosts_store: bool):
        self.store = _store_client(timedelta(seconds=60))
        self.world_size, self.hosts_store = world_size, hosts_store
        self.reported: bool | None = None  # this rank's own failure: True if it was the first
        self.peer_failed = False
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="peer-failures", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        try:
            while not (self.reported is None and self.store.check([self.FAILED])):
                if self._stop.wait(self.POLL_SECONDS):
                    return
            self.peer_failed = True
            self.store.add(self.ENDED, 1)
            self._leave_after_the_others()
        except Exception:  # the store is gone
            if not self.peer_failed:
                return  # before any failure: the collectives fail on their own
        os._exit(2)

    def _leave_after_the_others(self) -> None:
        """Once every rank has counted itself (failed or ended); the store's host once they have left."""
        def wait_until(condition) -> None:
            deadline = time.monotonic() + self.GRACE_SECONDS
            while not condition() and time.monotonic() < deadline:
                time.sleep(self.POLL_SECONDS / 2)

        wait_until(lambda: self.store.add(self.FAILED, 0) + self.store.add(self.ENDED, 0) >= self.world_size)
        if self.hosts_store:
            wait_until(lambda: self.store.add(self.LEFT, 0) >= self.world_size - 1)
        else:
            self.store.add(self.LEFT, 1)

    def report(self) -> bool:
        if self.reported is None:
            self.reported = True  # before counting, so that this rank's own watcher lets it finish
            try:
                self.reported = self.store.add(self.FAILED, 1) == 1
            except Exception:  # the store is gone: this rank cannot know whether another failed first
                pass
        return self.reported

    def leave(self, failed: bool) -> None:
        """Stop watching; after a failure, once the other ranks have ended."""
        if failed:
            try:
                self._leave_after_the_others()
            except Exception:
                pass
        self._stop.set()
        self._watcher.join()


_peers: PeerFailures | None = None  # set while a process group is up


def report_failure() -> bool:
    """Call on an error that ends this rank: every other rank of the run ends too (exit code 2,
    silently) instead of waiting for this one.  True where this rank failed first and so names
    the error.  Before the process group is up the errors are the flags', the same on every
    rank, so the launcher's rank 0 names them (a single process always does)."""
    if _peers is None:
        return int(os.environ.get("RANK", "0")) == 0
    return _peers.report()


def ending_on_failure() -> bool:
    """Whether this rank is ending because it or another rank failed (a launcher's SIGTERM to the
    survivors is then no interruption to report)."""
    return _peers is not None and (_peers.reported is not None or _peers.peer_failed)


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


def cleanup(failed: bool = False) -> None:
    """Leave the process group: after a barrier, so that no rank tears it down while another still
    talks to it, unless this rank ``failed`` (the others may wait in a collective it never joins):
    then the other ranks are told to end (``report_failure``) and this one leaves once they have."""
    if dist.is_available() and dist.is_initialized():
        if failed:
            report_failure()
        else:
            dist.barrier()
        if _peers is not None:
            _peers.leave(failed)
        if not failed:
            dist.barrier()  # every watcher stopped before the store's host (rank 0 under env://) exits
        dist.destroy_process_group()
