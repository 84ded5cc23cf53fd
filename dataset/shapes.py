"""A synthetic, VOC-like segmentation set, generated on the fly (``--dataset shapes``).

Why: continual-learning effects (forgetting, what distillation keeps, whether new classes are
learned) become visible on a CPU in minutes.  The set is a *proxy* for Pascal VOC, and each of
its properties copies one of VOC's (README, "The synthetic benchmark"):

- 20 foreground classes, 1-4 objects per image (2.3 on average; VOC 2012's segmentation set:
  2.4), often several instances of one class (sheep in a flock), classes that co-occur in fixed
  pairs (like person + horse), so that about half of an increment's images also hold a base
  class, as in VOC (``COMPOSITION``), and a 255 band on object boundaries;
- no single low-level cue names a class: a class is a (shape, texture) combination that comes in
  three colours, every colour is worn by 5-7 classes and every texture by 5, and some classes form
  confusable groups (same shape and colours, other texture, like cat/dog; same texture and
  colours, similar shape, like bus/car);
- class ids are ordered by a fixed random permutation of the design table, as VOC's alphabetical
  order is unrelated to appearance, so every task's increments look like its base classes;
- the background is heterogeneous: gradients, blotches, textured regions, and unlabelled objects
  of the pretraining pool (``shapes_pool.py``), which are never a benchmark class;
- the backbone starts from weights pretrained on that pool (``scripts/pretrain_shapes.py``),
  as VOC runs start from ImageNet.

A sample is a pure function of (seed, split, index): the layout (classes, positions, sizes) comes
from one random stream and the appearance from another, so labels can be rendered without the
image (the class-presence index of a split is cheap).
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .presence import cache_key_of
from .shapes_draw import (OBJECT_RADIUS, Appearance, Placed, background, finish, label_objects,
                          object_mask, paint, place)
from .shapes_pool import pool_categories

GENERATOR_VERSION = 3  # bump when the output changes: it keys the presence cache
SPLITS = {"train": 0, "val": 1}
PROBE_IMAGES = 4  # labels rendered into the presence cache's key (``ShapesSplit.cache_key``)
MEMO_BYTES = 512 * 2**20  # samples a process keeps (``SampleMemo``): 64x64 samples of 32768 images

# The 20 classes in design order: (shape, texture, colours).  Every class comes in a warm, a cool
# and a third colour, so no class owns a hue (cars, boats and birds come in any colour).  Rows 1-2,
# 3+5 and 7-8 are confusable groups: same colours, another texture or a similar shape (cat/dog,
# cow/horse, bus/car).
DESIGN = (
    ("disc", "dots", ("orange", "blue", "white")),
    ("disc", "stripes", ("orange", "blue", "white")),
    ("ellipse", "solid", ("yellow", "green", "black")),
    ("ellipse", "checker", ("red", "cyan", "white")),
    ("hexagon", "solid", ("yellow", "green", "white")),
    ("hexagon", "dots", ("pink", "purple", "black")),
    ("square", "checker", ("red", "blue", "yellow")),
    ("frame", "checker", ("red", "blue", "yellow")),
    ("square", "stripes", ("pink", "green", "black")),
    ("frame", "solid", ("orange", "cyan", "purple")),
    ("triangle", "solid", ("red", "green", "white")),
    ("triangle", "stripes", ("yellow", "purple", "cyan")),
    ("diamond", "dots", ("pink", "cyan", "orange")),
    ("diamond", "checker", ("orange", "purple", "black")),
    ("cross", "stripes", ("red", "cyan", "black")),
    ("cross", "dots", ("yellow", "blue", "pink")),
    ("ring", "solid", ("pink", "blue", "white")),
    ("ring", "stripes", ("orange", "green", "red")),
    ("star", "checker", ("yellow", "cyan", "black")),
    ("star", "dots", ("red", "purple", "white")),
)
# Class k is DESIGN[CLASS_ORDER[k - 1]]: a fixed random permutation (numpy's default_rng(2012)),
# so that appearance says nothing about a class's id, hence about its step.
CLASS_ORDER = tuple(int(i) for i in np.random.default_rng(2012).permutation(len(DESIGN)))
CLASSES = tuple(Appearance(*DESIGN[i]) for i in CLASS_ORDER)  # CLASSES[k - 1] is class k


def _name(look: Appearance) -> str:
    return f"{look.texture} {look.shape}" if look.texture != "solid" else look.shape


CLASS_NAMES = ["background"] + [_name(c) for c in CLASSES]
NUM_FOREGROUND = len(CLASSES)
# The pretraining pool: every other (shape, texture) combination, so no pool category is a class.
POOL = pool_categories({(shape, texture) for shape, texture, _ in DESIGN})

# Co-occurring pairs (a perfect matching, so that every class stays equally frequent).  Several
# pairs straddle the 15/16 and 10/11 task boundaries, so overlap and disjoint protocols differ.
PAIRS = ((1, 6), (2, 14), (3, 17), (4, 19), (5, 9), (7, 16), (8, 12), (10, 18), (11, 20), (13, 15))
PARTNER = np.zeros(NUM_FOREGROUND + 1, dtype=np.int64)
for _a, _b in PAIRS:
    PARTNER[_a], PARTNER[_b] = _b, _a

_NUM_DISTRACTORS_P = (0.3, 0.4, 0.3)  # 0, 1 or 2 unlabelled pool objects in the background


@dataclass(frozen=True)
class Composition:
    """Which classes an image holds: ``objects_p[n - 1]`` is the chance of n objects; every object
    after the first is another instance of a class already drawn (``same_p``), that class's
    partner (``partner_p``), or any class."""

    objects_p: tuple[float, ...]
    same_p: float
    partner_p: float


# VOC's composition, from MiB's 15-5 and 19-1 image indices (``dataset.tasks.VOC_TRAIN_IMAGES``):
# 52.7 % of the images holding a class of 16-20 also hold one of 1-15, (9568 - 8437) / 2145, and
# 68.6 % of the tv images one of 1-19, (548 - (10582 - 10410)) / 548; VOC 2012's segmentation
# trainval holds 6929 objects in 2913 images, 2.38 per image.  This composition gives 53 %, 56 %
# and 2.3 (tests/test_shapes_proxy.py); generator 2's (``shapes_v2``), 77 %, 78 % and 2.1.
COMPOSITION = Composition(objects_p=(0.3, 0.3, 0.2, 0.2), same_p=0.6, partner_p=0.2)


@dataclass(frozen=True)
class _Layout:
    objects: tuple[tuple[int, Placed], ...]  # (class id, object), drawn in this order
    distractors: tuple[Placed, ...]  # drawn first, labelled background


def _rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    layout, appearance = np.random.SeedSequence([seed, SPLITS[split], index]).spawn(2)
    return np.random.default_rng(layout), np.random.default_rng(appearance)


def draw_classes(rng: np.random.Generator, composition: Composition = COMPOSITION) -> list[int]:
    """The class of each object of one image (every generator)."""
    count = 1 + int(rng.choice(len(composition.objects_p), p=composition.objects_p))
    classes = [int(rng.integers(1, NUM_FOREGROUND + 1))]
    for _ in range(count - 1):
        chance = rng.random()
        if chance < composition.same_p + composition.partner_p:
            drawn = classes[int(rng.integers(len(classes)))]
            classes.append(drawn if chance < composition.same_p else int(PARTNER[drawn]))
        else:
            classes.append(int(rng.integers(1, NUM_FOREGROUND + 1)))
    return classes


def _layout(rng: np.random.Generator, size: int, composition: Composition) -> _Layout:
    classes = draw_classes(rng, composition)
    objects = [(c, place(rng, CLASSES[c - 1], size, OBJECT_RADIUS)) for c in classes]
    # Large objects first, so that small ones are drawn on top and stay visible.
    objects.sort(key=lambda o: -o[1].radius)
    distractors = tuple(place(rng, POOL[int(rng.integers(len(POOL)))], size, (0.1, 0.2))
                        for _ in range(int(rng.choice(len(_NUM_DISTRACTORS_P), p=_NUM_DISTRACTORS_P))))
    return _Layout(tuple(objects), distractors)


def _render_label(layout: _Layout, masks: list[np.ndarray], size: int) -> np.ndarray:
    return label_objects([cls for cls, _ in layout.objects], masks, size)


def _render_image(layout: _Layout, masks: list[np.ndarray], rng: np.random.Generator, size: int) -> np.ndarray:
    image = background(rng, size)
    for obj in layout.distractors:
        paint(image, obj, object_mask(obj, size), rng, size)
    for (_, obj), mask in zip(layout.objects, masks):
        paint(image, obj, mask, rng, size)
    return finish(image, rng)


def generate_sample(seed: int, split: str, index: int, size: int = 64,
                    composition: Composition = COMPOSITION) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3 image, uint8 HxW label) of sample ``index`` of ``split``."""
    layout_rng, appearance_rng = _rngs(seed, split, index)
    layout = _layout(layout_rng, size, composition)
    masks = [object_mask(obj, size) for _, obj in layout.objects]
    return _render_image(layout, masks, appearance_rng, size), _render_label(layout, masks, size)


