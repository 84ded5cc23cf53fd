"""Joint image/label transforms on numpy arrays: the readers decode, numpy and torch do the rest.

They reproduce the reference pipeline (MiB/PLOP ``dataset/transform.py``, an old copy of
torchvision's): training uses ``RandomResizedCrop(crop, scale=(0.5, 2.0))`` + a horizontal flip,
validation/test ``Resize(crop)`` + ``CenterCrop(crop)``.  The image is resampled bilinearly, the
label with nearest neighbour so that class ids survive.  Randomness comes from Python's
``random`` module only, which ``loaders.SeededSamples`` seeds per sample and epoch.

A sample is an (H, W, 3) uint8 RGB image and an (H, W) uint8 label of class ids.  Crops and
flips are numpy views (no copy); the image is resampled by torch's uint8 antialiased bilinear
kernel (the one torchvision uses, built to match Pillow's ``BILINEAR`` and about 3x faster than
it), the label by two 1-D gathers and remapped by one lookup-table index.  Both leave the
dataset as uint8 tensors; ``device_batch`` normalises the images on the training device.
"""
from __future__ import annotations

import functools
import math
import random
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .presence import IGNORE_LABEL

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Pair = tuple[np.ndarray, np.ndarray]
PairTransform = Callable[[np.ndarray, np.ndarray], Pair]


def _check_same_size(image: np.ndarray, label: np.ndarray) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(f"image size {image.shape[:2]} differs from label size {label.shape[:2]}")


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an (H, W, 3) uint8 image, antialiased when shrinking (as Pillow does).

    Returns an (height, width, 3) view of a channels-first buffer, which ``image_tensor`` reads
    without another copy.
    """
    if image.shape[:2] == (height, width):
        return image
    if min(image.strides) < 0:  # a flipped view: torch tensors cannot have negative strides
        image = np.ascontiguousarray(image)
    if image.flags.writeable:
        pixels = torch.from_numpy(image)
    else:
        with warnings.catch_warnings():  # Pillow's arrays are read-only; interpolate only reads
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(image)
    out = F.interpolate(pixels.permute(2, 0, 1).unsqueeze(0), size=(height, width), mode="bilinear",
                        align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of every output pixel centre, floor((i + 0.5) * in / out), in exact integers.

    This is Pillow's NEAREST rule, except where a centre falls exactly on a pixel edge: Pillow
    accumulates the position in floating point and lands on either side of it.
    """
    return (2 * np.arange(size_out, dtype=np.int64) + 1) * size_in // (2 * size_out)


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label: every value is a source value."""
    if label.shape == (height, width):
        return label
    rows = nearest_indices(label.shape[0], height)
    cols = nearest_indices(label.shape[1], width)
    return label[rows][:, cols]  # two 1-D gathers: 7x faster than one 2-D fancy index


class Compose:
    """Apply pair transforms in order."""

    def __init__(self, transforms: Sequence[PairTransform]):
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        for transform in self.transforms:
            image, label = transform(image, label)
        return image, label

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomResizedCrop:
    """torchvision's area-fraction random crop, resized to ``size`` x ``size``.

    Up to 10 tries draw an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``
    and accept the first crop that fits inside the image; with the reference's scale (0.5, 2.0)
    fractions above 1 never fit.  If no try fits, the whole image is used, centre-cropped to the
    nearest allowed aspect ratio.  Crop, then resize, as torchvision's ``resized_crop``.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 2.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise ValueError(f"scale {scale} and ratio {ratio} must be (min, max) ranges")
        self.size = size
        self.scale = scale
        self.ratio = ratio

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Return (top, left, crop_height, crop_width) for an image of this size."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = random.uniform(*self.scale) * area
            aspect = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        _check_same_size(image, label)
        top, left, h, w = self.get_params(image.shape[1], image.shape[0])
        window = (slice(top, top + h), slice(left, left + w))
        return (
            resize_image(image[window], self.size, self.size),
            resize_label(label[window], self.size, self.size),
        )

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror image and label together with probability ``p`` (views, no copy)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        if random.random() < self.p:
            return image[:, ::-1], label[:, ::-1]
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Scale the shorter side to ``size`` (the longer side truncated, as torchvision does)."""

    def __init__(self, size: int):
        self.size = size

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize."""
        if width < height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        _check_same_size(image, label)
        width, height = self.output_size(image.shape[1], image.shape[0])
        return resize_image(image, height, width), resize_label(label, height, width)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class CenterCrop:
    """Central ``size`` x ``size`` crop; a smaller image is padded (image 0, label 255 = ignore)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Pair:
        _check_same_size(image, label)
        height, width = label.shape
        if width < self.size or height < self.size:
            # Pad like torchvision (extra pixel on the right/bottom), then crop the centre.
            new_h, new_w = max(height, self.size), max(width, self.size)
            top, left = (new_h - height) // 2, (new_w - width) // 2
            image = _pad(image, new_h, new_w, top, left, 0)
            label = _pad(label, new_h, new_w, top, left, IGNORE_LABEL)
            height, width = new_h, new_w
        top = int(round((height - self.size) / 2.0))
        left = int(round((width - self.size) / 2.0))
        window = (slice(top, top + self.size), slice(left, left + self.size))
        return image[window], label[window]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


def _pad(array: np.ndarray, height: int, width: int, top: int, left: int, fill: int) -> np.ndarray:
    canvas = np.full((height, width) + array.shape[2:], fill, dtype=array.dtype)
    canvas[top:top + array.shape[0], left:left + array.shape[1]] = array
    return canvas


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 image -> uint8 3xHxW tensor (no copy when the view is already CHW-contiguous).

    The loader ships uint8 and ``device_batch`` normalises on the device: a quarter of the
    worker-to-main and host-to-device traffic of float32, and one batched op instead of one
    per image.
    """
    chw = image.transpose(2, 0, 1)
    if chw.strides[2] < 0:  # a flipped view: torch.flip copies it 10x faster than numpy does
        return torch.from_numpy(np.ascontiguousarray(chw[:, :, ::-1])).flip(2)
    return torch.from_numpy(np.ascontiguousarray(chw))


def remap_label(label: np.ndarray, lut: np.ndarray) -> torch.Tensor:
    """(H, W) label -> HxW tensor of ``lut[value]`` (remapping and masking in one op)."""
    return torch.from_numpy(lut[label])


@functools.lru_cache(maxsize=None)
def _imagenet_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) in uint8 units on ``device``: built once, not copied in every batch."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)
    return mean.to(device), inv_std.to(device)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) images -> float32 normalised with the ImageNet statistics, on their device."""
    mean, inv_std = _imagenet_statistics(images.device)
    return (images.float() - mean) * inv_std


def device_batch(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch on ``device``: images normalised to float32 there, labels as int64.

    uint8 images (what the datasets yield) are normalised here; float images are taken as
    already normalised (synthetic batches in tests and benchmarks).
    """
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if images.dtype == torch.uint8:
        images = normalize(images)  # element-wise: keeps the memory format
    return images, labels.to(device, non_blocking=non_blocking).long()


def train_transform(crop_size: int) -> Compose:
    """The reference training augmentation."""
    return Compose([RandomResizedCrop(crop_size, scale=(0.5, 2.0)), RandomHorizontalFlip()])


def eval_transform(crop_size: int, crop: bool) -> Compose:
    """Validation/test: the reference's ``Resize+CenterCrop`` (crop=True) or the full image."""
    return Compose([Resize(crop_size), CenterCrop(crop_size)] if crop else [])
