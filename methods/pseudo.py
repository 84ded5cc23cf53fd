"""PLOP's entropy-based pseudo-labels of the background (paper §3.2, Eq. 5-7).

The frozen step t-1 model labels the background pixels it is confident about; confidence is a
normalised entropy compared with a per-class threshold, the median entropy of that class over the
training set.  Thresholds come from one pass with the teacher over the training loader (per-class
histograms, summed over ranks); this module holds the tensor functions, the pass itself is
:func:`entropy_thresholds`.  Code analysis: reference/mib_plop.md §4.9.

Two threshold computations (``--pseudo_median``):

``reference`` (default)
    What PLOP's ``find_median`` computes, quirks included, because every published PLOP-family
    number depends on it: 100 bins on [0, 1]; the scan adds the bin *index* to its running sum
    instead of the bin count, reads bin ``int((i / 100) * 100)`` (29, 57 and 58 read the bin
    before), and falls through to the last bin (a huge value, +-inf or NaN) when no bin stops it.
    Since the normalised entropy is tiny (<= 1/(C_old ln N_seen)) nearly everything lands in bin
    0, so the "median" is 0.01 * (N/2) / hist[0]; on ADE that exceeds every entropy and the
    filter is effectively off.  See :func:`reference_median`.
``exact``
    The per-class median of the same normalised entropy, read from a 4096-bin histogram over
    its attainable range [0, 1/(C_old ln N_seen)] with linear interpolation inside the median
    bin: the sample median up to one bin (1/4096 of the range) wherever the pixels around it are
    dense, as the millions of background pixels per class of a training set are.  One pass and
    a fixed memory (N_seen x 4096 counts), summed over ranks like the reference histogram.
    See :func:`histogram_median`.

Both are floored at ``--threshold`` (tau_c = max(median_c, threshold)); classes never predicted
get the floor.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, NamedTuple

import torch
from torch import Tensor, nn

from .base import IGNORE_INDEX

REFERENCE_BINS = 100  # find_median(mode="entropy"): 100 bins on [0, 1]
EXACT_BINS = 4096
ADAPTIVE_EPS = 1e-6  # PLOP commit b70fb8f: images without background gave 0/0 = NaN (PLOP#25)


def normalized_entropy(probs: Tensor, n_seen: int) -> Tensor:
    """h^ = -(1/ln C) * mean_c p_c ln(p_c + 1e-8) / ln N_seen, shape (B, H, W).

    PLOP's ``entropy()`` (a *mean* over the C = C_old teacher channels, divided by ln C) further
    divided by ``max_entropy = ln N_seen`` (mib_plop.md §4.9), so h^ <= 1/(C_old ln N_seen).
    """
    c = probs.shape[1]
    per_pixel = -(probs * torch.log(probs + 1e-8)).mean(dim=1) / math.log(c + 1e-8)
    return per_pixel / math.log(n_seen)


def max_normalized_entropy(n_old: int, n_seen: int) -> float:
    """Upper bound of :func:`normalized_entropy` (uniform teacher): 1/(C_old ln N_seen)."""
    return 1.0 / (n_old * math.log(n_seen))


def entropy_histogram(values: Tensor, classes: Tensor, n_classes: int, bins: int,
                      max_value: float) -> Tensor:
    """(n_classes, bins) counts of ``values`` binned on [0, max_value] per ``classes`` entry.

    Bin = floor(value / max_value * bins) clipped to [0, bins - 1], the reference's
    ``clamp((v * nb_bins).long(), max=nb_bins - 1)``; one bincount over class * bins + bin.
    """
    index = (values / max_value * bins).long().clamp_(0, bins - 1)
    counts = torch.bincount(classes.long() * bins + index, minlength=n_classes * bins)
    return counts.view(n_classes, bins)


def reference_median(hist: Tensor) -> Tensor:
    """PLOP ``find_median``'s per-class "median" of a (K, nb) histogram, quirks reproduced.

    The reference scans i = 0..nb-1 with ``lower = i / nb``, reads bin ``j_i = int(lower * nb)``
    and stops at the first i with ``running <= half <= running + hist[j_i]``, where ``running``
    is the sum of the earlier ``lower * nb`` values (bin indices, not counts).  Without a stop the
    loop ends with i = nb - 1 and ``running`` summed over all i.  Result:
    ``lower + (half - running) / hist[j_i] / nb``; classes with an empty histogram give 0.
    The scan constants are the same for every class, so the search is one vectorised step;
    arithmetic is float32 like the reference's tensors.
    """
    k, nb = hist.shape
    read_bin = [int((i / nb) * nb) for i in range(nb)]
    running = [0.0]
    for i in range(nb):
        running.append(running[-1] + (i / nb) * nb)
    running_before = torch.tensor(running[:nb], dtype=torch.float32, device=hist.device)

    counts = hist[:, read_bin].float()                         # (K, nb): count read at step i
    total = hist.sum(dim=1)
    half = total.float() / 2
    stops = (half[:, None] >= running_before) & (half[:, None] <= running_before + counts)
    found = stops.any(dim=1)
    first = stops.int().argmax(dim=1)                          # first stopping step
    step = torch.where(found, first, torch.full_like(first, nb - 1))
    running_at = torch.where(found, running_before[first],
                             torch.tensor(running[nb], dtype=torch.float32, device=hist.device))
    lower = step.float() / nb
    bin_count = counts.gather(1, step[:, None]).squeeze(1)
    median = lower + (half - running_at) / bin_count * (1 / nb)
    return torch.where(total > 0, median, torch.zeros_like(median))


def histogram_median(hist: Tensor, max_value: float) -> Tensor:
    """True per-class median of a (K, nb) histogram on [0, max_value] (linear interpolation in
    the bin where the cumulative count reaches half); 0 for empty classes."""
    counts = hist.double()
    nb = counts.shape[1]
    total = counts.sum(dim=1)
    half = total / 2
    cumulative = counts.cumsum(dim=1)
    bin_index = (cumulative < half[:, None]).sum(dim=1).clamp(max=nb - 1)
    in_bin = counts.gather(1, bin_index[:, None]).squeeze(1)
    before = cumulative.gather(1, bin_index[:, None]).squeeze(1) - in_bin
    fraction = (half - before) / in_bin.clamp(min=1)
    median = (bin_index.double() + fraction) * (max_value / nb)
    return torch.where(total > 0, median, torch.zeros_like(median)).float()


def floor_thresholds(medians: Tensor, floor: float) -> Tensor:
    """tau_c = max(median_c, floor) with Python ``max``'s semantics, as the reference applies it
    element by element: NaN medians (0/0 fall-through) stay NaN, -inf becomes the floor."""
    floor_t = torch.full_like(medians, floor)
    return torch.where(floor_t > medians, floor_t, medians)


def thresholds_from_histogram(hist: Tensor, floor: float, median: str, max_value: float) -> Tensor:
    """Per-class entropy thresholds from the summed histogram (``median``: reference | exact)."""
    medians = reference_median(hist) if median == "reference" else histogram_median(hist, max_value)
    return floor_thresholds(medians, floor)


@torch.no_grad()
def entropy_thresholds(teacher: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], n_old: int,
                       n_seen: int, floor: float, median: str = "reference",
                       autocast: Callable = contextlib.nullcontext,
                       all_reduce: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
    """One pass of the teacher over ``batches`` (images, masked labels): per-class thresholds (N_seen,).

    Pixels whose masked label is 0 are binned by the teacher's argmax class (reference
    ``find_median(mode="entropy")``); the histograms are summed over ranks with ``all_reduce``
    before the medians, so every rank gets the same thresholds (the reference never reduced them).
    """
    bins, max_value = ((REFERENCE_BINS, 1.0) if median == "reference"
                       else (EXACT_BINS, max_normalized_entropy(n_old, n_seen)))
    hist = None
    for images, labels in batches:
        with autocast():
            logits = teacher(images)["logits"]
        probs = torch.softmax(logits.float(), dim=1)
        background = labels == 0
        counts = entropy_histogram(normalized_entropy(probs, n_seen)[background],
                                   probs.argmax(dim=1)[background], n_seen, bins, max_value)
        hist = counts if hist is None else hist + counts
    if hist is None:
        raise ValueError("the training loader yielded no batch; cannot compute PLOP thresholds")
    all_reduce(hist)
    return thresholds_from_histogram(hist, floor, median, max_value)


class PseudoLabels(NamedTuple):
    labels: Tensor       # (B, H, W) labels with background replaced by pseudo-labels or 255
    confident: Tensor    # (B, H, W) background pixels that received a pseudo-label
    background: Tensor   # (B, H, W) pixels whose masked label is an old class (< n_old)


def pseudo_label(labels: Tensor, teacher_logits: Tensor, thresholds: Tensor, n_old: int,
                 n_seen: int) -> PseudoLabels:
    """Relabel background pixels with the teacher's argmax where its entropy is below the class
    threshold, else 255; new-class pixels keep their label (PLOP Eq. 6, mib_plop.md §4.9)."""
    probs = torch.softmax(teacher_logits.float(), dim=1)
    prediction = probs.argmax(dim=1)
    valid = normalized_entropy(probs, n_seen) < thresholds[prediction]
    background = labels < n_old
    confident = background & valid
    ignore = torch.full_like(labels, IGNORE_INDEX)
    relabelled = torch.where(background, torch.where(valid, prediction, ignore), labels)
    return PseudoLabels(relabelled, confident, background)


def adaptive_factor(confident: Tensor, background: Tensor) -> Tensor:
    """Per-image CE weight nu = #confident / (#background + 1e-6) (``classif_adaptive_factor``,
    PLOP Eq. 7).  An image without background gets 0, not the NaN of the epsilon-free code."""
    num = confident.flatten(1).sum(dim=1).float()
    den = background.flatten(1).sum(dim=1).float()
    return num / (den + ADAPTIVE_EPS)
