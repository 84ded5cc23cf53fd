"""Checkpoint I/O: atomic writes so that an interrupted save never leaves a truncated file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import CheckpointError


def save_atomic(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                              "delete it and train that step again") from None


def strip_module_prefix(state: dict) -> dict:
    """Accept state dicts saved from DDP-wrapped models (keys starting with ``module.``)."""
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
