"""Joint image/label transforms, written on Pillow so that torchvision is not needed.

They reproduce the reference pipeline (MiB/PLOP ``dataset/transform.py``, an old copy of
torchvision's): training uses ``RandomResizedCrop(crop, scale=(0.5, 2.0))`` + a horizontal flip,
validation/test ``Resize(crop)`` + ``CenterCrop(crop)``.  The image is resampled bilinearly, the
label with nearest neighbour so that class ids survive.  Randomness comes from Python's
``random`` module, which the DataLoader seeds differently in every worker.

Speed matters (the data loader must outrun the reference several times), so every geometric
step is a single Pillow call, the image crosses from numpy to torch once, already normalised,
and the label is remapped with one lookup-table indexing operation.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_LABEL = 255

Pair = tuple[Image.Image, Image.Image]
PairTransform = Callable[[Image.Image, Image.Image], Pair]


def _check_same_size(image: Image.Image, label: Image.Image) -> None:
    if image.size != label.size:
        raise ValueError(f"image size {image.size} differs from label size {label.size}")


class Compose:
    """Apply pair transforms in order."""

    def __init__(self, transforms: Sequence[PairTransform]):
        self.transforms = list(transforms)

    def __call__(self, image: Image.Image, label: Image.Image) -> Pair:
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
    nearest allowed aspect ratio.  The crop and the resize are one Pillow call (``box=``), which
    differs from crop-then-resize only in the bilinear support at the crop border.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 2.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise ValueError(f"scale {scale} and ratio {ratio} must be (min, max) ranges")
        self.size = (size, size)
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

    def __call__(self, image: Image.Image, label: Image.Image) -> Pair:
        _check_same_size(image, label)
        top, left, h, w = self.get_params(*image.size)
        box = (left, top, left + w, top + h)
        return (
            image.resize(self.size, Image.Resampling.BILINEAR, box=box),
            label.resize(self.size, Image.Resampling.NEAREST, box=box),
        )

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size[0]}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror image and label together with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, label: Image.Image) -> Pair:
        if random.random() < self.p:
            flip = Image.Transpose.FLIP_LEFT_RIGHT
            return image.transpose(flip), label.transpose(flip)
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Scale the shorter side to ``size`` (the longer side truncated, as torchvision does)."""

    def __init__(self, size: int):
        self.size = size

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        if width < height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size

    def __call__(self, image: Image.Image, label: Image.Image) -> Pair:
        _check_same_size(image, label)
        size = self.output_size(*image.size)
        if size == image.size:
            return image, label
        return (
            image.resize(size, Image.Resampling.BILINEAR),
            label.resize(size, Image.Resampling.NEAREST),
        )

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class CenterCrop:
    """Central ``size`` x ``size`` crop; a smaller image is padded (image 0, label 255 = ignore)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image, label: Image.Image) -> Pair:
        _check_same_size(image, label)
        width, height = image.size
        if width < self.size or height < self.size:
            # Pad like torchvision (extra pixel on the right/bottom), then crop the centre.
            new_w, new_h = max(width, self.size), max(height, self.size)
            offset = ((new_w - width) // 2, (new_h - height) // 2)
            image = _pad(image, (new_w, new_h), offset, 0)
            label = _pad(label, (new_w, new_h), offset, IGNORE_LABEL)
            width, height = new_w, new_h
        top = int(round((height - self.size) / 2.0))
        left = int(round((width - self.size) / 2.0))
        box = (left, top, left + self.size, top + self.size)
        return image.crop(box), label.crop(box)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


def _pad(
    img: Image.Image, size: tuple[int, int], offset: tuple[int, int], fill: int
) -> Image.Image:
    fill_value = (fill,) * len(img.getbands()) if len(img.getbands()) > 1 else fill
    canvas = Image.new(img.mode, size, fill_value)
    if img.mode == "P":
        canvas.putpalette(img.getpalette())
    canvas.paste(img, offset)
    return canvas


_MEAN = (np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0)[:, None, None]
_INV_STD = (1.0 / (np.array(IMAGENET_STD, dtype=np.float32) * 255.0))[:, None, None]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 3xHxW tensor normalised with the ImageNet mean and std.

    Normalised in numpy, single-threaded, straight into the CHW buffer that becomes the tensor:
    torch's intra-op thread pool makes these small element-wise ops slower, not faster, in a
    main process that shares its cores (num_workers=0), and a worker gains nothing from it.
    """
    pixels = np.asarray(image, dtype=np.uint8)
    chw = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
    np.subtract(pixels.transpose(2, 0, 1), _MEAN, out=chw, dtype=np.float32)
    chw *= _INV_STD
    return torch.from_numpy(chw)


def remap_label(label: Image.Image, lut: np.ndarray) -> torch.Tensor:
    """Label image -> int64 HxW tensor of ``lut[value]`` (remapping and masking in one op)."""
    return torch.from_numpy(lut[np.asarray(label)])


def train_transform(crop_size: int) -> Compose:
    """The reference training augmentation."""
    return Compose([RandomResizedCrop(crop_size, scale=(0.5, 2.0)), RandomHorizontalFlip()])


def eval_transform(crop_size: int, crop: bool) -> Compose:
    """Validation/test: the reference's ``Resize+CenterCrop`` (crop=True) or the full image."""
    return Compose([Resize(crop_size), CenterCrop(crop_size)] if crop else [])
