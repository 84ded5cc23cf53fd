"""REMINDER (Phan et al., "Class Similarity Weighted Knowledge Distillation for Continual
Semantic Segmentation", CVPR 2022): PLOP plus class-similarity weighted KD (CSW-KD).

recent_methods.md §3.  At step > 0 the new-class pixels (after pseudo-labelling) distil the
teacher's tempered distribution, each old class weighted by how similar its prototype is to the
pixel's new class (Eq. 4-6 of the paper; ``ClassSimilarityWeightedKD`` in the code):

    s_k = softmax_c cos(P^new_k, P^old_c),  s_kc <- 0 if s_kc < delta / C_old,
    L_csw = T^2 sum_i sum_c -(softmax(z^T_i / T)_c s_{y_i c} + 1e-7) log softmax(z_i[:C_old] / T)_c / N_new_pixels.

P^new are batch prototypes of the student's head output, P^old the prototypes saved by step
t-1: after every step (step 0 included) a pass over the training set with the final model in
eval mode averages, per class of the step, its batch prototypes (a running mean over *batches*,
as ``update_prototypes``); sums and batch counts are all-reduced, so every rank agrees (the
reference kept per-rank values and wrote a side file from every rank).  They live in the step
checkpoint's method state; a step > 0 without them is a :class:`MethodStateError`.

Deviation: the CE keeps PLOP's +1e-6 in the adaptive factor, which REMINDER's copy dropped (its
issue #10, NaN on images without background).  ``--csw_foreground_only`` (off by default) is an
ablation: CSW-KD without background's channel.
"""
from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.modes import eval_mode

from . import register
from .base import IGNORE_INDEX, MethodStateError, StepContext
from .plop import PLOP, image_label_batches

CSW_TEMPERATURE = 3.0  # hard-coded T of ClassSimilarityWeightedKD
CSW_EPS = 1e-7         # added to the weighted teacher target, not renormalised (reference)


