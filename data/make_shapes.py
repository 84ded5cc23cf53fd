"""Write the synthetic shapes set to disk in the Pascal VOC devkit layout.

Why: the on-the-fly set (``--dataset shapes``) never touches the file-reading code; written out
here and read back with ``--dataset voc --data_root DIR``, it exercises the real VOC loader
(layout detection, JPEG/PNG decoding, the presence cache) with identical labels.

    python data/make_shapes.py --root DIR [--train 2000 --val 300 --size 64 --seed 0]

(the demo's and the leaderboard's set has 5000 training images, ``--shapes_train_size 5000`` in
``scripts/demo_flags.txt``: write it with ``--train 5000``)

writes ``DIR/VOC2012/JPEGImages/*.jpg`` (quality 95, 4:4:4),
``DIR/VOC2012/SegmentationClassAug/*.png`` (palette mode, VOC palette) and
``DIR/VOC2012/ImageSets/Segmentation/{train_aug,val}.txt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.incremental import DEFAULT_SHAPES_VERSION, SHAPES_GENERATORS, shapes_generator  # noqa: E402
from dataset.voc import voc_palette  # noqa: E402
from utils.cli import ToolParser, script_main  # noqa: E402

JPEG_QUALITY = 95


def write_split(base: Path, split: str, count: int, size: int, seed: int, version: int = DEFAULT_SHAPES_VERSION) -> list[str]:
    """Write ``count`` samples of ``split``; return their image ids."""
    palette = voc_palette()
    ids = []
    for index in range(count):
        image, label = shapes_generator(version).generate_sample(seed, split, index, size)
        name = f"{split}_{index:06d}"
        jpg = base / "JPEGImages" / f"{name}.jpg"
        # no chroma subsampling: the stripes and saturated edges would smear at 64 px
        Image.fromarray(image, "RGB").save(jpg, quality=JPEG_QUALITY, subsampling=0)
        png = Image.fromarray(label, "L").convert("P")
        png.putpalette(palette)
        png.save(base / "SegmentationClassAug" / f"{name}.png")
        ids.append(name)
    return ids


def write_shapes(root: Path, train: int, val: int, size: int, seed: int, version: int = DEFAULT_SHAPES_VERSION) -> Path:
    """Write both splits under ``root/VOC2012``; return that folder."""
    base = root / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    lists = base / "ImageSets" / "Segmentation"
    for split, count, listing in (("train", train, "train_aug.txt"), ("val", val, "val.txt")):
        ids = write_split(base, split, count, size, seed, version)
        (lists / listing).write_text("".join(f"{i}\n" for i in ids))
    return base


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="output folder (the --data_root)")
    parser.add_argument("--train", type=int, default=2000, help="number of training images")
    parser.add_argument("--val", type=int, default=300, help="number of validation images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (--shapes_seed)")
    parser.add_argument("--version", type=int, choices=sorted(SHAPES_GENERATORS), default=DEFAULT_SHAPES_VERSION,
                        help="generator (--shapes_version)")
    args = parser.parse_args(argv)
    if args.train < 1 or args.val < 1 or args.size < 16:
        parser.error("--train and --val must be >= 1 and --size >= 16")
    base = write_shapes(args.root, args.train, args.val, args.size, args.seed, args.version)
    print(f"wrote {args.train} train + {args.val} val images to {base}")
    return 0


if __name__ == "__main__":
    script_main(main)
