"""The datasets of one continual-learning step: image selection, label remapping and masking.

A step sees a subset of a split (selected from the class-presence index, ``presence.py``) and
its labels rewritten by a 256-entry lookup table: classes are renumbered in learning order and
every class the step must not see is masked.  The table follows reference/mib_plop.md §2.3:

=======================  ========  ==========  ===========  ============  ==============
split / masking          void 255  bg/void 0   old class    current       future
=======================  ========  ==========  ===========  ============  ==============
train, PLOP              255       0           0            kept          0
train, MiB               0 (VOC)   0           0            kept          0
val, PLOP                255       0           0            kept          0
val, MiB                 255       0 (ADE 255) 255          kept          255
test, PLOP               255       0           kept         kept          0
test, MiB                255       0 (ADE 255) kept         kept          255
=======================  ========  ==========  ===========  ============  ==============

"current" is the step's new classes for train/val and every seen class for test.  In ADE20K,
0 is a real "void" label rather than background, which MiB ignores at val/test.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from .ade import ade_split
from .errors import DataError
from .presence import IGNORE_LABEL, NUM_VALUES, check_label_values, presence_index, select_images
from . import shapes, shapes_v1, shapes_v2
from .tasks import Task
from .transforms import eval_transform, image_tensor, remap_label, train_transform
from .voc import voc_split

MASKINGS = ("plop", "mib")
SPLIT_KINDS = ("train", "val", "test")


def label_lut(task: Task, kind: str, masking: str = "plop") -> np.ndarray:
    """The uint8 table ``lut[original id] -> training label`` of a split of this step."""
    if kind not in SPLIT_KINDS:
        raise ValueError(f"kind must be one of {SPLIT_KINDS}, not {kind!r}")
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, not {masking!r}")
    current = task.seen_classes if kind == "test" else task.new_classes
    ade = task.dataset == "ade"
    if masking == "plop":
        fill, void, background = 0, IGNORE_LABEL, 0
    else:
        fill = 0 if kind == "train" else IGNORE_LABEL
        void = fill
        background = fill if ade else 0
    lut = np.full(NUM_VALUES, fill, dtype=np.uint8)
    keep = [c for c in current if c != 0]
    lut[keep] = task.channels(keep)
    lut[0] = background
    lut[IGNORE_LABEL] = void
    return lut


def channel_lut(task: Task) -> np.ndarray:
    """``lut[class id] -> its output channel`` for every class of the task, 255 kept: a full label
    file in the model's numbering (the identity in the natural order)."""
    lut = np.arange(NUM_VALUES, dtype=np.uint8)
    lut[task.order] = np.arange(len(task.order))
    return lut


