"""Class-balanced exemplar memory of DKD-M (recent_methods.md §5.4; DKD's ``utils/memory.py``,
adapted from SSUL, Cha et al., NeurIPS 2021).

At step t the memory holds ``--mem_size`` images of earlier steps, chosen so that every old
foreground class is represented about equally.  Candidates are the images selected at step
t-1 (with the classes recorded for them then) plus the whole step t-1 training set, whose
classes are its (masked) ground truth plus the step t-1 model's confident pseudo-labels on
background (sigmoid score >= 0.9), because old classes are unlabelled there.

Pieces, each independent of the data layer:

* :func:`batch_presence` / :func:`candidate_presence` -- classes present per image, with
  DKD-M's pseudo-labels, for a batch / for a whole dataset (one pass of the step t-1 model);
* :func:`select_balanced` -- the class-balanced round robin, from a presence matrix;
  :func:`build_memory` -- candidates of step t-1 merged with the previous memory, then selected;
* :func:`save_memory` / :func:`load_memory` / :func:`memory_path` -- the JSON list in the run
  directory (the reference's ``step_t/memory.json``), which also seeds the next step;
* :func:`memory_dataset` -- serves the exemplars with labels masked like the current data;
* :func:`with_memory` -- all of the above for one step of a run: the step's training set plus
  its memory.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader

from utils.distributed import barrier
from utils.modes import eval_mode

from .errors import DataError
from .incremental import IncrementalSegmentation, build_datasets
from .loaders import unblock_signals
from .tasks import Task
from .transforms import device_batch, eval_transform

NUM_VALUES = 256
PSEUDO_LABEL_SCORE = 0.9  # DKD/SSUL confidence for a background pixel to count as an old class


def batch_presence(labels: Tensor, logits: Optional[Tensor] = None,
                   threshold: float = PSEUDO_LABEL_SCORE) -> Tensor:
    """(B, 256) bool: which label values occur in each image (§5.4 candidate classes).

    ``labels`` (B, H, W) are the masked labels of the step the images were trained at.  With the
    sigmoid ``logits`` (B, C, H, W) of that step's model (channel 0 auxiliary, channel k class
    k), a background pixel whose best class score is >= ``threshold`` counts as that class.
    """
    labels = labels.long()
    if logits is not None:
        score, cls = torch.sigmoid(logits[:, 1:].float()).max(dim=1)
        labels = torch.where((labels == 0) & (score >= threshold), cls + 1, labels)
    present = torch.zeros(labels.shape[0], NUM_VALUES, dtype=torch.bool, device=labels.device)
    return present.scatter_(1, labels.flatten(1), True)


@torch.no_grad()
def candidate_presence(model: nn.Module, dataset: IncrementalSegmentation, device: torch.device,
                       batch_size: int, num_workers: int = 0) -> np.ndarray:
    """(len(dataset), 256) bool presence of every image of ``dataset`` (:func:`batch_presence`
    with the sigmoid logits of ``model``, which must be the model the dataset's step trained).

    With several processes each rank runs its share of the images and the rows are summed over
    ranks, so every rank returns the same matrix.  Use an evaluation transform (no random crop).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, worker_init_fn=unblock_signals)
    rows = torch.zeros(len(dataset), NUM_VALUES, dtype=torch.int32, device=device)
    start = 0
    with eval_mode(model):
        for images, labels in loader:
            images, labels = device_batch(images, labels, device)
            present = batch_presence(labels, model(images)["logits"])
            rows[shard[start:start + len(present)]] = present.to(torch.int32)
            start += len(present)
    if world > 1:
        dist.all_reduce(rows)
    return (rows > 0).cpu().numpy()


