"""Generator 2 of the shapes set (--shapes_version 2, the VOC-like proxy): determinism, balance,
boundaries, the on-disk copy, and the VOC properties it copies (disjoint pretraining pool, shared
cues, class order unrelated to appearance)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dataset.presence import compute_presence
from dataset import shapes
from dataset.shapes import (
    CLASS_NAMES,
    PAIRS,
    ShapesSplit,
    generate_label,
    generate_sample,
)
from dataset.shapes_draw import COLOURS, TEXTURES
from dataset.shapes_pool import generate_example
from dataset.voc import voc_split

REPO = Path(__file__).resolve().parents[1]


def _load_make_shapes():
    spec = importlib.util.spec_from_file_location("make_shapes", REPO / "data" / "make_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_seed_same_arrays_and_other_index_or_seed_differs():
    image, label = generate_sample(0, "train", 7)
    again_image, again_label = generate_sample(0, "train", 7)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert label.shape == (64, 64) and label.dtype == np.uint8
    assert np.array_equal(image, again_image) and np.array_equal(label, again_label)
    assert not np.array_equal(image, generate_sample(0, "train", 8)[0])
    assert not np.array_equal(image, generate_sample(1, "train", 7)[0])
    assert not np.array_equal(image, generate_sample(0, "val", 7)[0])
    assert np.array_equal(generate_label(0, "train", 7), label)


def test_other_image_sizes():
    image, label = generate_sample(3, "val", 2, size=96)
    assert image.shape == (96, 96, 3) and label.shape == (96, 96)


def test_every_class_occurs_and_classes_are_balanced():
    counts = np.zeros(256, dtype=np.int64)
    for index in range(2000):
        counts[np.unique(generate_label(0, "train", index))] += 1
    foreground = counts[1:21]
    assert np.all(foreground > 0)
    # ~190 images per class; binomial noise is ~7 %, so 30 % would be a real imbalance
    assert np.all(np.abs(foreground - foreground.mean()) < 0.3 * foreground.mean())
    assert counts[21:255].sum() == 0  # no value outside 0..20 and 255
    assert len(CLASS_NAMES) == 21 and len(set(CLASS_NAMES)) == 21


def test_paired_classes_co_occur_more_than_chance():
    together = np.zeros((21, 21), dtype=np.int64)
    for index in range(800):
        present = np.zeros(21, dtype=bool)
        values = np.unique(generate_label(0, "train", index))
        present[values[values < 21]] = True
        together += np.outer(present, present)
    pair_rate = np.mean([together[a, b] for a, b in PAIRS])
    off_pairs = [(a, b) for a in range(1, 21) for b in range(a + 1, 21) if (a, b) not in PAIRS]
    other_rate = np.mean([together[a, b] for a, b in off_pairs])
    assert pair_rate > 3 * other_rate


def test_boundaries_are_255_bands_between_classes():
    ignored = []
    for index in range(50):
        label = generate_label(0, "train", index).astype(np.int64)
        ignored.append(np.mean(label == 255))
        # No two 4-neighbours carry different class ids: every edge is covered by 255.
        for a, b in ((label[:, 1:], label[:, :-1]), (label[1:, :], label[:-1, :])):
            differ = (a != b) & (a != 255) & (b != 255)
            assert not differ.any()
        # The band is thin: no class that survives it is reduced to a speck.
        for cls in np.unique(label[(label != 0) & (label != 255)]):
            assert np.sum(label == cls) >= 4
    assert min(ignored) > 0  # every image has a band (every image has an object)
    assert 0.02 < np.mean(ignored) < 0.2


def test_split_presence_matches_labels():
    split = ShapesSplit("val", 12, seed=4)
    presence = compute_presence(split)
    for index in range(12):
        expected = np.zeros(256, dtype=bool)
        expected[np.unique(generate_label(4, "val", index))] = True
        assert np.array_equal(presence[index], expected)
    image, label = split.load(3)
    assert image.shape == (64, 64, 3) and label.shape == (64, 64) and image.dtype == np.uint8


def test_unknown_split_rejected():
    with pytest.raises(ValueError):
        ShapesSplit("test", 3)


def test_make_shapes_round_trip_through_voc_loader(tmp_path):
    make_shapes = _load_make_shapes()
    argv = ["--root", str(tmp_path), "--train", "5", "--val", "3", "--seed", "2", "--version", "2"]
    assert make_shapes.main(argv) == 0
    base = tmp_path / "VOC2012"
    assert (base / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().count("\n") == 5
    for split, count in (("train", 5), ("val", 3)):
        files = voc_split(tmp_path, split)
        assert len(files) == count
        for index in range(count):
            image, label = files.load(index)
            expected_image, expected_label = generate_sample(2, split, index)
            assert np.array_equal(label, expected_label)
            # JPEG at quality 95: close, not identical
            diff = np.abs(np.asarray(image, dtype=np.int64) - expected_image)
            assert diff.mean() < 5
    png = base / "SegmentationClassAug" / "train_000000.png"
    from PIL import Image

    with Image.open(png) as written:
        assert written.mode == "P"
        assert written.getpalette()[15 * 3 : 15 * 3 + 3] == [192, 128, 128]  # VOC "person"


# ---------------------------------------------------------------------------- VOC-like structure


def test_pretraining_pool_is_disjoint_from_the_benchmark_classes():
    classes = {(c.shape, c.texture) for c in shapes.CLASSES}
    pool = {(c.shape, c.texture) for c in shapes.POOL}
    assert len(classes) == 20 and len(pool) == len(shapes.POOL) >= 50
    assert not classes & pool  # no pool category is a benchmark class
    # the pool shares the benchmark's vocabulary: its colours, its textures and its shapes
    assert {c for look in shapes.POOL for c in look.colours} == set(COLOURS)
    assert {look.texture for look in shapes.POOL} == set(TEXTURES)
    assert {c.shape for c in shapes.CLASSES} < {look.shape for look in shapes.POOL}
    # examples: an image and a pool category, deterministic
    image, category = generate_example(shapes.POOL, 0, 5)
    again, same = generate_example(shapes.POOL, 0, 5)
    assert image.shape == (64, 64, 3) and np.array_equal(image, again) and category == same
    assert 0 <= category < len(shapes.POOL)


def test_no_colour_or_texture_names_a_class():
    """Every colour is worn by several classes and every texture by five (VOC: no single cue)."""
    wearers = {c: sum(c in look.colours for look in shapes.CLASSES) for c in COLOURS}
    assert min(wearers.values()) >= 5
    textures = [look.texture for look in shapes.CLASSES]
    assert all(textures.count(t) == 5 for t in set(textures))
    # confusable groups: same shape and colours, another texture (like cat and dog)
    same_but_texture = [(a, b) for a in shapes.CLASSES for b in shapes.CLASSES
                        if a.shape == b.shape and a.colours == b.colours and a.texture < b.texture]
    assert same_but_texture


def _mean_colour(images):
    pixels = np.concatenate([image.reshape(-1, 3) for image in images]).astype(np.float64)
    return pixels.mean(0), pixels.std(0)


@pytest.mark.parametrize("task", ["19-1", "15-5", "15-1", "10-1", "5-3"])
def test_class_order_is_unrelated_to_appearance(task):
    """Each step's training images (overlapped) have the base images' colour statistics: the mean
    of every channel within 0.15 standard deviations (VOC's alphabetical order: increments look
    like base classes; the previous generator's striped increments were 0.31 away)."""
    from dataset.tasks import Task

    samples = [generate_sample(0, "train", i) for i in range(1500)]
    presence = np.array([np.isin(np.arange(21), label) for _, label in samples])
    steps = Task("shapes", task, 0).all_steps
    base_mean, base_std = _mean_colour([image for (image, _), p in zip(samples, presence) if p[steps[0]].any()])
    for step in steps[1:]:
        mean, _ = _mean_colour([image for (image, _), p in zip(samples, presence) if p[step].any()])
        assert np.all(np.abs(mean - base_mean) < 0.15 * base_std), (task, step, mean, base_mean)
