"""Generator 2 of the synthetic set (`--shapes_version 2`, the default from 2026-12-02 to
2026-12-06): generator 3's classes, pool, background and drawing, with fewer instances per class.

Every object after an image's first is its partner class half the time and any class otherwise,
never another instance of a class already drawn, so 77 % of an increment's images hold a base
class (VOC: 53 %) and an image holds 1.9 classes in 2.1 objects.  Generator 3 (``shapes``) takes
VOC's composition; this one stays so that the figures measured on it (docs/ablations.md) can be
reproduced.
"""
from __future__ import annotations

from functools import partial

from . import shapes
from .shapes_draw import NUM_OBJECTS_P

GENERATOR_VERSION = 2  # bump when the output changes: it keys the presence cache
CLASS_NAMES = shapes.CLASS_NAMES
COMPOSITION = shapes.Composition(objects_p=NUM_OBJECTS_P, same_p=0.0, partner_p=0.5)

generate_sample = partial(shapes.generate_sample, composition=COMPOSITION)
generate_label = partial(shapes.generate_label, composition=COMPOSITION)


class ShapesSplit(shapes.ShapesSplit):
    """A split of generator 2."""
