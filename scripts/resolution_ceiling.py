"""The best test mIoU a DeepLab network can reach at its output stride, whatever its weights.

DeepLab predicts on a grid ``output_stride`` times coarser than the image and upsamples the
logits bilinearly, so detail finer than a grid cell is lost.  This script sends each test label
of a step through that round trip — one-hot, averaged over each cell (the best a cell can say),
bilinearly upsampled as ``segmentation_module`` upsamples logits, arg-max — and scores it as
``run.py --test`` scores a network.  It reads any dataset ``run.py`` reads, so the same command
with ``--dataset voc`` gives VOC's ceiling under VOC's flags.

    python scripts/resolution_ceiling.py --dataset shapes $(cat scripts/demo_flags.txt) --task 15-1 --overlap --step 0
    python scripts/resolution_ceiling.py --dataset voc --data_root D --task 15-1 --overlap --step 0
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from argparser import parse_args  # noqa: E402
from dataset import build_datasets  # noqa: E402
from dataset.tasks import Task  # noqa: E402
from metrics.confusion import ConfusionMatrix  # noqa: E402
from utils.cli import script_main  # noqa: E402


def round_trip(label: torch.Tensor, num_classes: int, stride: int) -> torch.Tensor:
    """The arg-max of the bilinearly upsampled cell averages of ``label``'s one-hot map (255:
    ignored pixels count for no class)."""
    one_hot = F.one_hot(label.long().clamp(max=num_classes), num_classes + 1)[..., :num_classes]
    cells = F.avg_pool2d(one_hot.permute(2, 0, 1)[None].float(), stride, ceil_mode=True)
    return F.interpolate(cells, size=label.shape, mode="bilinear", align_corners=False)[0].argmax(0)


def ceiling(opts, task: Task) -> dict:
    _, _, test = build_datasets(opts, task)
    matrix = ConfusionMatrix(task.n_seen)
    for i in range(len(test)):
        _, label = test[i]
        matrix.update(round_trip(label, task.n_seen, opts.output_stride), label)
    return matrix.scores()


def main(argv=None) -> None:
    opts = parse_args(argv)
    for step in opts.step:  # 'all' is expanded by parse_args
        task = Task(opts.dataset, opts.task, step)
        scores = ceiling(opts, task)
        print(f"{opts.dataset} {opts.task} step {step}, output stride {opts.output_stride}, crop "
              f"{opts.crop_size}: ceiling mIoU {100 * scores['miou']:.2f} over classes 0-{task.n_seen - 1}")


if __name__ == "__main__":
    script_main(main)
