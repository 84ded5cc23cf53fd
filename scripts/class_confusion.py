"""Where a step's model goes wrong on chosen classes: what their pixels are predicted as, and what
the pixels it predicts as them truly are, on the step's test images with *every* class labelled.
A future class (not learned yet) shows what the model calls its objects, e.g. background.

A run's test labels name only the classes seen so far; a future class's objects count as
background (mib_plop.md §2.3), so a false positive on them is indistinguishable from one on true
background.  The dataset's own label files hold every class (VOC's do, and so do the synthetic
set's), so here future classes keep their ids and the two are told apart.

    python scripts/class_confusion.py --dataset shapes $(cat scripts/demo_flags.txt) \\
        --task 15-1 --overlap --method PLOP --step 2 --classes 7 8 10 \\
        --ckpt runs/shapes/15-1-ov/PLOP-seed{42,1,2}/step-2.pth

Several ``--ckpt`` (a method's seeds) are scored on the same images and their confusion matrices
summed: pixel counts are given per model (the mean), shares of the sum.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run  # noqa: E402
from argparser import parse_args, run_dir  # noqa: E402
from dataset import build_datasets, class_names  # noqa: E402
from dataset.incremental import IncrementalSegmentation, channel_lut  # noqa: E402
from dataset.loaders import eval_loader  # noqa: E402
from dataset.tasks import Task  # noqa: E402
from train import evaluate  # noqa: E402
from utils.distributed import DistInfo, resolve_device  # noqa: E402
from utils.errors import ConfigError  # noqa: E402
from utils.cli import ToolParser, script_main  # noqa: E402

SHOWN = 5  # classes listed per line


@torch.no_grad()
def full_confusion(opts, task: Task, models, predict, info: DistInfo) -> torch.Tensor:
    """(K, K) pixel counts over the step's test images, summed over ``models``: rows the true
    class among all K of the dataset (future classes by their own id), columns the predicted class
    (only seen classes occur), both by class id whatever the learning order.  The test set is built
    once for all models."""
    _, _, test = build_datasets(opts, task)
    every_class = np.arange(256, dtype=np.uint8)  # the label file as it is; 255 stays ignored
    labelled = IncrementalSegmentation(test.source, test.indices, test.transform, every_class, None)
    loader = eval_loader(labelled, opts, info)
    mat = sum(evaluate(model, loader, task.num_classes, predict, info.device, channels_last=False).mat.cpu()
              for model in models)
    return mat[:, torch.as_tensor(channel_lut(task)[:task.num_classes], dtype=torch.long)]  # channels -> class ids


def describe(counts: torch.Tensor, names, future: set[int], models: int = 1) -> str:
    """'x % (n) k name, ...' of the largest entries of a count vector summed over ``models``:
    shares of the sum, n per model."""
    total = max(float(counts.sum()), 1.0)
    parts = []
    for k in counts.argsort(descending=True)[:SHOWN].tolist():
        if counts[k] == 0:
            break
        tag = " (future)" if k in future else ""
        parts.append(f"{100 * float(counts[k]) / total:.1f} % ({_count(counts[k], models)}) {k} {names[k]}{tag}")
    return ", ".join(parts)


def _count(value, models: int) -> str:
    mean = float(value) / models
    return f"{mean:.0f}" if mean == round(mean) or models == 1 else f"{mean:.1f}"


def report(mat: torch.Tensor, classes: list[int], names, task: Task, models: int = 1) -> list[str]:
    """Two lines per seen class: where its pixels go (recall) and what its predictions are
    (precision); one for a future class, which the model cannot predict yet: where its pixels
    go.  ``mat`` is the sum over ``models`` models' confusion matrices."""
    future = set(task.future_classes)
    lines = []
    for c in classes:
        tp, row, col = float(mat[c, c]), mat[c], mat[:, c]
        if c in future:
            lines.append(f"  class {c} {names[c]} (future): its {_count(row.sum(), models)} pixels are predicted as: "
                         f"{describe(row, names, future, models)}")
            continue
        union = float(row.sum()) + float(col.sum()) - tp
        lines.append(f"  class {c} {names[c]}: IoU {100 * tp / max(union, 1.0):.1f} %")
        lines.append(f"    its {_count(row.sum(), models)} pixels are predicted as: "
                     f"{describe(row, names, future, models)}")
        lines.append(f"    the {_count(col.sum(), models)} pixels predicted as it are: "
                     f"{describe(col, names, future, models)}")
    return lines


