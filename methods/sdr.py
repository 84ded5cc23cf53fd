"""SDR: latent-space regularisation on top of MiB's unbiased CE and KD.

Michieli & Zanuttigh, "Continual Semantic Segmentation via Repulsion-Attraction of Sparse and
Disentangled Latent Representations", CVPR 2021; the code analysed in recent_methods.md §2.
At step t > 0:

    L = L_unce + λ_kd L_unkd + λ_pm L_pm + λ_fc L_fc + λ_sep L_sep + λ_fs L_fs

where the last four terms act on the body features ``out["body"]`` (last ResNet stage after its
activation, stride 16) with labels nearest-downsampled to their size (§2.1).  Class prototypes
are running means of those features (§2.2), updated every iteration before the losses.

Deviations from the reference code (the default fixes them; ``--sdr_reference_quirks`` restores
them, so numbers of the published code can be reproduced):

* **Per-class feature gather.**  The reference takes ``features[mask.expand(...)].view(C, -1)``,
  which interleaves the batch and channel axes as soon as the batch has more than one image (and
  L_pm's ``.view(-1, C)`` scrambles channels even for one image).  Here the features are
  permuted to (B, h, w, C) and masked, so every row is one pixel's feature vector, as the method
  intends; all per-class sums are single ``index_add_`` calls.
* **Mean over classes in L_fc.**  The reference divides by the number of classes *inside* the
  class loop, so the first of K classes is divided by K^K; here L_fc is the plain mean over
  classes.
* **Which class is left out of the prototype update.**  The reference drops the *first* class
  present (meant to be background; a real class when a batch has no background pixel); here
  background 0 is dropped, under the same condition (overlapped protocol, or any step > 0).
* **DDP.**  The reference keeps a separate running mean per process and saves rank 0's.  Here the
  per-batch class sums and counts are all-reduced every iteration before the update, so every
  rank holds the same prototypes, equal to those of one process seeing the global batch.

Not implemented: the sequential (``--no_mask``) variant of L_pm, ``--lfc_L2normalized``,
``--lfc_sep_clust_ison_proto``, ``--lfc_orth_sep``, and the FS variants whose reduction the
report leaves ambiguous (``max_foreachfeature``, ``lasso``, ``entropy``); the optional t-SNE
plots are left out.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.errors import ConfigError

from . import register
from .base import IGNORE_INDEX, MethodStateError, StepContext
from .classic import ClassicMethod

EPS = 1e-15  # the reference's epsilon of the sparsification ratio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """SDR's flags with the reference names; every weight defaults to 0 (off)."""
    g = parser.add_argument_group("SDR latent-space regularisation (recent_methods.md §2)")
    g.add_argument("--loss_de_prototypes", type=float, default=0.0, help="weight of prototype matching L_pm")
    g.add_argument("--loss_de_prototypes_sumafter", action="store_true", default=False,
                   help="L_pm on per-class feature means instead of per pixel")
    g.add_argument("--loss_fc", type=float, default=0.0, help="weight of feature clustering L_fc")
    g.add_argument("--lfc_nobgr", action="store_true", default=False, help="leave background out of L_fc / L_sep")
    g.add_argument("--lfc_sep_clust", type=float, default=0.0, help="weight of cluster separation L_sep")
    g.add_argument("--loss_featspars", type=float, default=0.0, help="weight of feature sparsification L_fs")
    g.add_argument("--lfs_normalization", default=None, choices=sorted(NORMALIZATIONS),
                   help="L_fs feature normalisation")
    g.add_argument("--lfs_shrinkingfn", default=None, choices=sorted(SHRINKING),
                   help="L_fs shrinking function")
    g.add_argument("--lfs_loss_fn_touse", default=None, choices=["ratio"], help="L_fs loss (shrunk / summed)")
    g.add_argument("--sdr_reference_quirks", action="store_true", default=False,
                   help="reproduce the reference's scrambled feature gather, L_fc normalisation and "
                        "'first class' prototype exclusion (see methods/sdr.py)")


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


