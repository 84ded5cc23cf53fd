"""SDR's latent-space terms (recent_methods.md §2.1-2.2): per-class statistics of the body
features, prototype matching, feature clustering, cluster separation, feature sparsification, and
the running-mean prototypes they use.  The composition into the loss, and the deviations from the
reference that the default fixes (``--sdr_reference_quirks`` restores them), are in ``sdr.py``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import IGNORE_INDEX

EPS = 1e-15  # the reference's epsilon of the sparsification ratio


# --- labels and per-class statistics -----------------------------------------------------------


def downsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour label map at feature resolution (§2.1)."""
    return F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).long()


def reference_class_rows(features: Tensor, mask: Tensor, channels_first: bool) -> Tensor:
    """The reference's per-class gather, quirks included: (n, C) rows for the ``mask`` pixels.

    ``features[mask.expand(...)]`` lists values in (b, c, pixel) order; ``channels_first``
    reshapes it as ``.view(C, -1)`` (running stats, L_fc) and transposes, otherwise as
    ``.view(-1, C)`` (L_pm).  Only for batch 1 and ``channels_first`` are the rows real pixels.
    """
    c = features.shape[1]
    flat = features[mask.unsqueeze(1).expand_as(features)]
    return flat.view(c, -1).t() if channels_first else flat.view(-1, c)