# Flags that act only through a switch (methods/__init__.py).
FLAG_NEEDS = {"csw_foreground_only": ("csw_kd", ()), "delta_csw": ("csw_kd", ())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("REMINDER: class-similarity weighted distillation")
    g.add_argument("--csw_kd", type=float, default=0.0, help="weight of CSW-KD on new-class pixels (REMINDER: 0.5)")
    g.add_argument("--csw_foreground_only", action="store_true",
                   help="deviation, for ablation: CSW-KD over the old foreground classes only (background's "
                        "channel left out of the teacher target and the student's distribution)")
    g.add_argument("--delta_csw", type=float, default=0.0,
                   help="drop similarity weights below delta / C_old (REMINDER ADE scripts: 1.0)")


def _linear_taps(out_size: int, in_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Source indices and weights (out_size, 2) of 1-D linear upsampling with align_corners=True,
    read off PyTorch's own interpolation of an identity matrix (bilinear is separable)."""
    eye = torch.eye(in_size, device=device).unsqueeze(0)
    matrix = F.interpolate(eye, size=out_size, mode="linear", align_corners=True)[0].t()  # (out, in)
    weights, index = F.pad(matrix, (0, 1)).topk(2, dim=1)  # padding column: in_size == 1
    return index.clamp_(max=in_size - 1), weights


def class_feature_sums(features: Tensor, labels: Tensor, first: int, count: int) -> tuple[Tensor, Tensor]:
    """Per class ``first .. first + count - 1``: the sum, over its pixels, of ``features``
    bilinearly upsampled (align_corners=True) to the label size, and its number of pixels.

    This is REMINDER's ``compute_prototype`` (upsample, then average per class) without the
    (B, C, H, W) upsampled map: upsampling is linear, so each labelled pixel splats its four
    bilinear weights onto the low-resolution grid and one contraction with the features gives
    every class sum.  Returns sums (count, C) and pixel counts (count,).
    """
    b, c, h, w = features.shape
    height, width = labels.shape[-2:]
    rows, row_w = _linear_taps(height, h, features.device)
    cols, col_w = _linear_taps(width, w, features.device)
    k = labels.long() - first
    valid = (k >= 0) & (k < count)
    k = k.clamp(0, count - 1)
    image = torch.arange(b, device=features.device).view(b, 1, 1)
    cell = ((k * b + image) * h)[..., None, None] + rows[None, :, None, :, None]
    cell = cell * w + cols[None, None, :, None, :]                                   # (B, H, W, 2, 2)
    weight = row_w[None, :, None, :, None] * col_w[None, None, :, None, :] * valid[..., None, None]
    splat = features.new_zeros(count * b * h * w).index_add_(0, cell.flatten(), weight.flatten().to(features.dtype))
    sums = torch.einsum("kbij,bcij->kc", splat.view(count, b, h, w), features)
    pixels = features.new_zeros(count).index_add_(0, k.flatten(), valid.flatten().to(features.dtype))
    return sums, pixels


def class_similarity_weights(new_prototypes: Tensor, old_prototypes: Tensor, delta: float) -> Tensor:
    """s (K_new, C_old): softmax over old classes of the cosine similarity between prototypes,
    entries below delta / C_old set to 0 (REMINDER Eq. 5; ``--delta_csw``)."""
    cosine = F.normalize(new_prototypes, dim=1) @ F.normalize(old_prototypes, dim=1).t()
    weights = torch.softmax(cosine, dim=1)
    return torch.where(weights < delta / old_prototypes.shape[0], torch.zeros_like(weights), weights)


def csw_distillation(logits: Tensor, teacher_logits: Tensor, labels: Tensor, class_weights: Tensor,
                     n_old: int, temperature: float = CSW_TEMPERATURE, first: int = 0) -> Tensor:
    """L_csw on the pixels labelled with a new class (n_old <= y < 255), module docstring formula.

    ``class_weights`` (K_new, C_old) holds the similarity weights of class n_old + k in row k.
    ``first=1`` (``--csw_foreground_only``) leaves background's channel out of both distributions.
    No gradient flows into the target.  0 when the batch has no new-class pixel.
    """
    mask = (labels >= n_old) & (labels != IGNORE_INDEX)
    student = logits.float()[:, first:n_old].permute(0, 2, 3, 1)[mask]            # (N, C_old - first)
    teacher = teacher_logits.float()[:, first:n_old].permute(0, 2, 3, 1)[mask].detach()
    weights = class_weights[labels[mask] - n_old][:, first:]
    target = torch.softmax(teacher / temperature, dim=1) * weights + CSW_EPS
    log_p = torch.log_softmax(student / temperature, dim=1)
    return temperature ** 2 * (-(target * log_p)).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def step_prototypes(model: torch.nn.Module, batches, first: int, count: int, autocast,
                    all_reduce) -> Tensor:
    """Prototypes (count, C) of classes ``first ..`` from the head output of ``model`` (eval
    mode): the mean over batches containing a class of its batch prototype, all ranks' batches
    together (``Trainer.update_prototypes``); classes never seen stay 0 like the reference."""
    total = counts = None
    with eval_mode(model):
        for images, labels in batches:
            with autocast():
                features = model(images)["pre_logits"]
            sums, pixels = class_feature_sums(features.float(), labels, first, count)
            present = pixels > 0
            batch_means = torch.where(present[:, None], sums / pixels.clamp(min=1)[:, None],
                                      torch.zeros_like(sums))
            total = batch_means if total is None else total + batch_means
            counts = present.float() if counts is None else counts + present.float()
    if total is None:
        raise ValueError("the training loader yielded no batch; cannot compute REMINDER prototypes")
    all_reduce(total)
    all_reduce(counts)
    return total / counts.clamp(min=1)[:, None]


@register("REMINDER")
class Reminder(PLOP):
    """PLOP + 0.5 CSW-KD (REMINDER's ``--method REMINDER``; its ADE scripts add ``--delta_csw 1``)."""

    selected_by = ('csw_kd',)

    preset: dict[str, Any] = {**PLOP.preset, "csw_kd": 0.5, "delta_csw": 0.0}
    preset_by_dataset: dict[str, dict[str, Any]] = {"ade": {**PLOP.preset_by_dataset["ade"], "delta_csw": 1.0}}

    def __init__(self, opts, task):
        super().__init__(opts, task)
        self.csw_weight = float(opts.csw_kd)
        self.delta = float(opts.delta_csw)
        self.csw_first = 1 if getattr(opts, "csw_foreground_only", False) else 0
        self.n_new = task.n_new
        self.old_prototypes: Optional[Tensor] = None
        self.prototypes: Optional[Tensor] = None

    @property
    def uses_csw(self) -> bool:
        return self.csw_weight > 0

    @property
    def needs_teacher(self) -> bool:
        return super().needs_teacher or (self.incremental and self.uses_csw)

    @property
    def needs_previous_state(self) -> bool:
        return super().needs_previous_state or (self.incremental and self.uses_csw)

    def load_state_dict(self, state: Optional[dict]) -> None:
        super().load_state_dict(state)
        if not (self.incremental and self.uses_csw):
            return
        prototypes = (state or {}).get("prototypes")
        if prototypes is None:
            raise MethodStateError(
                f"REMINDER step {self.step} needs the class prototypes saved by step {self.step - 1}, "
                f"which its checkpoint lacks; train step {self.step - 1} with --method REMINDER (csw_kd > 0)")
        if prototypes.shape[0] != self.n_old:
            raise MethodStateError(
                f"the step {self.step - 1} checkpoint holds {prototypes.shape[0]} class prototypes but "
                f"{self.n_old} old classes are expected; use the checkpoint of this task's step {self.step - 1}")
        self.old_prototypes = prototypes.float()

    def _extra_terms(self, batch: dict, out: dict, teacher: dict, labels: Tensor) -> dict[str, Tensor]:
        if not self.uses_csw:
            return {}
        sums, pixels = class_feature_sums(out["pre_logits"].detach().float(), labels, self.n_old, self.n_new)
        batch_prototypes = sums / pixels.clamp(min=1)[:, None]
        weights = class_similarity_weights(batch_prototypes, self.old_prototypes.to(sums.device), self.delta)
        csw = csw_distillation(out["logits"], teacher["logits"], labels, weights, self.n_old, first=self.csw_first)
        return {"csw": self.csw_weight * csw}

    def after_step(self, ctx: StepContext) -> None:
        """Prototypes of this step's classes (raw labels, final model); old rows carried over."""
        super().after_step(ctx)
        if not self.uses_csw:
            return
        first = self.n_old
        new = step_prototypes(ctx.model, image_label_batches(ctx.train_loader, ctx.device), first,
                              self.n_new, ctx.autocast, ctx.all_reduce)
        old = self.old_prototypes if self.old_prototypes is not None else new.new_zeros(0, new.shape[1])
        self.prototypes = torch.cat([old.to(new.device), new]).cpu()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.prototypes is not None:
            state["prototypes"] = self.prototypes
        return state
