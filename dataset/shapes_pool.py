"""Pretraining scenes of the synthetic benchmark: ImageNet's role for ``--dataset shapes``.

Every published VOC/ADE run starts its backbone from ImageNet: generic features learned on
categories that share the benchmark's low-level vocabulary (colours, textures, parts) but are
not its classes.  The pool (``shapes.POOL``) is that for the shapes set: every (shape, texture)
combination of the shared drawing primitives that is *not* a benchmark class, each in three
colours of the shared palette.  A pool scene is the benchmark's layout (1-4 objects, as many as
generator 2's images hold, on the cluttered background, 255 boundary band) with pool categories
instead of classes, labelled per pixel, for ``scripts/pretrain_shapes.py``; pool objects also
appear, unlabelled, in the background of the benchmark's images.

A scene is a pure function of (seed, index), like a benchmark sample.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .shapes_draw import (COLOURS, NUM_OBJECTS_P, OBJECT_RADIUS, SHAPES, TEXTURES, Appearance, background, finish,
                          label_objects, object_mask, paint, place)

POOL_SEED = 1000  # the pool's colour sets and scenes use streams apart from the benchmark's


def pool_categories(benchmark: set[tuple[str, str]]) -> tuple[Appearance, ...]:
    """Every (shape, texture) pair not in ``benchmark``, each with three colours of the palette."""
    rng = np.random.default_rng(POOL_SEED)
    categories = []
    for shape in SHAPES:
        for texture in TEXTURES:
            if (shape, texture) not in benchmark:
                colours = tuple(COLOURS[i] for i in sorted(rng.choice(len(COLOURS), 3, replace=False)))
                categories.append(Appearance(shape, texture, colours))
    return tuple(categories)


def generate_scene(categories: Sequence[Appearance], seed: int, index: int,
                   size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3 image, uint8 HxW label) of pool scene ``index``: label 1 + k where pool
    category k is, 0 on the background, 255 on the boundary band."""
    layout_seq, appearance_seq = np.random.SeedSequence([POOL_SEED, seed, index]).spawn(2)
    rng, look_rng = np.random.default_rng(layout_seq), np.random.default_rng(appearance_seq)
    count = 1 + int(rng.choice(len(NUM_OBJECTS_P), p=NUM_OBJECTS_P))
    objects = []
    for _ in range(count):
        category = int(rng.integers(len(categories)))
        objects.append((category + 1, place(rng, categories[category], size, OBJECT_RADIUS)))
    objects.sort(key=lambda o: -o[1].radius)  # small objects on top, as in the benchmark
    masks = [object_mask(obj, size) for _, obj in objects]
    image = background(look_rng, size)
    for (_, obj), mask in zip(objects, masks):
        paint(image, obj, mask, look_rng, size)
    return finish(image, look_rng), label_objects([value for value, _ in objects], masks, size)
