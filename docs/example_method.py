"""PKD: MiB plus a distillation of the head's pooled features (the README's example method).

Old classes are forgotten when the features they are read from drift.  PKD adds to MiB's losses
an L2 pull of the student's globally pooled ASPP features towards the frozen teacher's, weighted
by ``--pkd_factor``.
"""
from __future__ import annotations

import torch.nn.functional as F

from . import register
from .classic import MiB


def add_arguments(parser):
    """The method's flags; run.py collects them from every module in methods/."""
    group = parser.add_argument_group("PKD (example)")
    group.add_argument("--pkd_factor", type=float, default=0.0, help="weight of the pooled-feature distillation")


@register("PKD")
class PooledFeatureKD(MiB):
    """MiB's UNCE + UNKD + balanced init, plus ``pkd_factor`` x MSE of the pooled head features."""

    preset = {**MiB.preset, "pkd_factor": 1.0}  # explicit flags beat the preset

    def loss(self, batch, out, teacher_out):
        terms = super().loss(batch, out, teacher_out)  # {"unce": ..., "unkd": ...} at step > 0
        if teacher_out is not None:  # the teacher runs at step > 0 only
            student = out["pre_logits"].float().mean(dim=(2, 3))
            teacher = teacher_out["pre_logits"].float().mean(dim=(2, 3))
            terms["pkd"] = self.opts.pkd_factor * F.mse_loss(student, teacher)
        return terms
