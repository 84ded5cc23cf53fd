"""How good are PLOP's pseudo-labels?  Each background-labelled pixel of a step's training images,
checked against the full ground truth.

At step t the old classes' pixels are labelled background.  PLOP (and REMINDER, LGKD, LSKD)
relabels each background pixel with the step t-1 model's arg-max where that model's entropy is
below the class's threshold and ignores the others (mib_plop.md §4.9), so what they keep of the
old classes rests on how often that relabelling is right.  A synthetic image's full labels are
known, and so are a VOC image's (its label file holds every class), so every background-labelled
pixel can be scored: an old-class pixel relabelled to its class, to another old class, left as
background or ignored; a true-background pixel kept as background, turned into an old class or
ignored.  Thresholds are computed as PLOP computes them, over the step's training images (here
centre-cropped, without the random crops of training).

    python scripts/pseudo_label_quality.py --dataset shapes $(cat scripts/demo_flags.txt) \\
        --task 15-1 --overlap --step 1 --ckpt runs/shapes/15-1-ov/FT/step-0.pth [--per_class]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run  # noqa: E402
from argparser import parse_args, run_dir  # noqa: E402
from dataset import build_datasets, channel_names  # noqa: E402
from dataset.incremental import channel_lut  # noqa: E402
from dataset.tasks import Task  # noqa: E402
from dataset.transforms import device_batch, image_tensor, remap_label  # noqa: E402
from methods.base import IGNORE_INDEX  # noqa: E402
from methods.pseudo import entropy_thresholds, pseudo_label  # noqa: E402
from utils.distributed import DistInfo, resolve_device  # noqa: E402
from utils.errors import ConfigError  # noqa: E402
from utils.cli import ToolParser, script_main  # noqa: E402

OUTCOMES = {"old": ("its class", "another old class", "background", "ignored"),
            "background": ("background", "an old class", "ignored")}


def batches(train, evaluate, batch_size: int, device, in_channels):
    """(images, masked labels, full labels) of the training images, centre-cropped; the full labels
    numbered as the model's channels by ``in_channels`` (``channel_lut``), as the pseudo-labels are."""
    for start in range(0, len(train), batch_size):
        images, masked, full = [], [], []
        for index in train.indices[start:start + batch_size]:
            image, label = evaluate(*train.source.load(int(index)))
            images.append(image_tensor(image))
            masked.append(remap_label(label, train.lut))
            full.append(torch.from_numpy(in_channels[label].astype("int64")))
        images, masked = device_batch(torch.stack(images), torch.stack(masked), device)
        yield images, masked, torch.stack(full).to(device)


def count_outcomes(relabelled, masked, full, n_old: int) -> dict[str, torch.Tensor]:
    """Pixel counts of each outcome (OUTCOMES) among the background-labelled pixels; ``per_class``
    holds the old-class outcomes per true class (row c: class c's pixels, row 0 empty)."""
    background = masked == 0
    old = background & (full >= 1) & (full < n_old)
    true_background = background & (full == 0)
    outcome = torch.full_like(full, -1)  # the OUTCOMES["old"] index of each old pixel
    outcome[(relabelled >= 1) & (relabelled < n_old)] = 1
    outcome[relabelled == full] = 0
    outcome[relabelled == 0] = 2
    outcome[relabelled == IGNORE_INDEX] = 3
    counted = old & (outcome >= 0)
    per_class = torch.bincount(full[counted] * 4 + outcome[counted], minlength=n_old * 4).view(n_old, 4)
    return {
        "old": per_class.sum(0),
        "background": torch.stack([(true_background & (relabelled == 0)).sum(),
                                   (true_background & (relabelled >= 1) & (relabelled < n_old)).sum(),
                                   (true_background & (relabelled == IGNORE_INDEX)).sum()]),
        "per_class": per_class,
    }


@torch.no_grad()
def quality(opts, task: Task, teacher, device, batch_size: int = 32) -> dict[str, torch.Tensor]:
    train, _, test = build_datasets(opts, task)
    read = lambda: batches(train, test.transform, batch_size, device, channel_lut(task))  # noqa: E731
    thresholds = entropy_thresholds(teacher, ((i, m) for i, m, _ in read()),
                                    task.n_old, task.n_seen, opts.threshold, opts.pseudo_median)
    totals = None
    for images, masked, full in read():
        result = pseudo_label(masked, teacher(images)["logits"], thresholds, task.n_old, task.n_seen)
        counts = count_outcomes(result.labels, masked, full, task.n_old)
        totals = counts if totals is None else {k: totals[k] + counts[k] for k in counts}
    return totals


def main(argv=None) -> None:
    parser = ToolParser(description=__doc__, allow_abbrev=False)  # run.py's flags pass through whole
    parser.add_argument("--ckpt", default=None, help="step t-1 checkpoint (default: the run's step-{t-1}.pth)")
    parser.add_argument("--per_class", action="store_true", help="also the old-class outcomes of each old class")
    args, run_argv = parser.parse_known_args(argv)
    opts = parse_args(["--method", "PLOP", *run_argv])
    if len(opts.step) != 1 or opts.step[0] < 1:
        raise ConfigError("pseudo_label_quality.py needs one incremental step: pass --step t with t >= 1")
    step, device = opts.step[0], resolve_device(opts.device, 0)
    task = Task(opts.dataset, opts.task, step)
    path = Path(args.ckpt) if args.ckpt else run_dir(opts) / f"step-{step - 1}.pth"
    teacher = run.load_step_model(opts, task.at(step - 1), path, DistInfo(device=device)).eval()
    totals = quality(opts, task, teacher, device)
    print(f"step {step} training images, teacher {path} (thresholds: {opts.pseudo_median} median, "
          f"floor {opts.threshold}):")
    for kind, names in OUTCOMES.items():
        print(f"  {kind} pixels labelled background {shares(totals[kind], names)}")
    if args.per_class:
        print("\n".join(class_rows(totals["per_class"], channel_names(task, opts.shapes_version))))


def class_rows(per_class: torch.Tensor, names=None) -> list[str]:
    """One line per old class (background excluded): id, display name where the dataset has names, shares."""
    rows = []
    for c, counts in enumerate(per_class[1:], start=1):
        label = f"{c:3d} {names[c]}" if names else f"{c:3d}"
        rows.append(f"    class {label} {shares(counts, OUTCOMES['old'])}")
    return rows


def shares(counts: torch.Tensor, names) -> str:
    """'(N): x % name, ...' of an outcome count vector."""
    total = int(counts.sum())
    parts = ", ".join(f"{100 * c / max(total, 1):.1f} % {name}" for c, name in zip(counts.tolist(), names))
    return f"({total}): {parts}"


if __name__ == "__main__":
    script_main(main)