def generate_label(seed: int, split: str, index: int, size: int = 64,
                   composition: Composition = COMPOSITION) -> np.ndarray:
    """The label of ``generate_sample`` alone, without rendering the image."""
    layout = _layout(_rngs(seed, split, index)[0], size, composition)
    return _render_label(layout, [object_mask(obj, size) for _, obj in layout.objects], size)


class SampleMemo:
    """The samples a process has generated, kept (read-only) up to ``budget`` bytes.

    Why: generating a 64x64 sample takes about 2.5 ms, a quarter of the demo's training time per
    image on one thread, and the loader worker spent it on every sample of every epoch.
    A sample is a pure function of its index, so the memo returns the very bytes a generation
    would: batches, hence every figure, are unchanged.  Read-only arrays make an in-place edit by
    a transform fail loudly instead of corrupting later epochs.  A pickled memo (a worker started
    by ``spawn``) arrives empty.
    """

    def __init__(self, budget: int = MEMO_BYTES):
        self.budget = budget
        self.samples: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.nbytes = 0

    def get(self, index: int, make: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples.get(index)
        if sample is None:
            sample = make(index)
            size = sum(a.nbytes for a in sample)
            if self.nbytes + size <= self.budget:
                for array in sample:
                    array.flags.writeable = False
                self.samples[index] = sample
                self.nbytes += size
        return sample

    def __getstate__(self) -> dict:
        return {"budget": self.budget, "samples": {}, "nbytes": 0}


@dataclass(frozen=True)
class ShapesSplit:
    """A split of the synthetic set, indexable like ``voc.FileSplit``, with nothing on disk."""

    split: str
    num_images: int
    image_size: int = 64
    seed: int = 0
    dataset: str = "shapes"
    memo: SampleMemo = field(default_factory=SampleMemo, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown shapes split {self.split!r}; choose one of {list(SPLITS)}")

    def __len__(self) -> int:
        return self.num_images

    @property
    def _generator(self):
        """The module of the generator this split belongs to (generators 1 and 2 subclass it)."""
        return sys.modules[type(self).__module__]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 image and (H, W) uint8 label of one sample (read-only arrays), generated
        on its first request in this process and then kept (``SampleMemo``)."""
        return self.memo.get(index, self._generate)

    def _generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._generator.generate_sample(self.seed, self.split, index, self.image_size)

    def label_array(self, index: int) -> np.ndarray:
        return self._generator.generate_label(self.seed, self.split, index, self.image_size)

    def label_reader(self) -> tuple[Callable[[int], np.ndarray], range]:
        return self.label_array, range(self.num_images)

    def cache_key(self) -> str:
        """Keyed by the generator's output as well as its version: the labels of the first images
        enter the key, so an edited generator (another composition, say) never reads the index of
        the one before it, even where GENERATOR_VERSION was not bumped."""
        probe = hashlib.sha256(b"".join(self.label_array(i).tobytes() for i in range(min(PROBE_IMAGES, len(self)))))
        parts = {"split": self.split, "n": self.num_images, "size": self.image_size, "seed": self.seed,
                 "version": self._generator.GENERATOR_VERSION, "labels": probe.hexdigest()[:16]}
        return f"shapes-{self.split}-{cache_key_of(parts)}"
