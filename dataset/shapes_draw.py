"""Drawing primitives shared by the synthetic benchmark (``shapes.py``) and its pretraining pool
(``shapes_pool.py``): shape masks, textures, the colour palette and the cluttered background.

Both sets draw from the same primitives, as ImageNet and VOC are both natural photographs: what
separates them is which *combinations* are categories, never the low-level vocabulary.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .presence import IGNORE_LABEL

# Benchmark shapes first; the pool has all of them and more.
BENCHMARK_SHAPES = ("disc", "square", "triangle", "diamond", "cross", "ring", "frame", "star", "hexagon",
                    "ellipse")
POOL_ONLY_SHAPES = ("crescent", "halfdisc", "corner", "arrow", "trapezoid", "pentagon", "chevron", "tee")
SHAPES = BENCHMARK_SHAPES + POOL_ONLY_SHAPES

BENCHMARK_TEXTURES = ("solid", "stripes", "dots", "checker")
POOL_ONLY_TEXTURES = ("grid", "rings")
TEXTURES = BENCHMARK_TEXTURES + POOL_ONLY_TEXTURES

# name -> HSV hue in degrees (None: achromatic)
PALETTE = {"red": 0.0, "orange": 30.0, "yellow": 58.0, "green": 120.0, "cyan": 180.0, "blue": 225.0,
           "purple": 275.0, "pink": 320.0, "white": None, "black": None}
COLOURS = tuple(PALETTE)

# Scene layout: objects per image of the pool's scenes and generators 1-2 (1-4), radius a fraction
# of the image (every generator).
NUM_OBJECTS_P = (0.35, 0.35, 0.2, 0.1)
OBJECT_RADIUS = (0.16, 0.3)


@dataclass(frozen=True)
class Appearance:
    """What an object looks like: a shape, a texture, and the colours an instance picks from
    (a category comes in several colours, as cars and cats do)."""

    shape: str
    texture: str
    colours: tuple[str, ...]


@dataclass(frozen=True)
class Placed:
    """One object in an image: its appearance and its pose (pixels, radians)."""

    look: Appearance
    cx: float
    cy: float
    radius: float
    angle: float  # small: a square must not turn into a diamond


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a size x size image."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    y.flags.writeable = x.flags.writeable = False
    return y, x


def unit_coords(obj: Placed, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in the object's frame: radius 1, u to the right, v up."""
    y, x = grid(size)
    dx, dy = (x - obj.cx) / obj.radius, (obj.cy - y) / obj.radius
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    return c * dx + s * dy, -s * dx + c * dy


def place(rng: np.random.Generator, look: Appearance, size: int, radius: tuple[float, float]) -> Placed:
    """``look`` at a random pose: centre in the middle 60 %, radius a fraction of ``size``."""
    return Placed(look, cx=float(rng.uniform(0.2, 0.8) * size), cy=float(rng.uniform(0.2, 0.8) * size),
                  radius=float(rng.uniform(*radius) * size), angle=float(rng.uniform(-0.26, 0.26)))


def object_mask(obj: Placed, size: int) -> np.ndarray:
    return shape_mask(obj.look.shape, *unit_coords(obj, size))


def boundary(label: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label: a 2-pixel band across every edge."""
    edge = np.zeros(label.shape, dtype=bool)
    dx = label[:, 1:] != label[:, :-1]
    dy = label[1:, :] != label[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


def label_objects(values, masks, size: int) -> np.ndarray:
    """The label map of objects drawn in this order (later ones on top), ``IGNORE_LABEL`` on the
    boundary band."""
    label = np.zeros((size, size), dtype=np.uint8)
    for value, mask in zip(values, masks):
        label[mask] = value
    label[boundary(label)] = IGNORE_LABEL
    return label


def _triangle(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Upward equilateral triangle with circumradius r, centred on its centroid."""
    root3 = np.sqrt(3.0)
    return (v >= -r / 2) & (root3 * u + v <= r) & (-root3 * u + v <= r)


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, r: float) -> np.ndarray:
    """Regular polygon with one vertex up, circumradius r."""
    inside = np.ones(u.shape, dtype=bool)
    apothem = r * np.cos(np.pi / sides)
    for k in range(sides):
        phi = np.pi / 2 + (2 * k + 1) * np.pi / sides  # outward normal of edge k
        inside &= u * np.cos(phi) + v * np.sin(phi) <= apothem
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    d2 = u * u + v * v
    au, av = np.abs(u), np.abs(v)
    box = np.maximum(au, av)
    if shape == "disc":
        return d2 <= 1.0
    if shape == "square":
        return box <= 0.82
    if shape == "triangle":
        return _triangle(u, v, 1.15)
    if shape == "diamond":
        return au / 0.75 + av <= 1.05
    if shape == "cross":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if shape == "ring":
        return (d2 <= 1.0) & (d2 >= 0.5**2)
    if shape == "frame":
        return (box <= 0.85) & (box >= 0.42)
    if shape == "star":
        return _triangle(u, v, 1.05) | _triangle(u, -v, 1.05)
    if shape == "hexagon":
        r, root3 = 0.95, np.sqrt(3.0)
        return (av <= r * root3 / 2) & (root3 * au + av <= r * root3)
    if shape == "ellipse":
        return (u / 1.1) ** 2 + (v / 0.55) ** 2 <= 1.0
    if shape == "crescent":
        return (d2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.75**2)
    if shape == "halfdisc":
        return (d2 <= 1.0) & (v >= -0.2)
    if shape == "corner":
        return (box <= 0.85) & ((u <= -0.25) | (v <= -0.25))
    if shape == "arrow":
        return ((au <= 0.22) & (v <= 0.2) & (v >= -0.95)) | ((v > 0.2) & (v <= 0.95) & (au <= 0.8 * (0.95 - v)))
    if shape == "trapezoid":
        return (av <= 0.6) & (au <= 0.55 + 0.4 * (0.6 - v) / 1.2)
    if shape == "pentagon":
        return _polygon(u, v, 5, 0.98)
    if shape == "chevron":
        return (av <= 0.9) & (u - 0.8 * av >= -0.6) & (u - 0.8 * av <= 0.0)
    if shape == "tee":
        return ((av <= 0.9) & (au <= 0.25)) | ((v >= 0.45) & (v <= 0.9) & (au <= 0.9))
    raise ValueError(f"unknown shape {shape!r}")


def hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=np.float32) * 255.0


def object_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    hue = PALETTE[colour]
    if colour == "white":
        return hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.08), rng.uniform(0.85, 1.0))
    if colour == "black":
        return hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.3), rng.uniform(0.05, 0.16))
    return hsv(hue + rng.uniform(-10, 10), rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))


def second_colour(rng: np.random.Generator, colour: str, base: np.ndarray) -> np.ndarray:
    """The texture's other colour: a darker or a lighter shade of the base with equal odds, so a
    texture says nothing about an object's mean brightness (black: lighter, white: darker)."""
    lighter = colour == "black" or (colour != "white" and rng.random() < 0.5)
    if lighter:
        return base + (255.0 - base) * rng.uniform(0.45, 0.65)
    return base * rng.uniform(0.25, 0.4)


def direction(rng: np.random.Generator, size: int, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    """Signed distance in pixels from (cx, cy) along a random direction, at every pixel."""
    y, x = grid(size)
    phi = rng.uniform(0, 2 * np.pi)
    return (x - cx) * np.cos(phi) + (y - cy) * np.sin(phi)


def texture_pattern(rng: np.random.Generator, texture: str, size: int, cx: float, cy: float,
                    scale: float = 1.0) -> np.ndarray:
    """Where the texture's second colour goes (bool, size x size); ``scale`` stretches the period."""
    if texture == "solid":
        return np.zeros((size, size), dtype=bool)
    period = rng.uniform(4.5, 6.5) * scale
    if texture == "stripes":
        return (direction(rng, size) % period) < period / 2
    y, x = grid(size)
    phi = rng.uniform(0, np.pi / 2)
    a = ((x - cx) * np.cos(phi) + (y - cy) * np.sin(phi)) / period
    b = (-(x - cx) * np.sin(phi) + (y - cy) * np.cos(phi)) / period
    if texture == "dots":
        fa, fb = a - np.round(a), b - np.round(b)
        return fa * fa + fb * fb <= 0.3**2
    if texture == "checker":
        return (np.floor(a) + np.floor(b)) % 2 == 0
    if texture == "grid":
        return (np.abs(a - np.round(a)) < 0.17) | (np.abs(b - np.round(b)) < 0.17)
    if texture == "rings":
        return (np.sqrt((x - cx) ** 2 + (y - cy) ** 2) % period) < period / 2
    raise ValueError(f"unknown texture {texture!r}")


def paint(image: np.ndarray, obj: Placed, mask: np.ndarray, rng: np.random.Generator, size: int) -> None:
    """Draw ``obj`` into ``image`` where ``mask``: one of its colours, shaded, textured."""
    colour = obj.look.colours[int(rng.integers(len(obj.look.colours)))]
    base = object_colour(rng, colour)
    ramp = direction(rng, size, obj.cx, obj.cy)[mask] / obj.radius
    pixels = base[None, :] * (1.0 + 0.12 * np.clip(ramp, -1.0, 1.0))[:, None]
    pattern = texture_pattern(rng, obj.look.texture, size, obj.cx, obj.cy)[mask]
    pixels[pattern] = second_colour(rng, colour, base)
    image[mask] = pixels


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinear upsampling of a cells x cells random grid to size x size, values in [0, 1]."""
    values = rng.random((cells + 1, cells + 1)).astype(np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) * cells / size
    i = np.minimum(pos.astype(np.int64), cells - 1)
    f = pos - i
    rows = values[i] * (1 - f)[:, None] + values[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _stuff_colour(rng: np.random.Generator) -> np.ndarray:
    """Background 'stuff' (walls, grass, sky, floor): any hue, mostly less saturated than objects."""
    return hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.55), rng.uniform(0.2, 0.85))


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A heterogeneous scene behind the objects: a gradient or blotches of two stuff colours, and
    in most images a region of a third stuff with a coarse texture of its own (a fence, a tiled
    floor, foliage), split from the rest by a soft random boundary."""
    c1, c2 = _stuff_colour(rng), _stuff_colour(rng)
    if rng.random() < 0.5:
        t = direction(rng, size)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        t = smooth_noise(rng, size, int(rng.integers(2, 6)))
    image = c1 + t[..., None] * (c2 - c1)
    if rng.random() < 0.7:
        region = smooth_noise(rng, size, int(rng.integers(2, 4))) > rng.uniform(0.35, 0.65)
        c3 = _stuff_colour(rng)
        texture = ("stripes", "checker", "grid", "blotches")[int(rng.integers(4))]
        if texture == "blotches":
            shade = smooth_noise(rng, size, int(rng.integers(8, 14)))[..., None]
            stuff = c3 * (0.6 + 0.8 * shade)
        else:
            dark = texture_pattern(rng, texture, size, size / 2, size / 2, scale=rng.uniform(1.3, 2.5))
            stuff = np.where(dark[..., None], c3 * rng.uniform(0.45, 0.7), c3)
        image = np.where(region[..., None], stuff, image)
    return image.astype(np.float32)


def finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise and 8-bit quantisation."""
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)
