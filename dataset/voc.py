"""Pascal VOC 2012 on disk: find the split lists, images and labels in any of the usual layouts.

Three layouts are in circulation and all are accepted, detected from what is on disk:

* devkit: ``<root>/VOC2012`` (or ``<root>/VOCdevkit/VOC2012``, or ``<root>`` itself) holding
  ``JPEGImages/``, ``SegmentationClassAug/`` and ``ImageSets/Segmentation/{train_aug,val}.txt``
  (one image id per line).  Without the augmented set, ``SegmentationClass/`` and ``train.txt``
  are used instead.
* MiB: ``<root>/PascalVOC12/splits/{train_aug,val}.txt`` whose lines are
  ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` relative to ``PascalVOC12/``.
* PLOP: ``<root>/list/{train_aug,val}.txt`` with the same lines; images are relative to
  ``<root>/VOCdevkit/VOC2012/`` and labels to ``<root>/``.

``FileSplit`` (also used by ADE20K) is the resulting list of (image, label) files; it decodes
lazily, one pair per ``load`` call, and turns any unreadable file into a ``DataError`` that
names it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # optional: a faster, bit-identical JPEG decoder (see read_image)
    import simplejpeg
except ImportError:  # Pillow decodes everything then
    simplejpeg = None

from .errors import DataError
from .presence import files_cache_key

CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]



def voc_palette() -> list[int]:
    """The 256-colour VOC palette (flat RGB list): class k's colour spreads k's bits over RGB."""
    palette = []
    for k in range(256):
        r = g = b = 0
        for bit in range(8):
            r |= ((k >> (3 * bit)) & 1) << (7 - bit)
            g |= ((k >> (3 * bit + 1)) & 1) << (7 - bit)
            b |= ((k >> (3 * bit + 2)) & 1) << (7 - bit)
        palette += [r, g, b]
    return palette


VOC_LAYOUTS = (
    "<root>/VOC2012/{JPEGImages,SegmentationClassAug,ImageSets/Segmentation/train_aug.txt} "
    "(devkit), <root>/PascalVOC12/splits/*.txt (MiB) or <root>/list/*.txt with "
    "<root>/VOCdevkit/VOC2012 (PLOP)"
)
_HINT = (
    "run data/download_voc.sh, or data/make_shapes.py for the synthetic set (see data/README.md)"
)


def _decode(path: Path, what: str) -> Image.Image:
    """Decode now, so that a corrupt file fails here and names itself."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"cannot read {what} {path}: {err}; re-download it or drop it from the split list") from None
    return image


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file.

    YCbCr and grayscale JPEGs are decoded by simplejpeg when it is installed: the same
    libjpeg-turbo decode as Pillow's (accurate DCT, fancy upsampling; bit-identical, tested),
    straight into a numpy array, in 70 % of Pillow's time.  Everything else (other formats, CMYK,
    whose RGB conversion differs from Pillow's, truncated or corrupt data) goes through Pillow,
    which decodes it or names the bad file.
    """
    if simplejpeg is not None and path.suffix.lower() in (".jpg", ".jpeg"):
        try:
            data = path.read_bytes()
            if simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray"):
                return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except (ValueError, OSError):
            pass
    return rgb8(_decode(path, "image"), path)


# Modes Pillow converts to 8-bit RGB faithfully; 16-bit grey is scaled here, the rest refused.
EIGHT_BIT_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr",
                             "LAB", "HSV"})


def rgb8(image: Image.Image, path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded image.  16-bit grey ("I;16*", or "I" within 0..65535) is
    scaled to 8 bits (v / 257, rounded: the inverse of the usual 8-to-16-bit widening), where
    Pillow's own conversion would clip it to white; float and other modes are refused."""
    if image.mode == "RGB":
        return np.asarray(image)
    if image.mode in EIGHT_BIT_MODES:
        return np.asarray(image.convert("RGB"))
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"image {path} has 32-bit pixel values outside 0..65535; convert it to 8-bit RGB")
        grey = ((values + 128) // 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    raise DataError(f"image {path} has {image.mode} pixels, which cannot be read as colours; convert it to "
                    "8-bit RGB (PNG or JPEG)")


def read_label(path: Path) -> Image.Image:
    """Decode a label PNG of class ids, kept in its palette ("P") or grayscale ("L") mode.

    Both modes store the ids themselves; the transforms (nearest resampling, crops, flips)
    preserve them and ``np.asarray`` reads them back, so no conversion copy is needed.
    """
    label = _decode(path, "label")
    if label.mode not in ("P", "L"):
        raise DataError(
            f"label {path} has mode {label.mode}; labels must be palette or grayscale PNGs of "
            f"class ids (0 background, 255 ignore), not colour-coded images"
        )
    return label


