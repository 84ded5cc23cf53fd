"""PLOP (Douillard et al., "PLOP: Learning without Forgetting for Continual Semantic
Segmentation", CVPR 2021): Local POD + entropy pseudo-labels, on top of the classic family.

reference/mib_plop.md §4.9 (formulas and code analysis), §4.12 (preset) and recent_methods.md §1.
:class:`PLOP` extends :class:`~methods.classic.ClassicMethod` and reads every flag of both
families, so ``--unkd --loss_kd 10`` or ``--init_balanced`` combine with POD and pseudo-labels,
and REMINDER / LSKD extend it in turn.  At step > 0 the loss is

    mean_pixels(nu * CE(x, y~)) + L_POD (+ the classic terms the flags ask for),

with y~ the pseudo-labels (:mod:`methods.pseudo`), nu the per-image adaptive factor and L_POD
the Local POD of :mod:`methods.pod`.  Step 0 is the classic family's step 0 (plain CE).
One deviation, off by default, serves ablations: ``--pod_new_logits drop`` leaves the student's
new-class logits out of the logits' POD instead of summing them into its background channel.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor

from dataset.transforms import device_batch
from utils.errors import ConfigError

from . import register
from .base import StepContext
from .classic import ClassicMethod
from .pod import NEW_LOGITS, PREPRO, distilled_layers, pod_loss, pod_schedule
from .pseudo import adaptive_factor, entropy_thresholds, pseudo_label

# The head output and the stride-16 logits are the last two of the six distilled layers.
N_FEATURE_LAYERS = 5  # 4 backbone stages + the head output


def _pod_options(text: str) -> Optional[float]:
    """``--pod_options`` (reference JSON): the logits-layer factor of ``switch.after``.

    Only what PLOP's scripts use is accepted: ``{"switch": {"after": {"extra_channels": "sum",
    "factor": F, "type": "local"}}}``; anything else would silently change nothing here.
    """
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg})") from None
    after = options.get("switch", {}).get("after", {}) if isinstance(options, dict) else None
    if (not isinstance(after, dict) or set(options) - {"switch"} or set(options["switch"]) - {"after"}
            or set(after) - {"extra_channels", "factor", "type"}
            or after.get("extra_channels", "sum") != "sum" or after.get("type", "local") != "local"):
        raise argparse.ArgumentTypeError(
            'only {"switch": {"after": {"extra_channels": "sum", "factor": F, "type": "local"}}} is '
            "supported; use --pod_logits_factor F")
    factor = after.get("factor")
    return None if factor is None else float(factor)


def _scale(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"POD scales are integers >= 1, got {text}")
    return value


# Flags that act only through a switch (methods/__init__.py).
FLAG_NEEDS = {
    **{flag: ("pod", ()) for flag in ("pod_factor", "pod_logits", "pod_prepro", "spp_scales", "no_pod_schedule")},
    "pod_logits_factor": ("pod_logits", ()), "pod_new_logits": ("pod_logits", ()),
    **{flag: ("pseudo", ()) for flag in ("threshold", "classif_adaptive_factor", "pseudo_median")},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """PLOP's flags, reference names and defaults (all off)."""
    g = parser.add_argument_group("PLOP: pooled-output distillation and pseudo-labels")
    g.add_argument("--pod", choices=["local"], default=None, help="pooled-output distillation (PLOP: local)")
    g.add_argument("--pod_factor", type=float, default=0.0, help="POD weight of the backbone stages and the head")
    g.add_argument("--pod_logits", action="store_true", default=False,
                   help="also distil the stride-16 logits (new classes summed into background)")
    g.add_argument("--pod_logits_factor", type=float, default=None,
                   help="POD weight of the logits layer (default: --pod_factor)")
    g.add_argument("--pod_options", dest="pod_logits_factor", type=_pod_options, metavar="JSON",
                   help="reference spelling of --pod_logits_factor: "
                        '\'{"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}\'')
    g.add_argument("--pod_new_logits", choices=NEW_LOGITS, default="sum",
                   help="logits POD: the student's new-class logits are summed into its background channel "
                        "(sum: the reference's extra_channels) or left out (drop: a deviation, for ablation)")
    g.add_argument("--pod_prepro", choices=sorted(PREPRO), default="pow",
                   help="elementwise transform before pooling (PLOP: pow, squared activations)")
    g.add_argument("--spp_scales", type=_scale, nargs="+", default=[1, 2, 4], help="Local POD grid sizes")
    g.add_argument("--no_pod_schedule", action="store_true", default=False,
                   help="drop the sqrt(seen classes / new classes) factor of the POD loss")
    g.add_argument("--pseudo", choices=["entropy"], default=None, help="pseudo-label the background (PLOP: entropy)")
    g.add_argument("--threshold", type=float, default=0.001, help="floor of the per-class entropy thresholds")
    g.add_argument("--classif_adaptive_factor", action="store_true", default=False,
                   help="weight each image's CE by its share of confidently pseudo-labelled background")
    g.add_argument("--pseudo_median", choices=["reference", "exact"], default="reference",
                   help="per-class thresholds: PLOP's find_median with its quirks (reference) or the true median")


