"""Joint transforms: geometry by hand-computed numbers, resampling against Pillow's own."""
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
    device_batch,
    eval_transform,
    image_tensor,
    nearest_indices,
    normalize,
    remap_label,
    resize_image,
    resize_label,
    train_transform,
)


def _pair(width: int, height: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 3, 7, 255], dtype=np.uint8), (height, width))
    return image, label


def _smooth_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like image (smooth gradients plus mild noise), read-only like a decoded JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    image.setflags(write=False)
    return image


@pytest.mark.parametrize("src,dst,off_by_one", [((500, 375), (256, 256), 0.01), ((380, 300), (256, 256), 0.01),
                                                ((120, 90), (256, 256), 0.01), ((37, 50), (64, 48), 0.3)])
def test_resize_image_matches_pillow_bilinear(src, dst, off_by_one):
    """Pillow's BILINEAR (antialiased when shrinking) is the reference.

    Both round a uint8 intermediate between the two 1-D passes; where one axis grows and the
    other shrinks the two libraries round differently (up to 1 grey level on ~23 % of pixels).
    """
    image = _smooth_image(*src)
    ours = resize_image(image, dst[1], dst[0])
    pillow = np.asarray(Image.fromarray(image).resize(dst, Image.Resampling.BILINEAR))
    assert ours.shape == pillow.shape == (dst[1], dst[0], 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int64) - pillow)
    assert diff.max() <= 1 and (diff > 0).mean() < off_by_one


def _off_edge(size_in: int, size_out: int) -> np.ndarray:
    """Output positions whose source centre does not fall exactly on a pixel edge."""
    return (2 * np.arange(size_out) + 1) * size_in % (2 * size_out) != 0


@pytest.mark.parametrize("src,dst", [((500, 375), (256, 256)), ((31, 17), (64, 40)), ((64, 64), (17, 29)),
                                     ((14, 26), (17, 17))])
def test_resize_label_is_pillow_nearest(src, dst):
    """Equal to Pillow wherever Pillow's rule is well defined (centres off the pixel edges)."""
    label = np.random.default_rng(1).integers(0, 256, (src[1], src[0]), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(label, "L").resize(dst, Image.Resampling.NEAREST))
    ours = resize_label(label, dst[1], dst[0])
    rows, cols = _off_edge(src[1], dst[1]), _off_edge(src[0], dst[0])
    np.testing.assert_array_equal(ours[rows][:, cols], pillow[rows][:, cols])


def test_resize_image_accepts_flipped_views():
    image = _smooth_image(40, 30)
    flipped = resize_image(image[:, ::-1], 20, 15)
    np.testing.assert_array_equal(flipped, resize_image(np.ascontiguousarray(image[:, ::-1]), 20, 15))
    np.testing.assert_array_equal(flipped, resize_image(image, 20, 15)[:, ::-1])


def test_nearest_indices_by_hand():
    # centres (i + 0.5) * 4 / 3 = 0.67, 2.0, 3.33 -> 0, 2, 3; upsampling 2 -> 5: 0.2, 0.6, 1.0, 1.4, 1.8
    assert nearest_indices(4, 3).tolist() == [0, 2, 3]
    assert nearest_indices(2, 5).tolist() == [0, 0, 1, 1, 1]
    # 8.5 * 14 / 17 = 7 exactly (Pillow's float accumulation gives 6.99... and row 6)
    assert nearest_indices(14, 17)[8] == 7
    assert nearest_indices(500, 256).max() == 499 and nearest_indices(3, 1).tolist() == [1]


@pytest.mark.parametrize("width,height", [(50, 37), (37, 50), (64, 64), (200, 20)])
def test_random_resized_crop_sizes_and_label_values(width, height):
    image, label = _pair(width, height)
    crop = RandomResizedCrop(24)
    random.seed(1)
    for _ in range(20):
        out_img, out_lbl = crop(image, label)
        assert out_img.shape == (24, 24, 3) and out_lbl.shape == (24, 24)
        assert out_img.dtype == out_lbl.dtype == np.uint8
        assert set(np.unique(out_lbl)) <= set(np.unique(label))


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


def test_random_resized_crop_is_pillow_crop_then_resize():
    """torchvision's resized_crop: the label exactly, the image within one grey level."""
    image, (_, label) = _smooth_image(40, 30, seed=3), _pair(40, 30, seed=3)
    crop = RandomResizedCrop(17)
    random.seed(5)
    top, left, h, w = crop.get_params(40, 30)
    random.seed(5)
    out_img, out_lbl = crop(image, label)
    box = (left, top, left + w, top + h)
    pil_lbl = np.asarray(Image.fromarray(label, "L").crop(box).resize((17, 17), Image.Resampling.NEAREST))
    rows, cols = _off_edge(h, 17), _off_edge(w, 17)
    np.testing.assert_array_equal(out_lbl[rows][:, cols], pil_lbl[rows][:, cols])
    pil_img = Image.fromarray(image).crop(box).resize((17, 17), Image.Resampling.BILINEAR)
    assert np.abs(out_img.astype(np.int64) - np.asarray(pil_img)).max() <= 1
    # and every label pixel is within 1 px of its ideal source position
    for y in range(17):
        for x in range(17):
            sy = top + (y + 0.5) * h / 17 - 0.5
            sx = left + (x + 0.5) * w / 17 - 0.5
            ys = range(max(0, math.floor(sy) - 1), min(30, math.ceil(sy) + 2))
            xs = range(max(0, math.floor(sx) - 1), min(40, math.ceil(sx) + 2))
            assert out_lbl[y, x] in {label[j, i] for j in ys for i in xs}


