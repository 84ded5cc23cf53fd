"""How much of a class does colour alone name?  A nearest-centroid classifier on the colour
histogram of each object's pixels, beside the network.

In VOC no single low-level cue names a class (cats and dogs share their colours, so do buses,
cars and trains); on a proxy where colour alone names the class, old-class logits barely move
when new classes arrive and forgetting is unlike VOC's.  This script measures it on the shapes
set: every (image, class) region of the validation split is one object; its pixels' RGB
histogram (4 bins per channel, normalised) is classified by the nearest class centroid (L1)
learned on the training split.  With ``--ckpt`` the network is scored on the same objects: an
object counts as named when the majority of its pixels are predicted as its class.

    python scripts/colour_cue.py                                   # the colour classifier alone
    python scripts/colour_cue.py --shapes_seed 1                   # on another draw of the images
    python scripts/colour_cue.py $(cat scripts/demo_flags.txt) --task 15-1 --overlap \\
        --ckpt runs/shapes/15-1-ov/demo-FT/step-0.pth              # and the step-0 network

With a checkpoint, both are scored on the classes that checkpoint knows.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run  # noqa: E402  (its user errors)
from argparser import parse_args  # noqa: E402
from dataset import shapes  # noqa: E402
from utils import checkpoint  # noqa: E402
from utils.cli import ToolParser, script_main  # noqa: E402

BINS = 4


def object_histograms(image: np.ndarray, label: np.ndarray, classes) -> list[tuple[int, np.ndarray]]:
    """(class, normalised RGB histogram) of every class region of one image."""
    codes = (image // (256 // BINS)).astype(np.int64)
    codes = (codes[..., 0] * BINS + codes[..., 1]) * BINS + codes[..., 2]
    out = []
    for cls in np.unique(label):
        if cls in classes:
            hist = np.bincount(codes[label == cls], minlength=BINS**3).astype(np.float64)
            out.append((int(cls), hist / hist.sum()))
    return out


def histograms(split: str, count: int, seed: int, classes, generate=None) -> tuple[np.ndarray, np.ndarray]:
    generate = generate or shapes.generate_sample
    rows = [row for index in range(count) for row in object_histograms(*generate(seed, split, index), classes)]
    return np.array([c for c, _ in rows]), np.stack([h for _, h in rows])


def nearest_centroid_accuracy(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    labels, feats = train
    names = np.unique(labels)
    centroids = np.stack([feats[labels == c].mean(0) for c in names])
    distance = np.abs(test[1][:, None, :] - centroids[None]).sum(-1)
    return float(np.mean(names[distance.argmin(1)] == test[0]))


@torch.no_grad()
def network_accuracy(opts, ckpt: str, count: int, classes) -> float:
    """Fraction of validation objects of ``classes`` whose pixels the network mostly calls right."""
    from dataset.tasks import Task
    from dataset.transforms import device_batch
    from utils.distributed import DistInfo

    state = checkpoint.load(Path(ckpt))
    task = Task(opts.dataset, opts.task, state["task"]["step"])
    model = run.build_model(opts, task, DistInfo(device=torch.device("cpu")), pretrained=False)
    run.load_weights(model, state["model"], ckpt)
    model.eval()
    method = opts.method_cls(opts, task)
    hits = total = 0
    for start in range(0, count, 64):
        pairs = [shapes.generate_sample(opts.shapes_seed, "val", i, opts.shapes_image_size)
                 for i in range(start, min(count, start + 64))]
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2)
        labels = np.stack([p[1] for p in pairs])
        x, _ = device_batch(images, torch.from_numpy(labels), torch.device("cpu"))
        predicted = method.predict(model(x)["logits"].float()).numpy()
        for label, pred in zip(labels, predicted):
            for cls in np.unique(label):
                if cls in classes:
                    votes = np.bincount(pred[label == cls], minlength=256)
                    hits += int(votes.argmax() == cls)
                    total += 1
    return hits / total


def main(argv=None) -> None:
    parser = ToolParser(description=__doc__, allow_abbrev=False)  # run.py's flags pass through whole
    parser.add_argument("--ckpt", default=None, help="a shapes checkpoint to score beside the colour classifier")
    parser.add_argument("--train_images", type=int, default=2000)
    parser.add_argument("--val_images", type=int, default=300)
    args, run_argv = parser.parse_known_args(argv)
    opts = parse_args(["--dataset", "shapes", *run_argv])  # --shapes_seed picks the draw, with or without --ckpt
    classes = set(range(1, shapes.NUM_FOREGROUND + 1))
    if args.ckpt:
        known = checkpoint.load(Path(args.ckpt))["task"]["classes"]
        classes = {c for step in known for c in step if c}
    colour = nearest_centroid_accuracy(histograms("train", args.train_images, opts.shapes_seed, classes),
                                       histograms("val", args.val_images, opts.shapes_seed, classes))
    print(f"{len(classes)} classes; chance {100 / len(classes):.1f} %")
    print(f"colour histogram, nearest centroid: {100 * colour:.1f} % of validation objects named")
    if args.ckpt:
        net = network_accuracy(opts, args.ckpt, args.val_images, classes)
        print(f"network {args.ckpt}: {100 * net:.1f} % of the same objects named (majority of their pixels)")


if __name__ == "__main__":
    script_main(main)
