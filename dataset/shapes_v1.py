"""Generator 1 of the synthetic set (`--shapes_version 1`; generators 2 and 3 replaced it as the default),
generated on the fly.

Why: continual-learning effects (forgetting, what distillation keeps) become visible on a CPU
in minutes.  The set mirrors VOC where it matters for the protocol: 20 foreground classes, 1-4
objects per image, classes that co-occur in fixed pairs (like person+horse), a textured
background, and a 255 band on object boundaries.

Each class is a unique (colour, texture) pair, and also has its own shape among its colour's
two classes, so a tiny CNN separates them quickly: classes 1-10 are solid shapes in 10 colours,
classes 11-20 striped shapes in the same colours with a different shape.  Objects are large
(diameter about a third to three fifths of the image), with moderate jitter of hue, brightness,
size, position and rotation.

A sample is a pure function of (seed, split, index): the layout (classes, positions, sizes)
comes from one random stream and the appearance from another, so labels can be rendered
without the image (the class-presence index of a split is cheap).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import shapes, shapes_v2
from .shapes_draw import direction as _direction
from .shapes_draw import hsv as _hsv
from .shapes_draw import label_objects
from .shapes_draw import shape_mask as _shape_mask
from .shapes_draw import smooth_noise as _smooth_noise
from .shapes_draw import unit_coords as _unit_coords

GENERATOR_VERSION = 1  # bump when the output changes: it keys the presence cache
SPLITS = {"train": 0, "val": 1}

SHAPES = ("disc", "square", "triangle", "diamond", "cross", "ring", "frame", "star", "hexagon",
          "ellipse")
# name, HSV hue in degrees (None: achromatic)
COLOURS = (("red", 0.0), ("amber", 45.0), ("lime", 90.0), ("green", 135.0), ("cyan", 180.0),
           ("blue", 225.0), ("violet", 270.0), ("pink", 315.0), ("white", None), ("black", None))


@dataclass(frozen=True)
class ShapeClass:
    shape: str
    colour: str
    striped: bool

    @property
    def name(self) -> str:
        return f"{'striped ' if self.striped else ''}{self.colour} {self.shape}"


def _make_classes() -> tuple[ShapeClass, ...]:
    solid = [ShapeClass(SHAPES[i], COLOURS[i][0], False) for i in range(10)]
    striped = [ShapeClass(SHAPES[(i + 5) % 10], COLOURS[i][0], True) for i in range(10)]
    return tuple(solid + striped)


CLASSES = _make_classes()  # CLASSES[k - 1] is class k
CLASS_NAMES = ["background"] + [c.name for c in CLASSES]
NUM_FOREGROUND = len(CLASSES)

# Co-occurring pairs and objects per image: the same as generator 2's (shapes_v2.COMPOSITION).
PAIRS, PARTNER = shapes.PAIRS, shapes.PARTNER


@dataclass(frozen=True)
class _Object:
    cls: int
    cx: float
    cy: float
    radius: float
    angle: float  # radians, small: a square must not turn into a diamond


def _rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    layout, appearance = np.random.SeedSequence([seed, SPLITS[split], index]).spawn(2)
    return np.random.default_rng(layout), np.random.default_rng(appearance)


def _layout(rng: np.random.Generator, size: int) -> list[_Object]:
    classes = shapes.draw_classes(rng, shapes_v2.COMPOSITION)
    objects = [
        _Object(
            cls=c,
            cx=float(rng.uniform(0.2, 0.8) * size),
            cy=float(rng.uniform(0.2, 0.8) * size),
            radius=float(rng.uniform(0.16, 0.3) * size),
            angle=float(rng.uniform(-0.26, 0.26)),
        )
        for c in classes
    ]
    # Large objects first, so that small ones are drawn on top and stay visible.
    return sorted(objects, key=lambda o: -o.radius)


def _masks(objects: list[_Object], size: int) -> list[np.ndarray]:
    return [_shape_mask(CLASSES[o.cls - 1].shape, *_unit_coords(o, size)) for o in objects]


def _render_label(objects: list[_Object], masks: list[np.ndarray], size: int) -> np.ndarray:
    return label_objects([obj.cls for obj in objects], masks, size)


def _object_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    hue = dict(COLOURS)[colour]
    if colour == "white":
        return _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.08), rng.uniform(0.88, 1.0))
    if colour == "black":
        return _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.3), rng.uniform(0.03, 0.14))
    return _hsv(hue + rng.uniform(-10, 10), rng.uniform(0.7, 1.0), rng.uniform(0.72, 1.0))


def _stripe_colour(rng: np.random.Generator, colour: str, base: np.ndarray) -> np.ndarray:
    if colour == "black":
        return _hsv(55 + rng.uniform(-5, 5), rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0))
    if colour == "white":
        return _hsv(0, 0, rng.uniform(0.03, 0.12))
    return base * rng.uniform(0.25, 0.4)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """Background tones: low saturation, mid brightness, far from every object colour."""
    return _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.18), rng.uniform(0.32, 0.62))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    kind = int(rng.integers(3))
    if kind == 0:  # linear gradient
        t = _direction(rng, size)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 1:  # soft stripes, wider than the object stripes
        t = 0.5 + 0.5 * np.sin(2 * np.pi * _direction(rng, size) / rng.uniform(10, 20))
    else:  # blotches
        t = _smooth_noise(rng, size, int(rng.integers(3, 7)))
    return c1 + t[..., None] * (c2 - c1)


def _render_image(
    objects: list[_Object], masks: list[np.ndarray], rng: np.random.Generator, size: int
) -> np.ndarray:
    image = _background(rng, size)
    for obj, mask in zip(objects, masks):
        spec = CLASSES[obj.cls - 1]
        colour = _object_colour(rng, spec.colour)
        # Mild shading across the object, so that colour is not a single constant.
        ramp = _direction(rng, size, obj.cx, obj.cy)[mask] / obj.radius
        shade = 1.0 + 0.12 * np.clip(ramp, -1.0, 1.0)
        pixels = colour[None, :] * shade[:, None]
        if spec.striped:
            period = rng.uniform(4.0, 6.5)
            dark = (_direction(rng, size)[mask] % period) < period / 2
            pixels[dark] = _stripe_colour(rng, spec.colour, colour)
        image[mask] = pixels
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def generate_sample(
    seed: int, split: str, index: int, size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3 image, uint8 HxW label) of sample ``index`` of ``split``."""
    layout_rng, appearance_rng = _rngs(seed, split, index)
    objects = _layout(layout_rng, size)
    masks = _masks(objects, size)
    return _render_image(objects, masks, appearance_rng, size), _render_label(objects, masks, size)


def generate_label(seed: int, split: str, index: int, size: int = 64) -> np.ndarray:
    """The label of ``generate_sample`` alone, without rendering the image."""
    objects = _layout(_rngs(seed, split, index)[0], size)
    return _render_label(objects, _masks(objects, size), size)


class ShapesSplit(shapes.ShapesSplit):
    """A split of generator 1, indexable like ``voc.FileSplit``, with nothing on disk."""
