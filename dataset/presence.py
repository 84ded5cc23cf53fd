"""Class-presence index of a split, and the image selection of a step read from it.

The reference opens every label file again for every task and step to decide which images a
step trains on (``filter_images``).  Here one pass over the split, run in parallel, records for
every image which of the 256 label values occur; the result is cached on disk under a key that
changes whenever the split's label files change, and every selection afterwards is a couple of
numpy boolean operations on that (N, 256) matrix.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .errors import DataError

NUM_VALUES = 256
IGNORE_LABEL = 255
_CHUNK = 64  # labels per task sent to a worker: large enough to amortise the pickling


class PresenceSource(Protocol):
    """What a split offers to be indexed: see ``voc.FileSplit`` and ``shapes.ShapesSplit``."""

    def __len__(self) -> int: ...

    def label_reader(self) -> tuple[Callable[[Any], np.ndarray], Sequence[Any]]:
        """A picklable function and one small handle per image; ``fn(handle)`` is the label."""
        ...

    def cache_key(self) -> str:
        """A string that changes whenever any label of the split may have changed."""
        ...


def values_present(label: np.ndarray) -> np.ndarray:
    """Boolean vector of length 256: which label values occur in ``label``."""
    return np.bincount(label.ravel(), minlength=NUM_VALUES)[:NUM_VALUES] > 0


def _chunk_presence(reader: Callable[[Any], np.ndarray], items: Sequence[Any]) -> np.ndarray:
    rows = [values_present(reader(item)) for item in items]
    return np.stack(rows) if rows else np.zeros((0, NUM_VALUES), dtype=bool)


def compute_presence(source: PresenceSource, num_workers: int = 0) -> np.ndarray:
    """One pass over the labels of ``source``, in ``num_workers`` processes (0 or 1: in-process)."""
    reader, items = source.label_reader()
    items = list(items)
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    if num_workers <= 1 or len(chunks) <= 1:
        parts = [_chunk_presence(reader, chunk) for chunk in chunks]
    else:
        with ProcessPoolExecutor(max_workers=min(num_workers, len(chunks))) as pool:
            parts = list(pool.map(_chunk_presence, [reader] * len(chunks), chunks))
    if not parts:
        return np.zeros((0, NUM_VALUES), dtype=bool)
    return np.concatenate(parts)


def files_cache_key(dataset: str, split: str, root: Path, label_files: Sequence[Path]) -> str:
    """Key of a file-backed split: the label files in index order with their sizes and mtimes.

    Paths are taken relative to the data root so that a moved dataset keeps its cache.  A
    missing label file is reported here, before any training starts.
    """
    digest = hashlib.sha256(f"{dataset}\0{split}\0".encode())
    for path in label_files:
        try:
            st = os.stat(path)
        except OSError as err:
            raise DataError(
                f"label file {path} of the {dataset} {split} split is missing ({err.strerror}); "
                f"re-download the dataset or fix the split list"
            ) from None
        rel = os.path.relpath(path, root)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{dataset}-{split}-{digest.hexdigest()[:20]}"


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """Write via a temp file + rename, so concurrent ranks never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the cache from other users of the root
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, n: int) -> np.ndarray | None:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.dtype != np.bool_ or array.shape != (n, NUM_VALUES):
        return None
    return array


def presence_index(
    source: PresenceSource, cache_dir: str | Path | None, num_workers: int = 0
) -> np.ndarray:
    """The (N, 256) presence matrix of ``source``, from the cache or computed and cached.

    Several ranks starting together may all compute it; each writes atomically under the same
    name, so the result is the same whoever wins.  An unwritable cache folder only costs a
    warning: the index is then recomputed on the next run.
    """
    if cache_dir is None:
        return compute_presence(source, num_workers)
    path = Path(cache_dir) / f"presence-{source.cache_key()}.npy"
    cached = _load_cached(path, len(source)) if path.exists() else None
    if cached is not None:
        return cached
    presence = compute_presence(source, num_workers)
    try:
        _atomic_save(path, presence)
    except OSError as err:
        warnings.warn(f"could not cache the class-presence index at {path} ({err}); pass a "
                      f"writable --cache_dir to avoid recomputing it on every run")
    return presence


def check_label_values(presence: np.ndarray, num_classes: int, describe: Callable[[int], str]) -> None:
    """Refuse a split whose labels hold values outside ``[0, num_classes)`` and 255 (the index
    records every value, so this costs no extra read): the label tables would silently turn
    them into background."""
    foreign = presence[:, num_classes:IGNORE_LABEL]
    rows = np.flatnonzero(foreign.any(axis=1))
    if len(rows):
        values = (np.flatnonzero(foreign[rows[0]]) + num_classes).tolist()
        more = f" ({len(rows) - 1} more labels too)" if len(rows) > 1 else ""
        raise DataError(f"label {describe(int(rows[0]))} holds values {values} outside the classes "
                        f"0..{num_classes - 1} and 255 (ignore){more}; fix the labels or check --dataset")


def select_images(
    presence: np.ndarray, new: Sequence[int], old: Sequence[int], overlap: bool
) -> np.ndarray:
    """Indices of the images a step uses (reference ``filter_images``).

    Background 0 is never a "new" class.  Overlap keeps every image showing a new class;
    disjoint additionally drops images showing any class outside old + new + {0, 255}, i.e. any
    future class.
    """
    new_fg = [c for c in new if c != 0]
    keep = presence[:, new_fg].any(axis=1)
    if not overlap:
        allowed = np.zeros(NUM_VALUES, dtype=bool)
        allowed[list(new) + list(old) + [0, IGNORE_LABEL]] = True
        keep &= ~presence[:, ~allowed].any(axis=1)
    return np.flatnonzero(keep)


def cache_key_of(parts: dict[str, Any]) -> str:
    """Short stable hash of a small JSON-able description (for generated splits)."""
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]
