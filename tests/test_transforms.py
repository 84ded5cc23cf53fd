"""Joint transforms: geometry by hand-computed numbers, label values kept by nearest sampling."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.transforms import (
    CenterCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    eval_transform,
    remap_label,
    to_tensor,
    train_transform,
)


def _pair(width: int, height: int, seed: int = 0) -> tuple[Image.Image, Image.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 3, 7, 255], dtype=np.uint8), (height, width))
    return Image.fromarray(image, "RGB"), Image.fromarray(label, "L"), label


@pytest.mark.parametrize("width,height", [(50, 37), (37, 50), (64, 64), (200, 20)])
def test_random_resized_crop_sizes_and_label_values(width, height):
    image, label, label_np = _pair(width, height)
    crop = RandomResizedCrop(24)
    random.seed(1)
    for _ in range(20):
        out_img, out_lbl = crop(image, label)
        assert out_img.size == (24, 24) and out_lbl.size == (24, 24)
        assert out_img.mode == "RGB" and out_lbl.mode == "L"
        assert set(np.unique(np.asarray(out_lbl))) <= set(np.unique(label_np))


def test_random_resized_crop_params_follow_area_and_ratio_rules():
    crop = RandomResizedCrop(16, scale=(0.5, 2.0), ratio=(3 / 4, 4 / 3))
    random.seed(0)
    for _ in range(200):
        top, left, h, w = crop.get_params(60, 40)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        # area fraction >= 0.5 and ratio in [3/4, 4/3], up to rounding each side by 0.5 px
        # (the fallback crop, 53x40, satisfies the same bounds)
        assert 0.5 * 2400 * 0.9 <= h * w <= 2400
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_fallback_is_ratio_clamped_centre_crop():
    # No area fraction in [3, 4] fits, so every try fails: in_ratio 100/20 = 5 > 4/3 gives
    # h = 20, w = round(20 * 4/3) = 27, centred: left = (100 - 27) // 2 = 36.
    crop = RandomResizedCrop(8, scale=(3.0, 4.0))
    assert crop.get_params(100, 20) == (0, 36, 20, 27)
    # tall image: in_ratio 0.2 < 3/4 gives w = 20, h = round(20 / 0.75) = 27, top = 36
    assert crop.get_params(20, 100) == (36, 0, 27, 20)
    # ratio inside the range: the whole image
    assert crop.get_params(30, 30) == (0, 0, 30, 30)


def test_random_resized_crop_label_is_nearest_sample_of_the_crop():
    image, label, label_np = _pair(40, 30, seed=3)
    crop = RandomResizedCrop(17)
    random.seed(5)
    top, left, h, w = crop.get_params(40, 30)
    random.seed(5)
    _, out = crop(image, label)
    out = np.asarray(out)
    # Every output pixel must equal one of the source pixels within 1 px of its ideal source.
    for y in range(17):
        for x in range(17):
            sy = top + (y + 0.5) * h / 17 - 0.5
            sx = left + (x + 0.5) * w / 17 - 0.5
            ys = range(max(0, math.floor(sy) - 1), min(30, math.ceil(sy) + 2))
            xs = range(max(0, math.floor(sx) - 1), min(40, math.ceil(sx) + 2))
            assert out[y, x] in {label_np[j, i] for j in ys for i in xs}


def test_horizontal_flip_mirrors_both():
    image, label, label_np = _pair(9, 5)
    out_img, out_lbl = RandomHorizontalFlip(p=1.0)(image, label)
    assert np.array_equal(np.asarray(out_lbl), label_np[:, ::-1])
    assert np.array_equal(np.asarray(out_img), np.asarray(image)[:, ::-1])
    same_img, same_lbl = RandomHorizontalFlip(p=0.0)(image, label)
    assert same_img is image and same_lbl is label


def test_resize_shorter_side_truncates_longer():
    image, label, _ = _pair(500, 375)
    out_img, out_lbl = Resize(256)(image, label)
    assert out_img.size == out_lbl.size == (int(256 * 500 / 375), 256) == (341, 256)
    out_img, _ = Resize(256)(*_pair(375, 500)[:2])
    assert out_img.size == (256, 341)


@pytest.mark.parametrize("label_mode", ["L", "P"])
def test_center_crop_without_and_with_padding(label_mode):
    image, label, label_np = _pair(341, 256)
    out_img, out_lbl = CenterCrop(256)(image, label)
    # left = round((341 - 256) / 2) = round(42.5) = 42 (Python rounds half to even)
    assert np.array_equal(np.asarray(out_lbl), label_np[:, 42:298])
    assert np.array_equal(np.asarray(out_img), np.asarray(image)[:, 42:298])

    small_img, small_lbl, small_np = _pair(10, 6)
    small_lbl = small_lbl.convert(label_mode)  # palette labels keep their ids as indices
    out_img, out_lbl = CenterCrop(8)(small_img, small_lbl)
    assert out_lbl.mode == label_mode
    out = np.asarray(out_lbl)
    # padded to 10x8 with one row above and below, then columns 1..8 kept
    assert np.all(out[0] == 255) and np.all(out[7] == 255)
    assert np.array_equal(out[1:7], small_np[:, 1:9])
    assert np.all(np.asarray(out_img)[0] == 0) and np.all(np.asarray(out_img)[7] == 0)


def test_to_tensor_normalises_with_imagenet_statistics():
    pixels = np.array([[[0, 128, 255], [10, 20, 30]]], dtype=np.uint8)  # 1x2 RGB
    out = to_tensor(Image.fromarray(pixels, "RGB"))
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    expected = ((pixels / 255.0 - mean) / std).transpose(2, 0, 1)
    assert out.dtype == torch.float32 and out.shape == (3, 1, 2) and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_remap_label_applies_lookup_table():
    lut = np.zeros(256, dtype=np.int64)
    lut[3], lut[7], lut[255] = 1, 2, 255
    label = Image.fromarray(np.array([[0, 3], [7, 255]], dtype=np.uint8), "L")
    out = remap_label(label, lut)
    assert out.dtype == torch.int64
    assert out.tolist() == [[0, 1], [2, 255]]


def test_pipelines_shapes():
    image, label, _ = _pair(50, 37)
    random.seed(0)
    assert train_transform(32)(image, label)[1].size == (32, 32)
    assert eval_transform(32, crop=True)(image, label)[0].size == (32, 32)
    full_img, full_lbl = eval_transform(32, crop=False)(image, label)
    assert full_img is image and full_lbl is label