def select_balanced(presence: np.ndarray, indices: Sequence[int], classes: Sequence[int], size: int,
                    seed: int) -> list[int]:
    """Class-balanced round robin (§5.4): up to ``size`` of ``indices``, in the order picked.

    Candidates are shuffled once and the classes put in a random order (both from ``seed``, so
    every rank picks the same list).  Then, class after class in that order and round after
    round, each class takes the first untaken candidate that shows it, until ``size`` images are
    picked or no class has a candidate left (the reference loops forever in that case).
    ``presence`` (N, 256) bool is aligned with ``indices``.
    """
    presence = np.asarray(presence, dtype=bool)
    if presence.shape != (len(indices), NUM_VALUES):
        raise ValueError(f"presence must be ({len(indices)}, {NUM_VALUES}), got {presence.shape}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(indices))
    class_order = rng.permutation(np.asarray(list(classes), dtype=np.int64))
    queues = [order[presence[order, c]] for c in class_order]  # candidates per class, shuffled order
    heads = [0] * len(queues)
    taken = np.zeros(len(indices), dtype=bool)
    picked: list[int] = []
    while len(picked) < size:
        progress = False
        for k, queue in enumerate(queues):
            while heads[k] < len(queue) and taken[queue[heads[k]]]:
                heads[k] += 1
            if heads[k] == len(queue):
                continue
            candidate = int(queue[heads[k]])
            taken[candidate] = True
            picked.append(candidate)
            progress = True
            if len(picked) == size:
                break
        if not progress:
            break
    return [int(indices[i]) for i in picked]


def presence_from_classes(class_lists: Sequence[Sequence[int]]) -> np.ndarray:
    """(N, 256) bool presence of images described by their class lists (saved memory items)."""
    presence = np.zeros((len(class_lists), NUM_VALUES), dtype=bool)
    for row, classes in enumerate(class_lists):
        presence[row, list(classes)] = True
    return presence


def merge_candidates(indices_a: Sequence[int], presence_a: np.ndarray, indices_b: Sequence[int],
                     presence_b: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Union of two candidate sets; an image in both keeps the union of its classes.

    (The reference concatenates the lists, so such an image could be picked twice.)
    """
    merged: dict[int, np.ndarray] = {}
    for indices, presence in ((indices_a, presence_a), (indices_b, presence_b)):
        for index, row in zip(indices, np.asarray(presence, dtype=bool)):
            index = int(index)
            merged[index] = merged[index] | row if index in merged else row.copy()
    keys = sorted(merged)
    rows = np.stack([merged[k] for k in keys]) if keys else np.zeros((0, NUM_VALUES), dtype=bool)
    return keys, rows


def build_memory(candidates: tuple[Sequence[int], np.ndarray], previous: Optional[tuple[Sequence[int], np.ndarray]],
                 classes: Sequence[int], size: int, seed: int) -> tuple[list[int], np.ndarray]:
    """Memory of a step: the step t-1 training images (``candidates``: dataset indices and
    presence) plus the step t-1 memory (``previous``, None at step 1), class-balanced over the
    old foreground ``classes``.  Returns the chosen indices and their presence rows."""
    indices, presence = candidates
    if previous is not None:
        indices, presence = merge_candidates(previous[0], previous[1], indices, presence)
    chosen = select_balanced(presence, indices, classes, size, seed)
    row_of = {int(index): row for index, row in zip(indices, np.asarray(presence, dtype=bool))}
    rows = np.stack([row_of[i] for i in chosen]) if chosen else np.zeros((0, NUM_VALUES), dtype=bool)
    return chosen, rows


def memory_dataset(train: IncrementalSegmentation, indices: Sequence[int],
                   presence: np.ndarray) -> IncrementalSegmentation:
    """The exemplars as a dataset of the current step: the source, transform and label table of
    ``train``, so old classes read as background (0) exactly like in the current data (§5.4);
    concatenate it with ``train``."""
    return IncrementalSegmentation(train.source, np.asarray(indices, dtype=np.int64), train.transform,
                                   train.lut, np.asarray(presence, dtype=bool))


# --- the JSON list in the run directory ---------------------------------------------------------


def memory_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the memory used at ``step`` is stored."""
    return Path(run_dir) / f"memory-step{step}.json"


def save_memory(path: str | os.PathLike, step: int, indices: Sequence[int], presence: np.ndarray,
                seed: int) -> None:
    """Write the exemplars (dataset indices and the classes known for each) atomically."""
    presence = np.asarray(presence, dtype=bool)
    items = [{"index": int(i), "classes": np.flatnonzero(row).tolist()} for i, row in zip(indices, presence)]
    blob = {"step": step, "seed": seed, "size": len(items), "items": items}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(blob, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_memory(path: str | os.PathLike) -> tuple[list[int], np.ndarray]:
    """(dataset indices, (N, 256) presence) of a saved memory."""
    path = Path(path)
    try:
        with open(path) as f:
            items = json.load(f)["items"]
        indices = [int(item["index"]) for item in items]
        classes = [item["classes"] for item in items]
    except FileNotFoundError:
        raise DataError(f"exemplar memory {path} does not exist; train the previous step with the same "
                        "--mem_size and --name first") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"exemplar memory {path} is unreadable ({err}); delete it and retrain the "
                        "previous step") from None
    return indices, presence_from_classes(classes)


# --- one step of a run --------------------------------------------------------------------------


def with_memory(opts, task: Task, teacher: nn.Module, run_dir: Path, train: IncrementalSegmentation,
                device: torch.device, is_main: bool) -> ConcatDataset:
    """DKD-M (recent_methods.md §5.4): ``train`` plus a class-balanced memory of earlier images.

    Candidates are the step t-1 training images (classes found with the teacher) plus the step
    t-1 memory; the chosen list is saved as JSON in the run directory, so a rerun reuses it.
    Memory labels go through the current step's table: old classes read as background.
    """
    path = memory_path(run_dir, task.step)
    if not path.is_file():
        prev = build_datasets(opts, task.at(task.step - 1))[0]
        prev = IncrementalSegmentation(prev.source, prev.indices, eval_transform(opts.crop_size, True), prev.lut,
                                       prev.presence)
        # training's batch size, not an evaluation setting: the memory is part of the training
        presence = candidate_presence(teacher, prev, device, opts.batch_size)
        previous = load_memory(memory_path(run_dir, task.step - 1)) if task.step > 1 else None
        seed = opts.random_seed + task.step
        indices, rows = build_memory((prev.indices, presence), previous,
                                     [c for c in task.old_classes if c], opts.mem_size, seed)
        if is_main:
            save_memory(path, task.step, indices, rows, seed)
        barrier()
    indices, rows = load_memory(path)
    return ConcatDataset([train, memory_dataset(train, indices, rows)])
