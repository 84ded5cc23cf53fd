"""LSKD's masks (recent_methods.md §6.2): where, in each distilled map, the teacher's features
depend on the old or on the new classes.

The teacher also sees each image with its old region and with its new region blanked
(:func:`blank_regions`); how much a location's (or a channel's) features change under each
blanking, ranked within the image against the share of old and new pixels, selects what
mask-guided POD (MD) compares (:func:`region_masks`).  Mask-guided context distillation (MCD)
compares second-order statistics of the masked head output (:func:`context_distance`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import IGNORE_INDEX

DISTANCES = ("cos", "mean_L1")
MASK_MODES = ("whc", "none", "newnone", "gt", "old", "new")
MCD_POOL = 5               # 5x5 average pooling, stride 2, padding 2


def rowwise_quantile(x: Tensor, q: Tensor) -> Tensor:
    """Per row of x (B, N) its q_b-quantile with linear interpolation (``torch.quantile``)."""
    ordered = x.sort(dim=1).values
    position = q.to(x.dtype).clamp(0, 1) * (x.shape[1] - 1)
    low = position.floor().long()
    high = position.ceil().long()
    lo = ordered.gather(1, low[:, None]).squeeze(1)
    hi = ordered.gather(1, high[:, None]).squeeze(1)
    return lo + (position - low.to(x.dtype)) * (hi - lo)


def region_ratios(labels: Tensor, n_old: int) -> tuple[Tensor, Tensor]:
    """Per image, the share of old/background pixels (labels < C_old) and of new pixels."""
    old = (labels < n_old).flatten(1).float().mean(dim=1)
    new = ((labels >= n_old) & (labels != IGNORE_INDEX)).flatten(1).float().mean(dim=1)
    return old, new


def change_statistics(a: Tensor, c: Tensor, d: Tensor, distance: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """How the teacher's map a changes when the old (c) or new (d) region is blanked.

    Spatial (B, h, w): ``cos`` -- cosine similarity over channels; ``mean_L1`` -- |difference of
    the channel means|.  Channel (B, C), both distances: |difference of the spatial means|.
    """
    if distance == "cos":
        s_old, s_new = F.cosine_similarity(a, c, dim=1), F.cosine_similarity(a, d, dim=1)
    else:
        s_old = (c.mean(dim=1) - a.mean(dim=1)).abs()
        s_new = (d.mean(dim=1) - a.mean(dim=1)).abs()
    a_mean = a.mean(dim=(2, 3))
    return s_old, s_new, (c.mean(dim=(2, 3)) - a_mean).abs(), (d.mean(dim=(2, 3)) - a_mean).abs()


def _at_least(x: Tensor, q: Tensor) -> Tensor:
    """Entries of x (B, ...) >= their image's q-quantile."""
    return x >= rowwise_quantile(x.flatten(1), q).view(-1, *[1] * (x.dim() - 1))


def _at_most(x: Tensor, q: Tensor) -> Tensor:
    return x <= rowwise_quantile(x.flatten(1), q).view(-1, *[1] * (x.dim() - 1))


def region_masks(a: Tensor, c: Optional[Tensor], d: Optional[Tensor], labels: Tensor, n_old: int,
                 distance: str, mode: str, channels: bool) -> tuple[Tensor, Optional[Tensor]]:
    """MD masks of one layer: spatial (B, 1, h, w) and, for ``whc`` with ``channels``, (B, C, 1, 1).

    With r_old / r_new the image's old / new pixel shares and Q_r the r-quantile over the map
    (recent_methods.md §6.2, ``features_distillation``):

    * ``whc``, cos: m = [s_old >= Q_{r_old}] or [s_new <= Q_{r_new}]; mean_L1 (a distance, so
      inequalities *and* levels swap): m = [s_old <= Q_{r_new}] or [s_new >= Q_{r_old}];
      channel mask (any distance): [c_old >= Q_{r_old}] or [c_new <= Q_{r_new}];
    * ``none``: [s_old >= Q_{r_old}] and [s_new <= Q_{r_new}];  ``newnone``: [s_new <= Q_{r_old}];
    * ``gt``: the new-pixel mask, bilinearly resized to the map;
    * ``old``: sigmoid(s_old);  ``new``: 1 - sigmoid(s_new)  (soft masks).
    """
    if mode == "gt":
        new = ((labels >= n_old) & (labels != IGNORE_INDEX)).float()[:, None]
        return F.interpolate(new, size=a.shape[-2:], mode="bilinear", align_corners=False), None
    s_old, s_new, ch_old, ch_new = change_statistics(a, c, d, distance)
    r_old, r_new = region_ratios(labels, n_old)
    if mode == "old":
        spatial = torch.sigmoid(s_old)
    elif mode == "new":
        spatial = 1 - torch.sigmoid(s_new)
    elif mode == "none":
        spatial = (_at_least(s_old, r_old) & _at_most(s_new, r_new)).float()
    elif mode == "newnone":
        spatial = _at_most(s_new, r_old).float()
    elif distance == "cos":
        spatial = (_at_least(s_old, r_old) | _at_most(s_new, r_new)).float()
    else:
        spatial = (_at_most(s_old, r_new) | _at_least(s_new, r_old)).float()
    channel = None
    if mode == "whc" and channels:
        channel = (_at_least(ch_old, r_old) | _at_most(ch_new, r_new)).float()[:, :, None, None]
    return spatial[:, None], channel


# --- MCD --------------------------------------------------------------------------------------


def context_descriptor(x: Tensor, groups: int) -> Tensor:
    """Second-order context of a map (reference ``second_order_pooling``), shape (B, D).

    Channels split into ``groups`` groups of k = C // groups (the last C - groups k dropped);
    5x5 average pooling with stride 2 (zero padding 2, counted); at every location the k x k
    outer product of the group's channel vector.
    """
    b, c = x.shape[:2]
    k = c // groups
    pooled = F.avg_pool2d(x[:, : groups * k], MCD_POOL, stride=2, padding=MCD_POOL // 2)
    g = pooled.view(b, groups, k, *pooled.shape[-2:])
    return torch.einsum("bgihw,bgjhw->bgijhw", g, g).flatten(1)


def context_distance(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """Per-image ||ctx(a) - ctx(b)||_2 (MCD, before the mean over the batch)."""
    return (context_descriptor(a, groups) - context_descriptor(b, groups)).norm(dim=1)


# --- blanked teacher passes -----------------------------------------------------------------


def blank_regions(images: Tensor, labels: Tensor, n_old: int) -> Tensor:
    """[x with old pixels zeroed; x with new pixels zeroed] stacked on the batch axis (2B, 3, H, W)."""
    if images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"LSKD blanks image regions by label, but images are {tuple(images.shape[-2:])} "
                         f"and labels {tuple(labels.shape[-2:])}")
    old = (labels < n_old)[:, None]
    new = ((labels >= n_old) & (labels != IGNORE_INDEX))[:, None]
    zero = images.new_zeros(())
    return torch.cat([torch.where(old, zero, images), torch.where(new, zero, images)])