class Source(Protocol):
    """A full split (``voc.FileSplit``, ``shapes.ShapesSplit``)."""

    dataset: str
    split: str

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB image and (H, W) uint8 label of class ids."""


class IncrementalSegmentation(Dataset):
    """Images ``indices`` of ``source``, transformed jointly, labels remapped by ``lut``.

    ``__getitem__`` returns (uint8 3xHxW image, uint8 HxW label; ``transforms.device_batch``
    normalises and widens them on the device).  ``presence``
    holds the class-presence rows of these images (aligned with the dataset's positions),
    which is what an exemplar memory selects from.
    """

    def __init__(
        self,
        source: Source,
        indices: np.ndarray,
        transform: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
        lut: np.ndarray,
        presence: np.ndarray,
    ):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.lut = lut
        self.presence = presence

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.source.load(int(self.indices[i]))
        image, label = self.transform(image, label)
        return image_tensor(image), remap_label(label, self.lut)


# The synthetic set's generators by ``--shapes_version``: the VOC-like proxy of README "Results on
# the synthetic benchmark" (3, the default), the same with fewer instances per class (2), and the
# first set, one colour per class (1); the older ones reproduce figures measured on them.
SHAPES_GENERATORS = {module.GENERATOR_VERSION: module for module in (shapes_v1, shapes_v2, shapes)}
DEFAULT_SHAPES_VERSION = shapes.GENERATOR_VERSION


@dataclass(frozen=True)
class DataOptions:
    """The options the data layer reads (argparser defines them; defaults for bare namespaces)."""

    dataset: str
    data_root: str | None = None
    cache_dir: str | None = None
    overlap: bool = False
    masking: str = "plop"
    crop_size: int = 512
    crop_val: bool = True
    shapes_train_size: int = 2000
    shapes_val_size: int = 300
    shapes_image_size: int = 64
    shapes_seed: int = 0
    shapes_version: int = DEFAULT_SHAPES_VERSION
    num_workers: int = 0

    @classmethod
    def from_opts(cls, opts: Any) -> "DataOptions":
        names = cls.__dataclass_fields__
        return cls(**{n: getattr(opts, n) for n in names if hasattr(opts, n)})


def shapes_generator(version: int):
    return SHAPES_GENERATORS[version]


def open_split(options: DataOptions, split: str) -> Any:
    """The full "train" or "val" split of the configured dataset."""
    if options.dataset == "shapes":
        size = options.shapes_train_size if split == "train" else options.shapes_val_size
        generator = shapes_generator(options.shapes_version)
        return generator.ShapesSplit(split, size, options.shapes_image_size, options.shapes_seed)
    if options.dataset not in ("voc", "ade"):
        raise DataError(f"unknown dataset {options.dataset!r}; choose voc, ade or shapes")
    if not options.data_root:
        script = "download_voc.sh" if options.dataset == "voc" else "download_ade.sh"
        raise DataError(
            f"--data_root is required for {options.dataset}; point it at the folder made by "
            f"data/{script} (see data/README.md), or use --dataset shapes"
        )
    if options.dataset == "voc":
        return voc_split(options.data_root, split)
    return ade_split(options.data_root, split)


def cache_folder(options: DataOptions) -> Path:
    """--cache_dir, else ``<data_root>/.cache``, else ``./.cache/shapes`` for the synthetic set."""
    if options.cache_dir:
        return Path(options.cache_dir).expanduser()
    if options.dataset == "shapes":
        return Path(".cache") / "shapes"
    return Path(options.data_root).expanduser() / ".cache"


def indexed_split(options: DataOptions, split: str) -> tuple[Any, np.ndarray]:
    """A full split and its class-presence index (computed once, then read from ``cache_folder``)."""
    source = open_split(options, split)
    return source, presence_index(source, cache_folder(options), max(0, int(options.num_workers or 0)))


def _require_images(indices: np.ndarray, what: str, task: Task, classes: list[int]) -> None:
    if len(indices) == 0:
        fix = "use --overlap or more data" if what == "disjoint training" else "use more data"
        raise DataError(
            f"step {task.step} of {task.dataset} {task.name} selects no {what} image (none shows "
            f"any of the classes {[c for c in classes if c != 0]}); {fix}"
        )


def _describe(source, index: int) -> str:
    """The label file of an image, or its place in a generated split."""
    labels = getattr(source, "labels", None)
    return str(labels[index]) if labels is not None else f"#{index} of the {source.dataset} {source.split} split"


def build_datasets(opts: Any, task: Task) -> tuple[IncrementalSegmentation, ...]:
    """(train, val, test) datasets of one step.

    train: images with a new class (disjoint: and no future class), labels masked to the new
    classes; val: images with a new class, masked likewise (overlap rule always); test: images
    with any seen class, every seen class kept.  Val and test both read the "val" split.
    """
    options = DataOptions.from_opts(opts)
    if options.masking not in MASKINGS:
        raise DataError(f"unknown masking {options.masking!r}; choose one of {', '.join(MASKINGS)}")
    train_src, train_presence = indexed_split(options, "train")
    val_src, val_presence = indexed_split(options, "val")
    for source, presence in ((train_src, train_presence), (val_src, val_presence)):
        check_label_values(presence, task.num_classes, lambda i, s=source: _describe(s, i))

    new, old, seen = task.new_classes, task.old_classes, task.seen_classes
    train_idx = select_images(train_presence, new, old, overlap=options.overlap)
    protocol = "overlap" if options.overlap else "disjoint"
    _require_images(train_idx, f"{protocol} training", task, new)
    val_idx = select_images(val_presence, new, old, overlap=True)
    _require_images(val_idx, "validation", task, new)
    test_idx = select_images(val_presence, seen, [], overlap=True)
    _require_images(test_idx, "test", task, seen)

    crop, masking = options.crop_size, options.masking
    evaluate = eval_transform(crop, options.crop_val)
    return (
        IncrementalSegmentation(train_src, train_idx, train_transform(crop),
                                label_lut(task, "train", masking), train_presence[train_idx]),
        IncrementalSegmentation(val_src, val_idx, evaluate,
                                label_lut(task, "val", masking), val_presence[val_idx]),
        IncrementalSegmentation(val_src, test_idx, evaluate,
                                label_lut(task, "test", masking), val_presence[test_idx]),
    )
