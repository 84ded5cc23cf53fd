"""DataLoaders of a step: shuffled training batches whose augmentation is a pure function of
(seed, epoch, sample), and sharded evaluation batches that count every image once.

Training samples are requested by the key ``(epoch, index)`` (:class:`EpochSampler`), and
:class:`SeededSamples` seeds Python's ``random`` -- the only stream the transforms draw from --
from ``(seed, epoch, index)`` before transforming a sample.  A batch is therefore the same
whichever worker decodes it, however many workers there are, whether they persist across epochs,
and whether the epoch runs in the original process or in a resumed one (``utils/seeding.py``).
"""
from __future__ import annotations

import random
import signal

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from utils.seeding import derive_seed

from .errors import DataError


class EpochSampler(Sampler):
    """A shuffling sampler whose items are ``(epoch, index)`` keys instead of indices."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededSamples(Dataset):
    """``dataset[index]`` with ``random`` seeded from ``(seed, epoch, index)`` first."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        random.seed(derive_seed(self.seed, epoch, index))
        return self.dataset[index]


class ShardSampler(Sampler):
    """Evaluation sharding without padding, so no image is counted twice across ranks."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def unblock_signals(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: workers are forked with SIGINT and SIGTERM blocked
    (``run.exit_on_signals`` blocks them for a thread the fork does not copy), so nothing could
    end them, and a process leaving on an error, its workers never shut down, waited for them
    forever at exit."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _loader_kwargs(num_workers: int, device) -> dict:
    return dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                worker_init_fn=unblock_signals)


def train_loader(dataset: Dataset, opts, info, seed: int) -> DataLoader:
    """Shuffled, rank-sharded batches of ``dataset``; the order and the augmentation of every
    epoch follow from ``seed`` and the epoch (``loader.sampler.set_epoch``) alone."""
    if len(dataset) < opts.batch_size * info.world_size:
        raise DataError(f"the training set of this step has {len(dataset)} images, fewer than one batch "
                        f"({opts.batch_size} x {info.world_size} processes); lower --batch_size")
    shuffle = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    return DataLoader(SeededSamples(dataset, seed), batch_size=opts.batch_size, sampler=EpochSampler(shuffle),
                      drop_last=True, **_loader_kwargs(opts.num_workers, info.device))


def eval_loader(dataset: Dataset, opts, info) -> DataLoader:
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    return DataLoader(dataset, batch_size=opts.val_batch_size, sampler=sampler,
                      **_loader_kwargs(opts.num_workers, info.device))
