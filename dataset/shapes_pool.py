"""Pretraining examples of the synthetic benchmark: ImageNet's role for ``--dataset shapes``.

Every published VOC/ADE run starts its backbone from ImageNet: generic features learned on
categories that share the benchmark's low-level vocabulary (colours, textures, parts) but are
not its classes.  The pool (``shapes.POOL``) is that for the shapes set: every (shape, texture)
combination of the shared drawing primitives that is *not* a benchmark class, each in three
colours of the shared palette.  An example is one pool object on the benchmark's cluttered
background, labelled with its category, for ``scripts/pretrain_shapes.py`` to classify; pool
objects also appear, unlabelled, in the background of the benchmark's images.

An example is a pure function of (seed, index), like a benchmark sample.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .shapes_draw import (COLOURS, SHAPES, TEXTURES, Appearance, Placed, background, finish, paint, shape_mask,
                          unit_coords)

POOL_SEED = 1000  # the pool's colour sets and examples use streams apart from the benchmark's


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


def generate_example(categories: Sequence[Appearance], seed: int, index: int,
                     size: int = 64) -> tuple[np.ndarray, int]:
    """(uint8 HxWx3 image, category index) of pool example ``index``: one object on clutter."""
    layout_seq, appearance_seq = np.random.SeedSequence([POOL_SEED, seed, index]).spawn(2)
    rng, look_rng = np.random.default_rng(layout_seq), np.random.default_rng(appearance_seq)
    category = int(rng.integers(len(categories)))
    obj = Placed(categories[category], cx=float(rng.uniform(0.35, 0.65) * size),
                 cy=float(rng.uniform(0.35, 0.65) * size), radius=float(rng.uniform(0.22, 0.38) * size),
                 angle=float(rng.uniform(-0.26, 0.26)))
    image = background(look_rng, size)
    paint(image, obj, shape_mask(obj.look.shape, *unit_coords(obj, size)), look_rng, size)
    return finish(image, look_rng), category
