"""Streaming confusion matrix and the scores of the continual-segmentation tables (reference §5).

The matrix lives on the model's device and is updated with one ``bincount`` per batch; ranks
sum their matrices once at the end.  Evaluation samplers shard the set without padding, so no
image is counted twice (the reference's DistributedSampler pads and double-counts a few).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from utils.distributed import all_reduce_sum


class ConfusionMatrix:
    """Rows are ground truth, columns predictions, over classes 0..n-1; labels >= n are skipped."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.n = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = target < self.n  # drops 255 (ignore)
        index = target[valid].long() * self.n + pred[valid].long()
        self.mat += torch.bincount(index, minlength=self.n * self.n).view(self.n, self.n)

    def all_reduce(self) -> "ConfusionMatrix":
        all_reduce_sum(self.mat)
        return self

    def scores(self) -> dict:
        return segmentation_scores(self.mat)


def segmentation_scores(mat: torch.Tensor) -> dict:
    """Per-class IoU and accuracy; means over the classes present in the ground truth.

    A class absent from the ground truth has IoU ``nan`` (the reference prints "X") and is left
    out of the means, like the reference's ``StreamSegMetrics``.
    """
    m = mat.double().cpu()
    tp = m.diag()
    gt = m.sum(1)
    pred = m.sum(0)
    present = gt > 0
    iou = torch.where(present, tp / (gt + pred - tp).clamp_min(1), torch.full_like(tp, math.nan))
    acc = torch.where(present, tp / gt.clamp_min(1), torch.full_like(tp, math.nan))
    total = m.sum()
    return {
        "class_iou": iou.tolist(),
        "class_acc": acc.tolist(),
        "miou": float(iou[present].mean()) if present.any() else math.nan,
        "mean_acc": float(acc[present].mean()) if present.any() else math.nan,
        "overall_acc": float(tp.sum() / total) if total > 0 else math.nan,
    }


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def incremental_scores(class_iou: Sequence[float], base_classes: Sequence[int],
                       later_classes: Sequence[int]) -> dict:
    """Old / new / all mIoU and their harmonic mean, as the field reports them.

    old = background + step-0 classes, new = every class added after step 0 (PLOP's
    ``average_csv.py`` and DKD's evaluator); all = the mIoU over every seen class.
    hIoU = 2·old·new / (old + new) (DKD).  Classes absent from the ground truth are skipped.
    """
    old = _nanmean([class_iou[c] for c in base_classes])
    new = _nanmean([class_iou[c] for c in later_classes])
    everything = _nanmean(list(class_iou[: len(base_classes) + len(later_classes)]))
    hiou = 2 * old * new / (old + new) if later_classes and (old + new) > 0 else math.nan
    return {"miou_all": everything, "miou_old": old, "miou_new": new if later_classes else math.nan,
            "hiou": hiou}
