"""Pooled-output distillation (POD), the feature-distillation half of PLOP.

Douillard et al., "PLOP: Learning without Forgetting for Continual Semantic Segmentation",
CVPR 2021, Eq. 2-4 ("Local POD"); the code analysed in reference/mib_plop.md §4.9
(``features_distillation`` / ``_local_pod``) and recent_methods.md §1.  LSKD (recent_methods.md
§6.2) reuses these pieces with masks, so every step is a function of its own.

Two deliberate differences from the reference code, neither changing its numbers on the square
crops it was run on:

* the reference cuts every axis with ``k = W // s`` (the *width*), which assumes square maps;
  :func:`local_pod_embedding` uses ``H // s`` for rows and ``W // s`` for columns, so non-square
  maps (full-image evaluation, non-square crops) work;
* when every scale divides the finest one and the map (the usual case: 1/2/4 on maps whose
  sides are multiples of 4), the profiles of all scales come from one reduction per axis on the
  finest grid, summed into coarser cells: two passes over a full-size map instead of six,
  forward and backward, with the same values up to rounding.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.errors import ConfigError

# ``--pod_prepro``: elementwise transform applied to both maps before pooling (reference
# ``prepro``; PLOP uses "pow", i.e. squared activations, paper Eq. 2).
PREPRO: dict[str, Callable[[Tensor], Tensor]] = {
    "pow": lambda x: x.pow(2),
    "abs": torch.abs,
    "relu": F.relu,
    "none": lambda x: x,
}


def local_pod_embedding(x: Tensor, scales: Sequence[int]) -> Tensor:
    """Phi(x) of Local POD (PLOP Eq. 3): width- and height-pooled profiles of an s x s grid.

    For every scale s the map is cut into s x s cells of ``H // s`` rows and ``W // s`` columns
    (trailing rows/columns that do not fill a cell are dropped, as in the reference); each cell
    contributes its mean over columns (a C x rows profile) and its mean over rows (a C x columns
    profile).  Returns (B, D) with D = C * sum_s s^2 (H // s + W // s) -- 14 C W for a square
    map and scales 1, 2, 4.  No normalisation: the reference forces ``normalize=False``.
    """
    b, c, h, w = x.shape
    for s in scales:
        if h // s == 0 or w // s == 0:
            raise ConfigError(
                f"a distilled {h}x{w} feature map is smaller than the POD scale {s}; "
                "use a larger --crop_size or smaller --spp_scales")
    finest = math.lcm(*scales)
    if h % finest == 0 and w % finest == 0:
        return _nested_embedding(x, scales, finest)
    parts = []
    for s in scales:
        rows, cols = h // s, w // s
        cells = x[:, :, : s * rows, : s * cols].reshape(b, c, s, rows, s, cols)
        parts.append(cells.mean(dim=5).flatten(1))  # mean over columns: profile along rows
        parts.append(cells.mean(dim=3).flatten(1))  # mean over rows: profile along columns
    return torch.cat(parts, dim=1)


def _nested_embedding(x: Tensor, scales: Sequence[int], finest: int) -> Tensor:
    """:func:`local_pod_embedding` when every scale's grid is a coarsening of the ``finest`` grid
    and no row or column is dropped: per-row sums over each finest column block and per-column
    sums over each finest row block, then summed g = finest / s blocks at a time for scale s."""
    b, c, h, w = x.shape
    row_sums = x.reshape(b, c, h, finest, w // finest).sum(dim=4)  # (B, C, H, finest)
    col_sums = x.reshape(b, c, finest, h // finest, w).sum(dim=3)  # (B, C, finest, W)
    parts = []
    for s in scales:
        g = finest // s
        rows, cols = h // s, w // s
        along_rows = row_sums.reshape(b, c, h, s, g).sum(dim=4) / cols  # (B, C, s*rows, s)
        along_cols = col_sums.reshape(b, c, s, g, w).sum(dim=3) / rows  # (B, C, s, s*cols)
        parts.append(along_rows.reshape(b, c, s, rows, s).flatten(1))
        parts.append(along_cols.reshape(b, c, s, s, cols).flatten(1))
    return torch.cat(parts, dim=1)


def pod_distance(a: Tensor, b: Tensor, scales: Sequence[int], prepro: str = "pow") -> Tensor:
    """Per-image Local POD distance ||Phi(f(a)) - Phi(f(b))||_2 (PLOP Eq. 4), shape (B,).

    ``a`` is the teacher map, ``b`` the student map (same shape), f the ``--pod_prepro``
    transform; the Frobenius norm runs over the whole embedding of one image.  The two
    embeddings are subtracted, not the maps: the pooled vectors are far smaller.
    """
    f = PREPRO[prepro]
    return (local_pod_embedding(f(a), scales) - local_pod_embedding(f(b), scales)).norm(dim=1)


def collapse_new_logits(student_logits: Tensor, n_old: int) -> Tensor:
    """Student logits with the new-class channels summed into background (reference
    ``extra_channels="sum"``): b~_0 = b_0 + sum_{c >= n_old} b_c, b~_c = b_c for 0 < c < n_old.

    Raw logits are summed, not probabilities, exactly as in PLOP's code (mib_plop.md §4.9).
    """
    background = student_logits[:, :1] + student_logits[:, n_old:].sum(dim=1, keepdim=True)
    return torch.cat([background, student_logits[:, 1:n_old]], dim=1)


NEW_LOGITS = ("sum", "drop")  # --pod_new_logits: the reference's extra_channels "sum", or drop them


def distilled_layers(out: dict, with_logits: bool, n_old: Optional[int] = None,
                     new_logits: str = "sum") -> list[Tensor]:
    """The maps PLOP distils, in the reference order: the four stage pre-activations, the head
    output and (``--pod_logits``) the stride-16 logits.  Pass ``n_old`` for the student so that
    its logits are reduced to the teacher's channels: the new classes' summed into background
    (``new_logits="sum"``, the reference) or dropped (``"drop"``).  Everything is cast to dense
    NCHW fp32 in one copy (a channels-last teacher copy's maps would make every pooling slower).
    """
    layers = [dense_fp32(t) for t in out["stages"]] + [dense_fp32(out["pre_logits"])]
    if with_logits:
        logits = out["logits_small"].float()
        if n_old is not None:
            logits = collapse_new_logits(logits, n_old) if new_logits == "sum" else logits[:, :n_old]
        layers.append(logits)
    return layers


def dense_fp32(t: Tensor) -> Tensor:
    """``t`` as contiguous (NCHW) fp32, cast and re-laid out in a single copy."""
    return t.to(torch.float32, memory_format=torch.contiguous_format)


def pod_schedule(n_seen: int, n_new: int) -> float:
    """sqrt(N_seen / N_new): PLOP's adaptive POD weight (paper §3.3, ``use_pod_schedule``)."""
    return math.sqrt(n_seen / n_new)


def pod_loss(teacher_layers: Sequence[Tensor], student_layers: Sequence[Tensor],
             factors: Sequence[float], scales: Sequence[int], prepro: str = "pow",
             schedule: float = 1.0) -> Tensor:
    """L_POD = (1/L) sum_l lambda_l * schedule * mean_batch d_l (mib_plop.md §4.9 "Total").

    Layers whose factor is <= 0 are skipped but still count in L, as in the reference.
    """
    total = student_layers[0].new_zeros(())
    for a, b, factor in zip(teacher_layers, student_layers, factors, strict=True):
        if factor > 0:
            total = total + factor * schedule * pod_distance(a, b, scales, prepro).mean()
    return total / len(student_layers)
