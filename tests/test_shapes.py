"""The synthetic shapes set, every generator: determinism, class coverage and balance, VOC-like
boundaries, and the on-disk copy written by data/make_shapes.py read back through the VOC loader.
The VOC properties of the default generator are tested in test_shapes_proxy.py."""
from __future__ import annotations


import numpy as np
import pytest

from dataset.presence import compute_presence
from dataset import shapes, shapes_v2
from dataset.incremental import SHAPES_GENERATORS as GENERATORS
from dataset.voc import voc_split

from scripts_loader import load_script


@pytest.fixture(params=sorted(GENERATORS), ids=lambda v: f"generator{v}")
def version(request):
    return request.param


def _load_make_shapes():
    return load_script("data/make_shapes.py")


def test_same_seed_same_arrays_and_other_index_or_seed_differs(version):
    image, label = GENERATORS[version].generate_sample(0, "train", 7)
    again_image, again_label = GENERATORS[version].generate_sample(0, "train", 7)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert label.shape == (64, 64) and label.dtype == np.uint8
    assert np.array_equal(image, again_image) and np.array_equal(label, again_label)
    assert not np.array_equal(image, GENERATORS[version].generate_sample(0, "train", 8)[0])
    assert not np.array_equal(image, GENERATORS[version].generate_sample(1, "train", 7)[0])
    assert not np.array_equal(image, GENERATORS[version].generate_sample(0, "val", 7)[0])
    assert np.array_equal(GENERATORS[version].generate_label(0, "train", 7), label)


def test_other_image_sizes(version):
    image, label = GENERATORS[version].generate_sample(3, "val", 2, size=96)
    assert image.shape == (96, 96, 3) and label.shape == (96, 96)


def test_every_class_occurs_and_classes_are_balanced(version):
    counts = np.zeros(256, dtype=np.int64)
    for index in range(2000):
        counts[np.unique(GENERATORS[version].generate_label(0, "train", index))] += 1
    foreground = counts[1:21]
    assert np.all(foreground > 0)
    # ~190 images per class; binomial noise is ~7 %, so 30 % would be a real imbalance
    assert np.all(np.abs(foreground - foreground.mean()) < 0.3 * foreground.mean())
    assert counts[21:255].sum() == 0  # no value outside 0..20 and 255
    assert len(GENERATORS[version].CLASS_NAMES) == 21 and len(set(GENERATORS[version].CLASS_NAMES)) == 21


def test_paired_classes_co_occur_more_than_chance(version):
    together = np.zeros((21, 21), dtype=np.int64)
    for index in range(800):
        present = np.zeros(21, dtype=bool)
        values = np.unique(GENERATORS[version].generate_label(0, "train", index))
        present[values[values < 21]] = True
        together += np.outer(present, present)
    pair_rate = np.mean([together[a, b] for a, b in shapes.PAIRS])
    off_pairs = [(a, b) for a in range(1, 21) for b in range(a + 1, 21) if (a, b) not in shapes.PAIRS]
    other_rate = np.mean([together[a, b] for a, b in off_pairs])
    assert pair_rate > 3 * other_rate


def test_boundaries_are_255_bands_between_classes(version):
    ignored = []
    for index in range(50):
        label = GENERATORS[version].generate_label(0, "train", index).astype(np.int64)
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


def test_split_presence_matches_labels(version):
    split = GENERATORS[version].ShapesSplit("val", 12, seed=4)
    presence = compute_presence(split)
    for index in range(12):
        expected = np.zeros(256, dtype=bool)
        expected[np.unique(GENERATORS[version].generate_label(4, "val", index))] = True
        assert np.array_equal(presence[index], expected)
    image, label = split.load(3)
    assert image.shape == (64, 64, 3) and label.shape == (64, 64) and image.dtype == np.uint8


def test_unknown_split_rejected(version):
    with pytest.raises(ValueError):
        GENERATORS[version].ShapesSplit("test", 3)


def test_make_shapes_round_trip_through_voc_loader(tmp_path, version):
    make_shapes = _load_make_shapes()
    argv = ["--root", str(tmp_path), "--train", "5", "--val", "3", "--seed", "2", "--version", str(version)]
    assert make_shapes.main(argv) == 0
    base = tmp_path / "VOC2012"
    assert (base / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().count("\n") == 5
    for split, count in (("train", 5), ("val", 3)):
        files = voc_split(tmp_path, split)
        assert len(files) == count
        for index in range(count):
            image, label = files.load(index)
            expected_image, expected_label = GENERATORS[version].generate_sample(2, split, index)
            assert np.array_equal(label, expected_label)
            # JPEG at quality 95: close, not identical
            diff = np.abs(np.asarray(image, dtype=np.int64) - expected_image)
            assert diff.mean() < 5
    png = base / "SegmentationClassAug" / "train_000000.png"
    from PIL import Image

    with Image.open(png) as written:
        assert written.mode == "P"
        assert written.getpalette()[15 * 3 : 15 * 3 + 3] == [192, 128, 128]  # VOC "person"