def read_label_array(path: Path) -> np.ndarray:
    """The class ids of a label PNG as a uint8 (H, W) array."""
    return np.asarray(read_label(path))


@dataclass
class FileSplit:
    """One split of a file-backed dataset: parallel lists of image and label paths."""

    dataset: str
    split: str
    root: Path
    images: list[Path]
    labels: list[Path]

    def __post_init__(self) -> None:
        if not self.images:
            raise DataError(
                f"the {self.dataset} {self.split} split under {self.root} lists no image; "
                f"{_hint(self.dataset)}"
            )
        missing = [p for p in self.images if not p.is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} image(s) of the {self.dataset} {self.split} split are missing, "
                f"e.g. {missing[0]}; {_hint(self.dataset)}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB image and (H, W) uint8 label of class ids of one sample, decoded now."""
        image = read_image(self.images[index])
        label = read_label_array(self.labels[index])
        if image.shape[:2] != label.shape:
            (h, w), (lh, lw) = image.shape[:2], label.shape
            raise DataError(
                f"image {self.images[index]} is {w}x{h} but its label "
                f"{self.labels[index]} is {lw}x{lh}; they must match"
            )
        return image, label

    def label_reader(self) -> tuple[Callable[[Path], np.ndarray], list[Path]]:
        return read_label_array, self.labels

    def cache_key(self) -> str:
        return files_cache_key(self.dataset, self.split, self.root, self.labels)


def _hint(dataset: str) -> str:
    if dataset == "ade":
        return "run data/download_ade.sh (see data/README.md)"
    return _HINT


def _read_lines(path: Path) -> list[list[str]]:
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


def _split_file(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"no split list {' or '.join(names)} in {folder}; {_HINT}")


def _pairs_from_lines(
    lines: list[list[str]], image_base: Path, label_base: Path, listing: Path
) -> tuple[list[Path], list[Path]]:
    """MiB/PLOP list lines: "/JPEGImages/x.jpg /SegmentationClassAug/x.png" (leading / dropped)."""
    images, labels = [], []
    for cols in lines:
        if len(cols) != 2:
            raise DataError(
                f"{listing}: line {' '.join(cols)!r} should be '<image path> <label path>'"
            )
        images.append(image_base / cols[0].lstrip("/"))
        labels.append(label_base / cols[1].lstrip("/"))
    return images, labels


def _devkit_dir(root: Path) -> Path | None:
    for candidate in (root / "VOC2012", root / "VOCdevkit" / "VOC2012", root):
        if (candidate / "ImageSets" / "Segmentation").is_dir() and (
            candidate / "JPEGImages"
        ).is_dir():
            return candidate
    return None


def _mib_dir(root: Path) -> Path | None:
    for candidate in (root / "PascalVOC12", root):
        if (candidate / "splits").is_dir():
            return candidate
    return None


def detect_layout(root: Path) -> str:
    """'mib', 'plop' or 'devkit', from the folders present under ``root``."""
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; expected {VOC_LAYOUTS}; {_HINT}")
    if _mib_dir(root) is not None:
        return "mib"
    if (root / "list").is_dir():
        return "plop"
    if _devkit_dir(root) is not None:
        return "devkit"
    raise DataError(f"no Pascal VOC found under {root}; expected {VOC_LAYOUTS}; {_HINT}")


def voc_split(root: str | Path, split: str, dataset: str = "voc") -> FileSplit:
    """The files of VOC ``split`` ("train" = train_aug, or "val") under ``root``, any layout."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown VOC split {split!r}")
    root = Path(root).expanduser()
    names = ("train_aug.txt", "train.txt") if split == "train" else ("val.txt",)
    layout = detect_layout(root)
    if layout == "mib":
        base = _mib_dir(root)
        listing = _split_file(base / "splits", names)
        images, labels = _pairs_from_lines(_read_lines(listing), base, base, listing)
    elif layout == "plop":
        listing = _split_file(root / "list", names)
        devkit = root / "VOCdevkit" / "VOC2012"
        images, labels = _pairs_from_lines(_read_lines(listing), devkit, root, listing)
    else:
        base = _devkit_dir(root)
        aug = (base / "SegmentationClassAug").is_dir()
        label_dir = base / ("SegmentationClassAug" if aug else "SegmentationClass")
        if not label_dir.is_dir():
            raise DataError(f"no SegmentationClassAug/ or SegmentationClass/ in {base}; {_HINT}")
        if not aug and split == "train":
            names = ("train.txt",)  # train_aug.txt lists images only the augmented set labels
        listing = _split_file(base / "ImageSets" / "Segmentation", names)
        stems = [Path(cols[0]).stem for cols in _read_lines(listing)]
        images = [base / "JPEGImages" / f"{s}.jpg" for s in stems]
        labels = [label_dir / f"{s}.png" for s in stems]
    return FileSplit(dataset, split, root, images, labels)
