"""Loss functions of the classic continual-segmentation methods (LwF, LwF-MC/iCaRL, ILT, MiB).

Pure functions of tensors, shared by every method family that builds on them (PLOP, SDR,
REMINDER, LGKD, LSKD reuse KD/UNKD/UNCE).  Each docstring names the paper and the section of
``reference/mib_plop.md`` it reproduces.  Conventions of the reference code that change numbers
are kept on purpose:

* the mean runs over *all* B*H*W pixels, ignored (255) pixels contributing 0 (§4.0);
* KD and UNKD divide by the number of teacher channels n_old (a mean over classes, §4.2/§4.8);
* the temperature ``alpha`` multiplies the teacher logits only (§4.2).

Logits are (B, C, H, W), labels (B, H, W) int64 with 255 = ignore.  All inputs are cast to fp32.
Plain CE over all pixels is :func:`methods.base.cross_entropy_all_pixels`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import IGNORE_INDEX, mean_over_pixels


def _masked_mean(per_pixel: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean over all pixels, after zeroing the pixels outside ``mask`` (reference ``mask`` arg)."""
    if mask is not None:
        per_pixel = per_pixel * mask.float()
    return per_pixel.mean()


# --- LwF / ILT ------------------------------------------------------------------------------


def knowledge_distillation(
    logits: Tensor, teacher_logits: Tensor, alpha: float = 1.0, mask: Optional[Tensor] = None
) -> Tensor:
    """LwF distillation (Li & Hoiem, ECCV 2016) as MiB's ``KnowledgeDistillationLoss`` (§4.2).

    The student's first n_old channels are renormalised among themselves:
    ``l = -(1/n_old) sum_c softmax(alpha * x_old)_c * log_softmax(x[:n_old])_c`` per pixel,
    then the mean over all pixels.  ``mask`` (B, H, W) optionally zeroes pixels (PLOP's kd_mask).
    """
    n_old = teacher_logits.shape[1]
    log_p = torch.log_softmax(logits.float()[:, :n_old], dim=1)
    q = torch.softmax(alpha * teacher_logits.float(), dim=1)
    return -_masked_mean((q * log_p).mean(dim=1), mask)


def feature_distillation_mse(features: Tensor, teacher_features: Tensor) -> Tensor:
    """ILT's encoder distillation (Michieli & Zanuttigh, ICCVW 2019; §4.4).

    ``nn.MSELoss()`` between the student and teacher backbone outputs: mean over all elements.
    """
    return F.mse_loss(features.float(), teacher_features.float())


# --- MiB ------------------------------------------------------------------------------------


def unbiased_cross_entropy(logits: Tensor, labels: Tensor, n_old: int, weight: Optional[Tensor] = None) -> Tensor:
    """MiB's unbiased cross-entropy (Cermelli et al., CVPR 2020, Eq. 4; §4.8 "UNCE").

    A pixel labelled background (or any old class) may truly be background *or any old class*,
    so its log-probability is ``logsumexp(x_{0..n_old-1}) - logsumexp(x)``; a new-class pixel
    uses the ordinary log-softmax; 255 contributes 0.  Mean over all pixels (§4.0), each image
    scaled by ``weight`` if given (PLOP's adaptive factor).
    """
    logits = logits.float()
    log_den = torch.logsumexp(logits, dim=1, keepdim=True)
    log_old = torch.logsumexp(logits[:, :n_old], dim=1, keepdim=True) - log_den
    log_new = logits[:, n_old:] - log_den
    log_p = torch.cat([log_old, log_new], dim=1)  # channel 0: bg or old; channel j: class n_old-1+j
    labels = labels.long()
    target = torch.where(labels < n_old, torch.zeros_like(labels), labels - (n_old - 1))
    target = torch.where(labels == IGNORE_INDEX, labels, target)
    return mean_over_pixels(F.nll_loss(log_p, target, ignore_index=IGNORE_INDEX, reduction="none"), weight)