def class_statistics(features: Tensor, labels: Tensor, classes: Tensor, prototypes: Optional[Tensor] = None,
                     quirks: bool = False, channels_first: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Per class k of ``classes`` (K,): feature sum (K, C), pixel count (K,) and, given
    ``prototypes`` (N, C), the summed squared distance Σ_i ||f_i - P_k||² (K,).

    ``labels`` (B, h, w) are at feature resolution.  The default gathers each pixel's feature
    vector (permute to (B, h, w, C), then mask); ``quirks`` uses :func:`reference_class_rows`.
    """
    k, c = classes.numel(), features.shape[1]
    if quirks:
        rows = [reference_class_rows(features, labels == int(cl), channels_first) for cl in classes]
        sums = torch.stack([r.sum(0) for r in rows]) if rows else features.new_zeros(0, c)
        counts = torch.tensor([r.shape[0] for r in rows], device=features.device, dtype=torch.long)
        sq = None
        if prototypes is not None:
            sq = torch.stack([(r - prototypes[cl]).pow(2).sum() for r, cl in zip(rows, classes)]) if rows \
                else features.new_zeros(0)
        return sums, counts, sq
    slot = torch.full((IGNORE_INDEX + 1,), -1, dtype=torch.long, device=labels.device)  # label -> position in classes
    slot[classes] = torch.arange(k, device=labels.device)
    pixel_slot = slot[labels.reshape(-1)]
    keep = pixel_slot >= 0
    pixel_slot = pixel_slot[keep]
    feats = features.permute(0, 2, 3, 1).reshape(-1, c)[keep]
    sums = features.new_zeros(k, c).index_add_(0, pixel_slot, feats)
    counts = torch.bincount(pixel_slot, minlength=k)
    sq = None
    if prototypes is not None:
        dist = (feats - prototypes[classes][pixel_slot]).pow(2).sum(1)
        sq = features.new_zeros(k).index_add_(0, pixel_slot, dist)
    return sums, counts, sq


def classes_present(labels: Tensor, drop_background: bool, quirks: bool = False) -> Tensor:
    """Sorted label values in ``labels`` except 255, optionally without background.

    With ``quirks`` the *first* value present is dropped instead of 0, as the reference does.
    """
    present = torch.unique(labels)
    present = present[present != IGNORE_INDEX]
    if drop_background:
        present = present[1:] if quirks else present[present != 0]
    return present


# --- the four latent-space terms (§2.1) ----------------------------------------------------------


def prototype_matching(features: Tensor, labels_down: Tensor, teacher_logits: Tensor, prototypes: Tensor,
                       sum_after: bool, quirks: bool = False) -> Tensor:
    """L_pm (``DistillationEncoderPrototypesLoss``, §2.1), at step t > 0.

    Old classes are located with the teacher: its full-resolution argmax, nearest-downsampled,
    kept where the current ground truth is background.  With ``sum_after``: mean over the old
    classes c present of MSE(mean of the features of c, P_c).  Otherwise: mean over those
    pixels of MSE(f_i, P_{c(i)}).  The prototypes are constants.
    """
    c = features.shape[1]
    teacher_pred = downsample_labels(teacher_logits.argmax(dim=1), tuple(features.shape[-2:]))
    pseudo = torch.where(labels_down == 0, teacher_pred, torch.zeros_like(teacher_pred))
    classes = classes_present(pseudo, drop_background=True)
    if classes.numel() == 0:
        return features.new_zeros(())
    sums, counts, sq = class_statistics(features, pseudo, classes, prototypes, quirks, channels_first=False)
    if sum_after:
        means = sums / counts.unsqueeze(1)
        return (means - prototypes[classes]).pow(2).mean(1).sum() / classes.numel()
    return sq.sum() / (c * counts.sum())


def feature_clustering(sums: Tensor, counts: Tensor, sq: Tensor, channels: int, quirks: bool = False) -> Tensor:
    """L_fc (``FeaturesClusteringSeparationLoss``, §2.1): per class MSE(f_i, P_c) over its pixels
    and channels, then the mean over the K classes present.

    With ``quirks`` the reference's in-loop ``loss /= K`` is reproduced: class j (1-based, sorted)
    ends up divided by K^(K - j + 1).
    """
    per_class = sq / (counts * channels)
    k = per_class.numel()
    if k == 0:
        return per_class.new_zeros(())
    if quirks:
        powers = torch.arange(k, 0, -1, device=per_class.device, dtype=per_class.dtype)
        return (per_class / float(k) ** powers).sum()
    return per_class.mean()


def cluster_separation(sums: Tensor, counts: Tensor) -> Tensor:
    """L_sep (``--lfc_sep_clust``, §2.1): mean of 1/||μ_a - μ_b||₂ over the finite entries of the
    pairwise matrix of the current batch's class means (the zero diagonal gives inf and drops out);
    0 when no entry is finite (fewer than two classes)."""
    means = sums / counts.unsqueeze(1)
    inverse = 1.0 / torch.cdist(means.unsqueeze(0), means.unsqueeze(0)).squeeze(0)
    finite = inverse[torch.isfinite(inverse)]
    return finite.mean() if finite.numel() else means.new_zeros(())


def _max_masked_for_class(features: Tensor, labels_down: Tensor) -> Tensor:
    """Divide each pixel by the largest activation (all pixels, all channels) of its label value."""
    flat = labels_down.reshape(-1)
    pixel_max = features.amax(dim=1).reshape(-1)
    group_max = pixel_max.new_zeros(IGNORE_INDEX + 1).scatter_reduce(0, flat, pixel_max, "amax", include_self=False)
    return features / (group_max[labels_down].unsqueeze(1) + EPS)


NORMALIZATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "max_maskedforclass": _max_masked_for_class,
    "max_overall": lambda f, _: f / (f.max() + EPS),
    "L1": lambda f, _: F.normalize(f, p=1, dim=1),
    "L2": lambda f, _: F.normalize(f, p=2, dim=1),
    "softmax": lambda f, _: torch.softmax(f, dim=1),
}
SHRINKING: dict[str, Callable[[Tensor], Tensor]] = {
    "squared": lambda f: f.pow(2).sum(1),
    "power3": lambda f: f.pow(3).sum(1),
    "exponential": lambda f: f.exp().sum(1),
}


def feature_sparsification(features: Tensor, labels_down: Tensor, normalization: str, shrinking: str) -> Tensor:
    """L_fs (``FeaturesSparsificationLoss``, "ratio", §2.1): per pixel
    shrink(f̂) / (Σ_k f̂_k + 1e-15), mean over pixels; f̂ is the normalised feature.

    With ``max_maskedforclass`` each label value present (255 included, as one more group) is
    normalised by its own maximum.  As in the reference the loss is 0 when Σ f̂ <= 0.
    """
    normed = NORMALIZATIONS[normalization](features, labels_down)
    ratio = SHRINKING[shrinking](normed) / (normed.sum(1) + EPS)
    return torch.where(normed.sum() > 0, ratio.mean(), ratio.new_zeros(()))


# --- prototype state -----------------------------------------------------------------------------


def update_running_means(prototypes: Tensor, counts: Tensor, classes: Tensor, sums: Tensor,
                         batch_counts: Tensor) -> None:
    """Cumulative moving average (§2.2), in place: P_c <- (Σ f + n_c P_c) / (n_c + m_c), n_c += m_c."""
    seen = batch_counts > 0
    classes, sums, batch_counts = classes[seen], sums[seen], batch_counts[seen]
    n = counts[classes].to(prototypes.dtype)
    prototypes[classes] = (sums + n.unsqueeze(1) * prototypes[classes]) / (n + batch_counts).unsqueeze(1)
    counts[classes] += batch_counts.to(counts.dtype)