@register("SDR")
class SDR(ClassicMethod):
    """MiB's UNCE/UNKD plus SDR's prototype matching, clustering, separation and sparsification.

    Prototypes (N_seen, C) and pixel counts (N_seen,) are updated every iteration whenever one
    of L_pm / L_fc / L_sep is on (at step 0 too, to prepare step 1) and saved in the step
    checkpoint.  The reference trains step 0 as FT + prototype accumulation; with
    ``--method SDR`` step 0 also applies L_fs (its code does when the weight is set).
    """

    selected_by = ('loss_de_prototypes', 'loss_fc', 'lfc_sep_clust', 'loss_featspars')

    preset: dict[str, Any] = {
        "loss_kd": 100.0, "unce": True, "unkd": True,
        "loss_featspars": 1e-3, "lfs_normalization": "max_maskedforclass", "lfs_shrinkingfn": "exponential",
        "lfs_loss_fn_touse": "ratio",
        "loss_de_prototypes": 1e-2, "loss_de_prototypes_sumafter": True,
        "lfc_sep_clust": 1e-3, "loss_fc": 1e-3,
    }

    def __init__(self, opts, task):
        super().__init__(opts, task)
        self.pm_weight = float(opts.loss_de_prototypes)
        self.fc_weight = float(opts.loss_fc)
        self.sep_weight = float(opts.lfc_sep_clust)
        self.fs_weight = float(opts.loss_featspars)
        self.quirks = bool(opts.sdr_reference_quirks)
        if self.fs_weight > 0 and None in (opts.lfs_normalization, opts.lfs_shrinkingfn, opts.lfs_loss_fn_touse):
            raise ConfigError("--loss_featspars needs --lfs_normalization, --lfs_shrinkingfn and "
                              "--lfs_loss_fn_touse (SDR: max_maskedforclass, exponential, ratio)")
        self.tracks_prototypes = self.pm_weight > 0 or self.fc_weight > 0 or self.sep_weight > 0
        # Background is left out of the update in the overlapped protocol and at every step > 0 (§2.2).
        self.drop_background = bool(opts.overlap) or task.step > 0
        self.prototypes: Optional[Tensor] = None
        self.counts: Optional[Tensor] = None
        self._all_reduce: Callable[[Tensor], Tensor] = lambda t: t

    @property
    def needs_teacher(self) -> bool:
        return super().needs_teacher or (self.incremental and self.pm_weight > 0)

    def before_step(self, ctx: StepContext) -> None:
        super().before_step(ctx)
        self._all_reduce = ctx.all_reduce

    # --- loss --------------------------------------------------------------------------------
    def loss(self, batch: dict, out: dict, teacher_out: Optional[dict]) -> dict[str, Tensor]:
        terms = super().loss(batch, out, teacher_out)
        if not (self.tracks_prototypes or self.fs_weight > 0):
            return terms
        features = out["body"].float()
        labels_down = downsample_labels(batch["label"], tuple(features.shape[-2:]))
        if self.tracks_prototypes:
            self._update_prototypes(features.detach(), labels_down)
        if self.incremental and self.pm_weight > 0:
            terms["pm"] = self.pm_weight * prototype_matching(
                features, labels_down, teacher_out["logits"].float(), self.prototypes,
                self.opts.loss_de_prototypes_sumafter, self.quirks)
        if self.incremental and (self.fc_weight > 0 or self.sep_weight > 0):
            terms.update(self._clustering_terms(features, labels_down))
        if self.fs_weight > 0:
            terms["fs"] = self.fs_weight * feature_sparsification(
                features, labels_down, self.opts.lfs_normalization, self.opts.lfs_shrinkingfn)
        return terms

    def _clustering_terms(self, features: Tensor, labels_down: Tensor) -> dict[str, Tensor]:
        classes = classes_present(labels_down, drop_background=self.opts.lfc_nobgr, quirks=self.quirks)
        if classes.numel() == 0:
            return {}
        sums, counts, sq = class_statistics(features, labels_down, classes, self.prototypes, self.quirks)
        terms = {}
        if self.fc_weight > 0:
            terms["fc"] = self.fc_weight * feature_clustering(sums, counts, sq, features.shape[1], self.quirks)
        if self.sep_weight > 0:
            terms["sep"] = self.sep_weight * cluster_separation(sums, counts)
        return terms

    def _update_prototypes(self, features: Tensor, labels_down: Tensor) -> None:
        """Running means over the global batch: this rank's class sums and counts are all-reduced."""
        self._ensure_state(features.shape[1], features.device)
        n = self.prototypes.shape[0]
        classes = torch.arange(n, device=features.device)
        present = classes_present(labels_down, self.drop_background, self.quirks)
        sums, counts, _ = class_statistics(features, labels_down, present, quirks=self.quirks)
        packed = features.new_zeros(n, features.shape[1] + 1)
        packed[present, :-1] = sums
        packed[present, -1] = counts.to(packed.dtype)
        self._all_reduce(packed)
        update_running_means(self.prototypes, self.counts, classes, packed[:, :-1], packed[:, -1].round().long())

    def _ensure_state(self, channels: int, device: torch.device) -> None:
        n = self.task.n_seen
        if self.prototypes is None:
            self.prototypes = torch.zeros(n, channels, device=device)
            self.counts = torch.zeros(n, dtype=torch.long, device=device)
        elif self.prototypes.device != device:
            self.prototypes, self.counts = self.prototypes.to(device), self.counts.to(device)
        if self.prototypes.shape[1] != channels:
            raise MethodStateError(
                f"SDR prototypes of the previous step have {self.prototypes.shape[1]} channels but the "
                f"body outputs {channels}; use the same --backbone/--width as the previous step")

    # --- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.prototypes is not None:
            state.update(prototypes=self.prototypes.cpu(), count_features=self.counts.cpu())
        return state

    def in_step_state(self) -> dict:
        state = super().in_step_state()
        if self.prototypes is not None:
            state.update(prototypes=self.prototypes.cpu().clone(), counts=self.counts.cpu().clone())
        return state

    def load_in_step_state(self, state: dict) -> None:
        super().load_in_step_state(state)
        if "prototypes" in state:
            self.prototypes, self.counts = state["prototypes"].clone(), state["counts"].clone()

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Take the step t-1 prototypes and counts; rows of the new classes start at zero."""
        super().load_state_dict(state)
        if not self.incremental or not self.tracks_prototypes:
            return
        if not state or "prototypes" not in state:
            raise MethodStateError(
                f"SDR at step {self.task.step} needs the prototypes saved by step {self.task.step - 1}, which "
                "its checkpoint lacks; train the previous step with --method SDR (or --loss_de_prototypes > 0)")
        old, old_counts = state["prototypes"].float(), state["count_features"].long()
        self.prototypes = torch.zeros(self.task.n_seen, old.shape[1])
        self.counts = torch.zeros(self.task.n_seen, dtype=torch.long)
        self.prototypes[: old.shape[0]] = old
        self.counts[: old.shape[0]] = old_counts
