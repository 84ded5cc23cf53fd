"""Checkpoint I/O: atomic writes, and a content digest that every load verifies.

A checkpoint is a dict saved by ``torch.save``, so plain ``torch.load`` still reads it; the
entry ``"digest"`` holds the SHA-256 of everything else -- the bytes, dtype and shape of every
tensor and the repr of every other value -- so flipped bits anywhere in the file fail the load
with a one-line error instead of training on damaged weights.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, ConfigError

DIGEST_KEY = "digest"
# Fault injection (scripts/chaos.py): SIGKILL this process inside its k-th checkpoint write,
# after the temp file is complete and before the rename that publishes it -- in the first attempt
# of a torchrun launch only, so that the ranks ``--max-restarts`` restarts can finish the run.
KILL_IN_SAVE_ENV = "CSSBENCH_KILL_IN_SAVE"
_saves = 0


def _update(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(f"ndarray {value.dtype} {value.shape};".encode())
        h.update(np.ascontiguousarray(value).data)
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}{{".encode())
        for k, v in value.items():
            _update(h, k)
            _update(h, v)
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)}[".encode())
        for v in value:
            _update(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__} {value!r};".encode())


def content_digest(obj: dict) -> str:
    """SHA-256 of a checkpoint's content, the ``"digest"`` entry excluded."""
    h = hashlib.sha256()
    _update(h, {k: v for k, v in obj.items() if k != DIGEST_KEY})
    return h.hexdigest()


def _canonical(value):
    """A copy of the containers of ``value`` with every string interned: pickle writes a shared
    object once and refers back to it later, so equal content must also share equally -- a
    resumed run's strings come from unpickling and would otherwise change the file's bytes."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        out = OrderedDict() if isinstance(value, OrderedDict) else {}
        for k, v in value.items():
            out[_canonical(k)] = _canonical(v)
        if hasattr(value, "_metadata"):  # nn.Module.state_dict's version records
            out._metadata = _canonical(value._metadata)
        return out
    if type(value) in (list, tuple):
        return type(value)(_canonical(v) for v in value)
    return value


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` with its digest to a temp file next to ``path``, then rename it into place,
    so that ``path`` is always either the old file or the complete new one."""
    global _saves
    path = Path(path)
    obj = _canonical({**obj, DIGEST_KEY: content_digest(obj)})
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:  # a file object: the archive's inner name is then fixed, so
            torch.save(obj, f)          # equal content gives equal bytes whatever the temp name
            f.flush()
            os.fsync(f.fileno())
        _saves += 1
        if os.environ.get(KILL_IN_SAVE_ENV) == str(_saves) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}); free disk space or make "
                              f"{path.parent} writable, then rerun the same command") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def require_writable(path: str | os.PathLike, flag: str) -> None:
    """Refuse ``flag``'s file ``path`` now if its folder cannot be written (created if missing), so
    that a bad output path stops a run before its training, not after it."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ConfigError(f"{flag} {path}: its folder cannot be written ({err.strerror or err}); make it "
                          f"writable or choose another {flag}") from None


def remove_stale_temp_files(folder: str | os.PathLike, pattern: str = "*.tmp") -> list[Path]:
    """Delete the temp files (``pattern``) that an atomic write killed half-way left in ``folder``."""
    stale = sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint whose digest matches its content; anything else is a CheckpointError."""
    obj = _read(Path(path), map_location)
    if content_digest(obj) != obj[DIGEST_KEY]:
        raise CheckpointError(f"checkpoint {path} is damaged (its content does not match its digest); "
                              "delete it and train that step again")
    return obj


def read_record(path: str | os.PathLike) -> dict:
    """A checkpoint as recorded, its tensors memory-mapped instead of read and its digest not
    checked: what a check compares (flags, recorded digests) before a verified ``load`` uses it."""
    return _read(Path(path), "cpu", mmap=True)


def _read(path: Path, map_location, mmap: bool = False) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                              "delete it and train that step again") from None
    if not isinstance(obj, dict) or DIGEST_KEY not in obj:
        raise CheckpointError(f"checkpoint {path} has no content digest, so it was not written by this tool "
                              "(or is damaged); delete it and train that step again")
    return obj


def strip_module_prefix(state: dict) -> dict:
    """Accept state dicts saved from DDP-wrapped models (keys starting with ``module.``)."""
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
