"""Randomness as a function of where it is used, so that a resumed run draws what the
uninterrupted one drew.

Two rules make a run independent of when it was interrupted and of how its data is loaded:

* every global stream (Python, numpy, torch) is reseeded at each epoch start from
  ``(seed, step, epoch, rank)``, so nothing drawn in an earlier epoch carries over;
* the augmentation of a sample is drawn from ``(seed, step, epoch, index)``
  (``dataset.loaders.SeededSamples``), so it does not depend on which DataLoader worker decodes
  it, how many workers there are, or whether they persist across epochs.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (negative ones too), the same in every process and run."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
