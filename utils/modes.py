"""Switching a model's mode for a block of code."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, its previous mode restored afterwards, also when
    the block raises (``model.train()`` re-freezes ``--fix_bn`` norms, see segmentation_module)."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)