def by_group(mat: torch.Tensor, classes: list[int], task: Task, models: int = 1, predicted: bool = False) -> str:
    """One line: where the chosen seen classes' pixels go, by group (their own class, another
    base class, background, a class added at steps 1-t when t > 0, a future class).  The share taken
    by the added classes is the bias toward new classes reported for MiB on long VOC tasks.  With
    ``predicted``, the other way round: what the pixels predicted as those classes truly are, by
    the same groups, so that a loss of IoU can be told a loss of recall or of precision."""
    seen = [c for c in classes if c not in task.future_classes]
    if not seen:
        return "  (no seen class chosen)"
    added = "a class added at step 1" if task.step == 1 else f"a class added at steps 1-{task.step}"
    group_of = {k: "another base class" for k in task.base_classes}
    group_of.update({k: added for k in task.seen_classes if k not in group_of})
    group_of[0] = "background"
    groups = dict.fromkeys(["their own class", "another base class", "background", added, "a future class"], 0.0)
    if task.step == 0:
        del groups[added]  # no class added yet: no group to report
    for c in seen:
        for k, n in enumerate((mat[:, c] if predicted else mat[c]).tolist()):
            groups["their own class" if k == c else group_of.get(k, "a future class")] += n
    total = max(sum(groups.values()), 1.0)
    parts = ", ".join(f"{100 * n / total:.1f} % {name}" for name, n in groups.items())
    listed = " ".join(map(str, seen))
    if predicted:
        return f"  the {_count(total, models)} pixels predicted as classes {listed} truly are: {parts}"
    return f"  the {_count(total, models)} pixels of classes {listed} are predicted as: {parts}"


def main(argv=None) -> None:
    parser = ToolParser(description=__doc__, allow_abbrev=False)  # run.py's flags pass through whole
    parser.add_argument("--classes", type=int, nargs="+", required=True,
                        help="classes to examine; a future class shows what the model calls its pixels")
    parser.add_argument("--ckpt", nargs="+", default=None,
                        help="the step's checkpoint, or several (a method's seeds) whose matrices are summed "
                             "(default: the run's step-{t}.pth)")
    args, run_argv = parser.parse_known_args(argv)
    opts = parse_args(run_argv)
    if len(opts.step) != 1:
        raise ConfigError("class_confusion.py examines one step's model: pass --step t")
    step, device = opts.step[0], resolve_device(opts.device, 0)
    task = Task(opts.dataset, opts.task, step)
    unknown = [c for c in args.classes if not 0 <= c < task.num_classes]
    if unknown:
        raise ConfigError(f"--classes {' '.join(map(str, unknown))}: {opts.dataset} has classes "
                          f"0-{task.num_classes - 1} only")
    paths = [Path(p) for p in args.ckpt] if args.ckpt else [run_dir(opts) / f"step-{step}.pth"]
    info = DistInfo(device=device)
    predict = opts.method_cls(opts, task).predict
    models = [run.load_step_model(opts, task, path, info).eval() for path in paths]  # all checked first
    mat = full_confusion(opts, task, models, predict, info)
    names = class_names(opts.dataset, opts.shapes_version) or [str(k) for k in range(task.num_classes)]
    which = f"model {paths[0]}" if len(paths) == 1 else f"{len(paths)} models (pixel counts per model)"
    print(f"step {step} test images, {which}; every class labelled, future ones "
          f"({', '.join(map(str, task.future_classes)) or 'none'}) by their own id:")
    print("\n".join(report(mat, args.classes, names, task, len(paths))))
    if len(args.classes) > 1:
        print(by_group(mat, args.classes, task, len(paths)))
        print(by_group(mat, args.classes, task, len(paths), predicted=True))


if __name__ == "__main__":
    script_main(main)