def test_horizontal_flip_mirrors_both():
    image, label = _pair(9, 5)
    out_img, out_lbl = RandomHorizontalFlip(p=1.0)(image, label)
    assert np.array_equal(out_lbl, label[:, ::-1])
    assert np.array_equal(out_img, image[:, ::-1])
    same_img, same_lbl = RandomHorizontalFlip(p=0.0)(image, label)
    assert same_img is image and same_lbl is label


def test_resize_shorter_side_truncates_longer():
    image, label = _pair(500, 375)
    out_img, out_lbl = Resize(256)(image, label)
    assert out_img.shape[:2] == out_lbl.shape == (256, int(256 * 500 / 375)) == (256, 341)
    out_img, _ = Resize(256)(*_pair(375, 500))
    assert out_img.shape[:2] == (341, 256)
    same_img, same_lbl = Resize(37)(*_pair(50, 37))
    assert same_img.shape == (37, 50, 3)


def test_center_crop_without_and_with_padding():
    image, label = _pair(341, 256)
    out_img, out_lbl = CenterCrop(256)(image, label)
    # left = round((341 - 256) / 2) = round(42.5) = 42 (Python rounds half to even)
    assert np.array_equal(out_lbl, label[:, 42:298])
    assert np.array_equal(out_img, image[:, 42:298])

    small_img, small_lbl = _pair(10, 6)
    out_img, out_lbl = CenterCrop(8)(small_img, small_lbl)
    assert out_img.shape == (8, 8, 3) and out_lbl.shape == (8, 8)
    # padded to 10x8 with one row above and below, then columns 1..8 kept
    assert np.all(out_lbl[0] == 255) and np.all(out_lbl[7] == 255)
    assert np.array_equal(out_lbl[1:7], small_lbl[:, 1:9])
    assert np.all(out_img[0] == 0) and np.all(out_img[7] == 0)
    assert np.array_equal(out_img[1:7], small_img[:, 1:9])


def test_image_tensor_is_uint8_chw_and_normalize_uses_imagenet_statistics():
    pixels = np.array([[[0, 128, 255], [10, 20, 30]]], dtype=np.uint8)  # 1x2 RGB
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    expected = ((pixels / 255.0 - mean) / std).transpose(2, 0, 1)
    chw = image_tensor(pixels)
    assert chw.dtype == torch.uint8 and chw.shape == (3, 1, 2) and chw.is_contiguous()
    assert chw[:, 0, 1].tolist() == [10, 20, 30]
    out = normalize(chw[None])
    assert out.dtype == torch.float32 and out.shape == (1, 3, 1, 2)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    # a flipped (negative-stride) view is read as what it shows, HWC- or CHW-backed
    assert image_tensor(pixels[:, ::-1])[:, 0, 0].tolist() == [10, 20, 30]
    resized = resize_image(_smooth_image(50, 37), 20, 30)  # a view of a CHW buffer
    expected = torch.from_numpy(np.ascontiguousarray(resized[:, ::-1].transpose(2, 0, 1)))
    assert torch.equal(image_tensor(resized[:, ::-1]), expected)
    assert torch.equal(image_tensor(resized), torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))))


def test_device_batch_normalises_uint8_widens_labels_and_keeps_float_images():
    images = torch.tensor([[[[0, 255]], [[128, 128]], [[51, 204]]]], dtype=torch.uint8)  # 1x3x1x2
    labels = torch.tensor([[[3, 255]]], dtype=torch.uint8)
    out_images, out_labels = device_batch(images, labels, torch.device("cpu"))
    # red channel: (0 - 0.485 * 255) / (0.229 * 255) = -2.1179, (255 - 123.675) / 58.395 = 2.2489
    np.testing.assert_allclose(out_images[0, 0, 0].numpy(), [-2.1179, 2.2489], atol=1e-4)
    assert out_labels.dtype == torch.int64 and out_labels.tolist() == [[[3, 255]]]
    ready = torch.randn(2, 3, 4, 4)
    same, _ = device_batch(ready, labels, torch.device("cpu"))
    assert same is ready
    channels_last, _ = device_batch(images.expand(2, 3, 4, 2).contiguous(), labels, torch.device("cpu"), True)
    assert channels_last.dtype == torch.float32
    assert channels_last.is_contiguous(memory_format=torch.channels_last)


def test_remap_label_applies_lookup_table():
    lut = np.zeros(256, dtype=np.uint8)
    lut[3], lut[7], lut[255] = 1, 2, 255
    label = np.array([[0, 3], [7, 255]], dtype=np.uint8)
    out = remap_label(label, lut)
    assert out.dtype == torch.uint8
    assert out.tolist() == [[0, 1], [2, 255]]
    assert remap_label(label[:, ::-1], lut).tolist() == [[1, 0], [255, 2]]


def test_pipelines_shapes():
    image, label = _pair(50, 37)
    random.seed(0)
    assert train_transform(32)(image, label)[1].shape == (32, 32)
    assert eval_transform(32, crop=True)(image, label)[0].shape == (32, 32, 3)
    full_img, full_lbl = eval_transform(32, crop=False)(image, label)
    assert full_img is image and full_lbl is label
