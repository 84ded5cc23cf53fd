"""The synthetic shapes set, every generator: determinism, class coverage and balance, VOC-like
boundaries, and the on-disk copy written by data/make_shapes.py read back through the VOC loader.
The VOC properties of the default generator are tested in test_shapes_proxy.py."""
from __future__ import annotations


import numpy as np
import pytest
import torch

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


def test_split_keeps_what_it_generated_read_only_and_equal_to_a_generation(version):
    split = GENERATORS[version].ShapesSplit("train", 5, seed=3)
    image, label = split.load(2)
    expected_image, expected_label = GENERATORS[version].generate_sample(3, "train", 2)
    assert np.array_equal(image, expected_image) and np.array_equal(label, expected_label)
    again = split.load(2)
    assert again[0] is image and again[1] is label  # kept, not generated again
    with pytest.raises(ValueError, match="read-only"):
        image[0, 0] = 0  # an in-place transform fails instead of changing the next epoch
    assert split.memo.nbytes == image.nbytes + label.nbytes


def test_memo_stops_keeping_at_its_budget_and_pickles_empty():
    import pickle

    split = shapes.ShapesSplit("val", 4, 32, seed=1)
    sample_bytes = 32 * 32 * 4
    split.memo.budget = 2 * sample_bytes
    loaded = [split.load(i) for i in range(4)]
    assert sorted(split.memo.samples) == [0, 1] and split.memo.nbytes == 2 * sample_bytes
    beyond = split.load(3)
    assert beyond[0] is not loaded[3][0]  # generated again, equal
    assert np.array_equal(beyond[0], loaded[3][0]) and beyond[0].flags.writeable
    copy = pickle.loads(pickle.dumps(split))  # what a worker started by spawn receives
    assert copy == split and copy.memo.samples == {} and copy.memo.nbytes == 0
    assert copy.memo.budget == split.memo.budget


def test_training_samples_from_a_warm_split_equal_a_fresh_split(tmp_path):
    """A later epoch reads the kept samples: its augmented batches equal those of a split that
    generates every sample anew (the memo changes the speed, never a figure)."""
    from types import SimpleNamespace

    from dataset import Task, build_datasets
    from dataset.loaders import SeededSamples

    opts = SimpleNamespace(dataset="shapes", data_root=None, cache_dir=str(tmp_path), overlap=True,
                           masking="plop", crop_size=24, crop_val=False, shapes_train_size=40,
                           shapes_val_size=8, shapes_image_size=32, shapes_seed=0, num_workers=0)
    warm, fresh = (SeededSamples(build_datasets(opts, Task("shapes", "15-5", 1))[0], seed=5) for _ in range(2))
    for epoch in range(3):
        for index in range(len(warm)):
            image, label = warm[(epoch, index)]
    assert warm.dataset.source.memo.samples and not fresh.dataset.source.memo.samples
    for index in range(len(fresh)):
        fresh.dataset.source.memo.samples.clear()
        image, label = fresh[(2, index)]
        warm_image, warm_label = warm[(2, index)]
        assert torch.equal(image, warm_image) and torch.equal(label, warm_label)


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
