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

The terms themselves are in ``sdr_terms.py``; this file holds the flags and their composition.

Not implemented: the sequential (``--no_mask``) variant of L_pm, ``--lfc_L2normalized``,
``--lfc_sep_clust_ison_proto``, ``--lfc_orth_sep``, and the FS variants whose reduction the
report leaves ambiguous (``max_foreachfeature``, ``lasso``, ``entropy``); the optional t-SNE
plots are left out.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from utils.errors import ConfigError

from . import register
from .base import MethodStateError, StepContext
from .classic import ClassicMethod
from .sdr_terms import (NORMALIZATIONS, SHRINKING, class_statistics, classes_present, cluster_separation,
                        downsample_labels, feature_clustering, feature_sparsification, prototype_matching,
                        update_running_means)


# Flags that act only through a switch (methods/__init__.py).
FLAG_NEEDS = {
    "loss_de_prototypes_sumafter": ("loss_de_prototypes", ()),
    **{flag: ("loss_featspars", ()) for flag in ("lfs_normalization", "lfs_shrinkingfn", "lfs_loss_fn_touse")},
}


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