def unbiased_knowledge_distillation(
    logits: Tensor, teacher_logits: Tensor, alpha: float = 1.0, mask: Optional[Tensor] = None
) -> Tensor:
    """MiB's unbiased distillation (Cermelli et al., CVPR 2020, Eq. 5; §4.8 "UNKD").

    The teacher's background may now be background *or a new class*, so the student's
    background log-probability is the merged ``logsumexp(x_{{0} u new}) - logsumexp(x)``; old
    foreground classes use the full log-softmax (no renormalisation).  Per pixel
    ``l = -(1/n_old) [q_0 log p_bg + sum_{c=1}^{n_old-1} q_c log p_c]`` with
    ``q = softmax(alpha * x_old)``, then the mean over all pixels.
    """
    logits = logits.float()
    n_old = teacher_logits.shape[1]
    q = torch.softmax(alpha * teacher_logits.float(), dim=1)
    log_den = torch.logsumexp(logits, dim=1)
    log_bg = torch.logsumexp(torch.cat([logits[:, :1], logits[:, n_old:]], dim=1), dim=1) - log_den
    log_old_fg = logits[:, 1:n_old] - log_den.unsqueeze(1)
    per_pixel = (q[:, 0] * log_bg + (q[:, 1:] * log_old_fg).sum(dim=1)) / n_old
    return -_masked_mean(per_pixel, mask)


# --- LwF-MC (iCaRL without exemplars) -------------------------------------------------------
#
# Binary cross-entropy with logits is ``softplus(x) - t * x`` element-wise, so a sum over
# channels with a (partly) one-hot target is ``sum_c softplus(x_c) - sum_c t_c x_c``, where the
# one-hot part is a gather: no (B, C, H, W) target tensor is materialised (ADE has 151 channels).


def bce_with_ignore(logits: Tensor, labels: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """MiB's ``BCEWithLogitsLossWithIgnoreIndex`` (iCaRL, Rebuffi et al., CVPR 2017; §4.3).

    One-hot targets over all channels, per-channel BCE with logits *summed over channels*;
    255 pixels contribute 0; mean over all pixels (reduction='none' then ``.mean()``, §4.0).
    """
    logits = logits.float()
    labels = labels.long()
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    per_pixel = F.softplus(logits).sum(dim=1) - logits.gather(1, safe).squeeze(1)
    return mean_over_pixels(per_pixel * valid, weight)


def icarl_distillation(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """iCaRL's multi-label distillation of LwF-MC, "combined" variant (§4.3).

    The reference computes ``n_old * BCEWithLogitsLoss(mean)(x[:, :n_old], sigmoid(x_old))``,
    i.e. the BCE *summed over the old channels* and averaged over all pixels; this returns that
    sum-mean (the caller multiplies by ``icarl_importance``).
    """
    n_old = teacher_logits.shape[1]
    target = torch.sigmoid(teacher_logits.float())
    bce = F.binary_cross_entropy_with_logits(logits.float()[:, :n_old], target, reduction="none")
    return bce.sum(dim=1).mean()


def icarl_disjoint_loss(
    logits: Tensor, labels: Tensor, teacher_logits: Tensor, keep_background: bool = False
) -> Tensor:
    """MiB's ``IcarlLoss`` (``--icarl_disjoint``; §4.3): BCE whose old targets are soft.

    Targets are the one-hot labels with the old channels replaced by ``sigmoid(x_old)``; with
    ``keep_background`` (``--icarl_bkg``) channel 0 keeps the ground truth.  Summed over
    channels, then the mean over *all* pixels.  As in the reference, a 255 pixel is not skipped
    here: its one-hot part is empty but its old channels still distil the teacher.
    """
    logits = logits.float()
    labels = labels.long()
    n_old = teacher_logits.shape[1]
    first_soft = 1 if keep_background else 0
    soft_target = torch.sigmoid(teacher_logits.float()[:, first_soft:])
    soft_part = (soft_target * logits[:, first_soft:n_old]).sum(dim=1)
    hard = (labels != IGNORE_INDEX) & ((labels < first_soft) | (labels >= n_old))
    safe = torch.where(hard, labels, torch.zeros_like(labels)).unsqueeze(1)
    hard_part = logits.gather(1, safe).squeeze(1) * hard
    return (F.softplus(logits).sum(dim=1) - soft_part - hard_part).mean()
