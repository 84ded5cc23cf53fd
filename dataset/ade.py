"""ADE20K (SceneParsing 150) on disk.

Layout: ``<root>/ADEChallengeData2016/{images,annotations}/{training,validation}`` (or ``<root>``
holding ``images/`` and ``annotations/``).  Images are listed in sorted order, which fixes the
index of every image; each ``x.jpg`` has its annotation ``x.png`` with values 0..150 (0 is the
"other/void" label, treated as background or ignored depending on the masking, see
``incremental.py``).
"""
from __future__ import annotations

from pathlib import Path

from .errors import DataError
from .voc import FileSplit

ADE_LAYOUT = "<root>/ADEChallengeData2016/{images,annotations}/{training,validation}"
_HINT = "run data/download_ade.sh (see data/README.md)"
_FOLDER = {"train": "training", "val": "validation"}


def _ade_dir(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; expected {ADE_LAYOUT}; {_HINT}")
    for candidate in (root / "ADEChallengeData2016", root):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise DataError(f"no ADE20K found under {root}; expected {ADE_LAYOUT}; {_HINT}")


def ade_split(root: str | Path, split: str) -> FileSplit:
    """The files of ADE20K ``split`` ("train" = training, "val" = validation) under ``root``."""
    if split not in _FOLDER:
        raise ValueError(f"unknown ADE20K split {split!r}")
    root = Path(root).expanduser()
    base = _ade_dir(root)
    image_dir = base / "images" / _FOLDER[split]
    label_dir = base / "annotations" / _FOLDER[split]
    if not image_dir.is_dir():
        raise DataError(f"missing folder {image_dir}; expected {ADE_LAYOUT}; {_HINT}")
    images = sorted(image_dir.glob("*.jpg"))
    labels = [label_dir / f"{p.stem}.png" for p in images]
    missing = [p for p in labels if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} annotation(s) of ADE20K {_FOLDER[split]} are missing, e.g. "
            f"{missing[0]}; every image needs a PNG of the same name; {_HINT}"
        )
    return FileSplit("ade", split, root, images, labels)
