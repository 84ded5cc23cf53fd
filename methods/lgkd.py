"""LGKD: PLOP with label-guided knowledge distillation in place of the logit KD.

Yang et al., "Label-Guided Knowledge Distillation for Continual Semantic Segmentation on 2D
Images and 3D Point Clouds", ICCV 2023; the code analysed in recent_methods.md §4.  At step
t > 0 the loss is PLOP's (pseudo-labelled CE with the adaptive factor, Local POD) plus
``loss_kd`` times L_lgkd; the classic KD/UNKD term is not used (``--lgkd`` replaces it).
"""
from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dataset.tasks import layout

from . import register
from .base import IGNORE_INDEX
from .plop import PLOP


# Per-setting (prev_kd, novel_kd) of the LGKD scripts (§4.3); other settings get the reference
# argparser defaults.  The synthetic set mirrors VOC's splits, so it takes VOC's values.
LGKD_WEIGHTS: dict[tuple[str, str], tuple[float, float]] = {
    ("voc", "15-1"): (1.0, 0.0),
    ("voc", "15-5"): (5.0, 1.0),
    ("voc", "19-1"): (5.0, 0.5),
    ("ade", "100-50"): (1.0, 20.0),
    ("ade", "100-10"): (1.0, 1.0),
    ("ade", "50-50"): (2.0, 10.0),
}
DEFAULT_WEIGHTS = (10.0, 2.0)


# Flags that act only through a switch (methods/__init__.py).
FLAG_NEEDS = {"prev_kd": ("lgkd", ()), "novel_kd": ("lgkd", ())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LGKD label-guided distillation (recent_methods.md §4)")
    g.add_argument("--lgkd", action="store_true", default=False,
                   help="replace the logit KD (weight --loss_kd) by label-guided KD at stride 16")
    g.add_argument("--prev_kd", type=float, default=None,
                   help="LGKD weight of background/old pixels (default: per setting, else 10)")
    g.add_argument("--novel_kd", type=float, default=None,
                   help="LGKD weight of new-class pixels (default: per setting, else 2)")


def lgkd_weights(dataset: str, task_name: str, prev_kd: Optional[float],
                 novel_kd: Optional[float]) -> tuple[float, float]:
    """Explicit values win; otherwise the setting's script values (§4.3)."""
    key = ("voc" if dataset == "shapes" else dataset, task_name)
    default_prev, default_novel = LGKD_WEIGHTS.get(key, DEFAULT_WEIGHTS)
    return (default_prev if prev_kd is None else prev_kd, default_novel if novel_kd is None else novel_kd)


def label_guided_kd(logits_small: Tensor, teacher_small: Tensor, labels: Tensor, prev_kd: float, novel_kd: float,
                    alpha: float = 1.0) -> Tensor:
    """L_lgkd (``LabelGuidedKnowledgeDistillationLoss``, §4.2) at the logits' resolution.

    The ground truth (the masked labels, not pseudo-labels) is nearest-downsampled to the
    logits' size and 255 pixels are dropped.  With q = softmax(α z^T) over the C_old teacher
    channels and log p = log_softmax(z) over all C student channels, a pixel's target is
    [q, 0, ..., 0] when y < C_old, and for a new-class pixel y = k the teacher's background
    mass moves to k: t_0 = 0, t_k = q_0, old classes keep q_c.  The loss is
    -mean over valid pixels of w · Σ_c t_c log p_c, with w = prev_kd or novel_kd: a sum over
    classes (not MiB's mean), and zero-weight pixels still count in the mean.
    """
    logits_small, teacher_small = logits_small.float(), teacher_small.float()
    n_old = teacher_small.shape[1]
    y = F.interpolate(labels.unsqueeze(1).float(), size=logits_small.shape[-2:], mode="nearest").squeeze(1).long()
    valid = y != IGNORE_INDEX
    novel = valid & (y >= n_old)
    log_p = torch.log_softmax(logits_small, dim=1)
    q = torch.softmax(alpha * teacher_small, dim=1)
    old_part = (q[:, 1:] * log_p[:, 1:n_old]).sum(dim=1)
    background_target = torch.where(novel, y, torch.zeros_like(y))  # where q_0 goes
    background_part = q[:, 0] * log_p.gather(1, background_target.unsqueeze(1)).squeeze(1)
    weight = torch.where(novel, novel_kd, prev_kd)
    per_pixel = weight * (old_part + background_part) * valid
    return -per_pixel.sum() / valid.sum().clamp(min=1)


@register("LGKD")
class LGKD(PLOP):
    """PLOP + ``loss_kd`` · L_lgkd; ``--prev_kd`` / ``--novel_kd`` default to the setting's values."""

    selected_by = ('lgkd',)

    preset: dict[str, Any] = {**PLOP.preset, "loss_kd": 1.0, "lgkd": True}
    preset_by_dataset: dict[str, dict[str, Any]] = PLOP.preset_by_dataset

    def __init__(self, opts, task):
        super().__init__(opts, task)
        self.lgkd = bool(opts.lgkd)
        self.lgkd_weight = self.kd_weight if self.lgkd else 0.0
        if self.lgkd:
            self.kd_weight = 0.0  # --loss_kd now weights L_lgkd, not the classic KD/UNKD
        self.prev_kd, self.novel_kd = lgkd_weights(task.dataset, layout(task.name), opts.prev_kd, opts.novel_kd)

    @property
    def needs_teacher(self) -> bool:
        return super().needs_teacher or (self.incremental and self.lgkd_weight != 0)

    def _extra_terms(self, batch: dict, out: dict, teacher: dict, labels: Tensor) -> dict[str, Tensor]:
        terms = super()._extra_terms(batch, out, teacher, labels)
        if self.lgkd_weight != 0:
            terms["lgkd"] = self.lgkd_weight * label_guided_kd(
                out["logits_small"], teacher["logits_small"], batch["label"], self.prev_kd, self.novel_kd, self.alpha)
        return terms