def image_label_batches(loader: Iterable, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) of every batch on ``device``; batches are dicts or (images, labels) pairs."""
    for batch in loader:
        images, labels = (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])
        yield device_batch(images, labels, device)


@register("PLOP")
class PLOP(ClassicMethod):
    """PLOP and every flag combination of its family (``--method FT --pod local ...`` scripts).

    Extension points for subclasses: :meth:`targets` (pseudo-labels and CE weights),
    :meth:`pod_term` and :meth:`_extra_terms` (more terms on the pseudo-labelled batch).
    """

    # Flags that make a parent method's command line (e.g. --method FT --pod local) run this class.
    selected_by = ('pod', 'pseudo')

    preset: dict[str, Any] = {
        "pod": "local", "pod_factor": 0.01, "pod_logits": True, "pod_logits_factor": 0.0005,
        "pseudo": "entropy", "threshold": 0.001, "classif_adaptive_factor": True, "init_balanced": True,
    }
    # PLOP's ADE scripts (--method FT with explicit flags): --pod_factor 0.001, logits 0.00001.
    preset_by_dataset: dict[str, dict[str, Any]] = {"ade": {"pod_factor": 0.001, "pod_logits_factor": 0.00001}}

    def __init__(self, opts, task):
        super().__init__(opts, task)
        if self.icarl:
            raise ConfigError("--icarl (LwF-MC) does not combine with PLOP's pseudo-labelled CE; "
                              "drop --icarl or use --method LwF-MC without --pod/--pseudo")
        self.n_seen = task.n_seen
        self.pod = opts.pod
        self.pod_logits = bool(opts.pod_logits)
        logits_factor = opts.pod_factor if opts.pod_logits_factor is None else opts.pod_logits_factor
        self.pod_factors = [float(opts.pod_factor)] * N_FEATURE_LAYERS
        if self.pod_logits:
            self.pod_factors.append(float(logits_factor))
        self.spp_scales = tuple(opts.spp_scales)
        self.pod_prepro = opts.pod_prepro
        self.pod_new_logits = opts.pod_new_logits
        self.schedule = 1.0 if opts.no_pod_schedule or not self.incremental else pod_schedule(task.n_seen, task.n_new)
        self.pseudo = opts.pseudo
        self.threshold_floor = float(opts.threshold)
        self.pseudo_median = opts.pseudo_median
        self.adaptive = bool(opts.classif_adaptive_factor)
        self.thresholds: Optional[Tensor] = None

    @property
    def needs_teacher(self) -> bool:
        return self.incremental and (super().needs_teacher or self.pod is not None or self.pseudo is not None)

    # --- training ----------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        """Classic set-up, then the per-class entropy thresholds: one pass of the teacher over
        the training set, histograms summed over ranks (mib_plop.md §4.9)."""
        super().before_step(ctx)
        if not (self.incremental and self.pseudo is not None):
            return
        if ctx.teacher is None:
            raise RuntimeError(f"PLOP pseudo-labels need ctx.teacher at step {self.step}")
        self.thresholds = entropy_thresholds(
            ctx.teacher, image_label_batches(ctx.train_loader, ctx.device), self.n_old, self.n_seen,
            self.threshold_floor, self.pseudo_median, ctx.autocast, ctx.all_reduce)
        ctx.log(f"PLOP entropy thresholds ({self.pseudo_median}): "
                + " ".join(f"{t:.4g}" for t in self.thresholds[: self.n_old].tolist()))

    def loss(self, batch: dict, out: dict, teacher_out: Optional[dict]) -> dict[str, Tensor]:
        teacher = self._teacher(teacher_out)
        if teacher is None:
            return super().loss(batch, out, teacher_out)
        labels, weight = self.targets(batch["label"], teacher)
        terms = self._classification(out["logits"], labels, weight)
        terms.update(self._distillation(out, teacher))
        if self.pod is not None:
            terms["pod"] = self.pod_term(out, teacher)
        terms.update(self._extra_terms(batch, out, teacher, labels))
        if self.regularizer is not None:
            penalty = self.regularizer.penalty()
            if penalty is not None:
                terms["reg"] = penalty
        return terms

    def targets(self, labels: Tensor, teacher: dict) -> tuple[Tensor, Optional[Tensor]]:
        """Pseudo-labelled targets and the per-image CE weight nu (None without the factor)."""
        if self.pseudo is None:
            return labels, None
        if self.thresholds is None:
            raise RuntimeError("PLOP pseudo-labels need the thresholds of before_step")
        result = pseudo_label(labels, teacher["logits"], self.thresholds.to(labels.device), self.n_old, self.n_seen)
        weight = adaptive_factor(result.confident, result.background) if self.adaptive else None
        return result.labels, weight

    def pod_term(self, out: dict, teacher: dict) -> Tensor:
        """Local POD over the six layers (mib_plop.md §4.9): L_POD = (1/L) sum_l lambda_l s d_l."""
        return pod_loss(distilled_layers(teacher, self.pod_logits),
                        distilled_layers(out, self.pod_logits, self.n_old, self.pod_new_logits),
                        self.pod_factors, self.spp_scales, self.pod_prepro, self.schedule)

    def _extra_terms(self, batch: dict, out: dict, teacher: dict, labels: Tensor) -> dict[str, Tensor]:
        """More terms on the pseudo-labelled ``labels`` (REMINDER's CSW-KD); none in PLOP."""
        return {}
