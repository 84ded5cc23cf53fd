"""The classic family: FT, LwF, LwF-MC, ILT, EWC, RW, PI and MiB (reference §4.1-§4.8, §4.12).

In the reference these are not separate code paths but one Trainer configured by flags, and a
``--method`` only presets flags.  :class:`ClassicMethod` is that Trainer's loss module: it reads
every flag of the family, so ``--method FT --unce --unkd --loss_kd 10 --init_balanced`` is MiB,
any method combines with ``--regularizer``, and PLOP builds on it.  The registered classes below
differ only in their preset (MiB-repo values; PLOP's repo lowers EWC and PI to 100); FT, the
class with no preset, is in ``methods/ft.py``.
"""
from __future__ import annotations

import argparse
from typing import Any, Optional

from torch import Tensor, nn

from . import register
from .base import Method, StepContext, cross_entropy_all_pixels
from .init import init_balanced
from .losses import (
    bce_with_ignore,
    feature_distillation_mse,
    icarl_disjoint_loss,
    icarl_distillation,
    knowledge_distillation,
    unbiased_cross_entropy,
    unbiased_knowledge_distillation,
)
from .regularizers import REGULARIZERS, Regularizer, make_regularizer


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


# Flags that act only through a switch (methods/__init__.py).
FLAG_NEEDS = {
    "alpha": ("loss_kd", ()), "unkd": ("loss_kd", ()),
    "icarl_importance": ("icarl", ()), "icarl_disjoint": ("icarl", ()), "icarl_bkg": ("icarl_disjoint", ()),
    "reg_importance": ("regularizer", ()), "reg_no_normalize": ("regularizer", ()),
    "reg_alpha": ("regularizer", ("ewc", "rw")), "reg_iterations": ("regularizer", ("rw",)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the classic family, with the reference names and defaults (all off)."""
    g = parser.add_argument_group("LwF / ILT / MiB distillation")
    g.add_argument("--loss_kd", type=float, default=0.0, help="weight of the logit distillation (KD, or UNKD with --unkd)")
    g.add_argument("--loss_de", type=float, default=0.0, help="weight of ILT's MSE on the backbone features")
    g.add_argument("--alpha", type=float, default=1.0, help="multiplier of the teacher logits in KD/UNKD")
    g.add_argument("--unce", action="store_true", default=False, help="MiB unbiased cross-entropy at step > 0")
    g.add_argument("--unkd", action="store_true", default=False, help="MiB unbiased distillation instead of KD")
    g.add_argument("--init_balanced", action="store_true", default=False,
                   help="MiB initialisation of the new classifier from the background one")
    g.add_argument("--bce", action="store_true", default=False, help="per-channel BCE instead of cross-entropy")
    g.add_argument("--freeze", action="store_true", default=False,
                   help="leave the backbone out of the optimizer at step > 0 (ILT option)")

    g = parser.add_argument_group("LwF-MC / iCaRL")
    g.add_argument("--icarl", action="store_true", default=False, help="BCE plus iCaRL multi-label distillation")
    g.add_argument("--icarl_importance", type=float, default=1.0, help="weight of the iCaRL distillation")
    g.add_argument("--icarl_disjoint", action="store_true", default=False,
                   help="iCaRL loss with soft old targets instead of BCE + distillation")
    g.add_argument("--icarl_bkg", action="store_true", default=False,
                   help="with --icarl_disjoint, keep the ground-truth background target")

    g = parser.add_argument_group("EWC / RW / PI regularisers")
    g.add_argument("--regularizer", default=None, choices=sorted(REGULARIZERS),
                   help="parameter regulariser; every step of a run must use the same one")
    g.add_argument("--reg_importance", type=float, default=1.0, help="weight of the regulariser's penalty")
    g.add_argument("--reg_alpha", type=_unit_interval, default=0.9, help="EMA factor of the online Fisher (EWC, RW)")
    g.add_argument("--reg_no_normalize", action="store_true", default=False,
                   help="use the raw importances instead of per-tensor min-max normalised ones")
    g.add_argument("--reg_iterations", type=_positive_int, default=10,
                   help="RW: iterations between path-score updates")


class ClassicMethod(Method):
    """The reference Trainer's losses (§4.0): CE/UNCE/BCE + KD/UNKD + DE + iCaRL + regulariser.

    Terms, each under its own name: ``ce`` | ``unce`` (§4.8) | ``bce`` (§4.3) | ``icarl`` (the
    combined distillation, or the disjoint iCaRL loss that replaces the BCE, §4.3); ``kd`` (§4.2)
    or ``unkd`` (§4.8) times ``loss_kd``; ``de`` (§4.4) times ``loss_de``; ``reg`` (§4.5-§4.7).
    Teacher terms exist at step > 0 only; UNCE needs old classes, so step 0 uses CE.
    """

    preset: dict[str, Any] = {}

    def __init__(self, opts, task):
        super().__init__(opts, task)
        self.step = task.step
        self.n_old = task.n_old
        self.kd_weight = float(opts.loss_kd)
        self.de_weight = float(opts.loss_de)
        self.alpha = float(opts.alpha)
        self.unce = bool(opts.unce)
        self.unkd = bool(opts.unkd)
        self.bce = bool(opts.bce or opts.icarl)
        self.icarl = bool(opts.icarl)
        self.icarl_disjoint = bool(opts.icarl and opts.icarl_disjoint)
        self.icarl_weight = float(opts.icarl_importance)
        self.icarl_bkg = bool(opts.icarl_bkg)
        self.regularizer: Optional[Regularizer] = None
        if opts.regularizer is not None:
            self.regularizer = make_regularizer(
                opts.regularizer,
                importance=opts.reg_importance,
                alpha=opts.reg_alpha,
                iterations=opts.reg_iterations,
                normalize=not opts.reg_no_normalize,
            )

    # --- what the Trainer asks ---------------------------------------------------------------
    @property
    def incremental(self) -> bool:
        return self.step > 0

    @property
    def needs_teacher(self) -> bool:
        """Teacher *outputs* feed KD/UNKD, DE and iCaRL; EWC/RW/PI read its parameters only."""
        icarl = self.icarl and (self.icarl_disjoint or self.icarl_weight != 0)
        return self.incremental and (self.kd_weight != 0 or self.de_weight != 0 or icarl)

    @property
    def needs_previous_state(self) -> bool:
        return self.incremental and self.regularizer is not None

    def init_new_classifier(self, model: nn.Module) -> None:
        if self.opts.init_balanced:
            init_balanced(model)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """The base groups, without the backbone when ``--freeze`` at step > 0 (ILT, §4.4)."""
        groups = super().param_groups(model, lr)
        if self.opts.freeze and self.incremental:
            body = {id(p) for p in model.body.parameters()}
            groups = [g for g in groups if not any(id(p) in body for p in g["params"])]
        return groups

    # --- training ----------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        """EWC/RW/PI: snapshot the teacher's parameters (step > 0) and start the statistics."""
        if self.regularizer is None:
            return
        if self.incremental and ctx.previous_model is None:
            raise RuntimeError(f"the {self.regularizer.name} regulariser needs ctx.previous_model at step {self.step}")
        self.regularizer.start(ctx.model, ctx.previous_model if self.incremental else None)

    def loss(self, batch: dict, out: dict, teacher_out: Optional[dict]) -> dict[str, Tensor]:
        logits, labels = out["logits"], batch["label"]
        terms: dict[str, Tensor] = {}
        teacher = self._teacher(teacher_out)
        if self.icarl_disjoint and teacher is not None:
            terms["icarl"] = icarl_disjoint_loss(logits, labels, teacher["logits"], keep_background=self.icarl_bkg)
        else:
            terms.update(self._classification(logits, labels))
        if teacher is not None:
            terms.update(self._distillation(out, teacher))
        if self.regularizer is not None:
            penalty = self.regularizer.penalty()
            if penalty is not None:
                terms["reg"] = penalty
        return terms

    def _teacher(self, teacher_out: Optional[dict]) -> Optional[dict]:
        if not self.needs_teacher:
            return None
        if teacher_out is None:
            raise RuntimeError(f"{type(self).__name__} needs the teacher's outputs at step {self.step}")
        return teacher_out

    def _classification(self, logits: Tensor, labels: Tensor, weight: Optional[Tensor] = None) -> dict[str, Tensor]:
        """The per-pixel classification term on the current labels (§4.0-§4.3, §4.8); ``weight``
        scales each image's pixels (PLOP's adaptive factor)."""
        if self.bce:
            return {"bce": bce_with_ignore(logits, labels, weight)}
        if self.unce and self.n_old > 0:
            return {"unce": unbiased_cross_entropy(logits, labels, self.n_old, weight)}
        return {"ce": cross_entropy_all_pixels(logits, labels, weight)}

    def _distillation(self, out: dict, teacher: dict) -> dict[str, Tensor]:
        """Terms comparing the student with the teacher's outputs (step > 0)."""
        terms = {}
        if self.icarl and not self.icarl_disjoint and self.icarl_weight != 0:
            terms["icarl"] = self.icarl_weight * icarl_distillation(out["logits"], teacher["logits"])
        if self.de_weight != 0:
            terms["de"] = self.de_weight * feature_distillation_mse(out["body"], teacher["body"])
        if self.kd_weight != 0:
            if self.unkd:
                kd = unbiased_knowledge_distillation(out["logits"], teacher["logits"], self.alpha)
            else:
                kd = knowledge_distillation(out["logits"], teacher["logits"], self.alpha)
            terms["unkd" if self.unkd else "kd"] = self.kd_weight * kd
        return terms

    def after_backward(self, model: nn.Module) -> None:
        """EWC/RW/PI statistics from this iteration's gradient (the "reg" term's part removed)."""
        if self.regularizer is not None:
            self.regularizer.update()

    # --- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.regularizer is None or not self.regularizer.started:
            return {}
        return {"regularizer": self.regularizer.state_dict()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """At step > 0 a regulariser needs the statistics the step t-1 one saved (MethodStateError)."""
        if self.incremental and self.regularizer is not None:
            self.regularizer.load_previous((state or {}).get("regularizer"))

    def in_step_state(self) -> dict:
        if self.regularizer is None or not self.regularizer.started:
            return {}
        return {"regularizer": self.regularizer.in_step_state()}

    def load_in_step_state(self, state: dict) -> None:
        if "regularizer" in state:
            self.regularizer.load_in_step_state(state["regularizer"])


# --- registered presets (§4.12; MiB-repo values) ------------------------------------------------


@register("LWF", "LwF")
class LwF(ClassicMethod):
    """Learning without Forgetting (Li & Hoiem, ECCV 2016; §4.2): CE + 100 KD."""

    preset = {"loss_kd": 100.0}


@register("LWF-MC", "LwF-MC", "lwfmc")
class LwFMC(ClassicMethod):
    """LwF-MC, iCaRL without exemplars (Rebuffi et al., CVPR 2017; §4.3): BCE + 10 iCaRL distillation."""

    preset = {"icarl": True, "icarl_importance": 10.0}


@register("ILT")
class ILT(ClassicMethod):
    """Incremental Learning Techniques (Michieli & Zanuttigh, ICCVW 2019; §4.4): CE + 100 KD + 100 DE."""

    preset = {"loss_kd": 100.0, "loss_de": 100.0}


@register("EWC")
class EWCMethod(ClassicMethod):
    """Online EWC (§4.5): CE + 500 penalty (MiB repo; PLOP's repo uses ``--reg_importance 100``)."""

    preset = {"regularizer": "ewc", "reg_importance": 500.0}


@register("RW")
class RWMethod(ClassicMethod):
    """Riemannian Walk (§4.6): CE + 100 penalty (both repos)."""

    preset = {"regularizer": "rw", "reg_importance": 100.0}


@register("PI")
class PIMethod(ClassicMethod):
    """Path Integral / SI (§4.7): CE + 500 penalty (MiB repo; PLOP's repo uses ``--reg_importance 100``)."""

    preset = {"regularizer": "pi", "reg_importance": 500.0}


@register("MiB")
class MiB(ClassicMethod):
    """MiB (Cermelli et al., CVPR 2020; §4.8): UNCE + 10 UNKD + balanced init.

    The authors used ``--loss_kd 100`` for VOC 15-1 (MiB#43); pass it explicitly.
    """

    preset = {"loss_kd": 10.0, "unce": True, "unkd": True, "init_balanced": True}
