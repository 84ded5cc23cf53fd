"""LSKD (Wu & Wang, "Layer-Specific Knowledge Distillation for Class Incremental Semantic
Segmentation", IEEE TIP 2024): PLOP + MiB's unbiased KD + mask-guided distillation with learned
per-term weights.

recent_methods.md §6 (what wwwwyw/LSKD computes).  At step > 0, after PLOP's pseudo-labelling:

1. **Teacher passes on blanked images.**  The teacher also sees x with the old region
   (labels < C_old) and x with the new region (C_old <= labels < 255) set to 0 (the mean colour
   of normalised images), as ONE batched forward; the plain pass is the Trainer's teacher output.
2. **MD, mask-guided POD** (:func:`region_masks`): for the layers mod4, mod5, head and logits,
   teacher and student maps are multiplied by a spatial mask (and, but on the logits, a channel
   mask) derived from how the teacher's features change under the two blankings, then Local POD.
3. **MCD, mask-guided context distillation** (:func:`context_descriptor`) on the masked head
   output: within-group second-order statistics after 5x5 average pooling.
4. **Learned layer weights**: the loss is sum_i w_i L_i over the nine terms
   L = [CE * nu * ce_factor, MCD, loss_kd * UNKD, pod_mod2 .. pod_logits] (POD terms without
   PLOP's sqrt schedule and 1/L, as in the code).  w is a parameter of this method (its own
   optimizer group, saved in the method state, carried to the next step); its gradient is
   replaced by that of a GradNorm-like objective (:func:`gradnorm_weight_grad`) and after every
   epoch w <- 9 w / sum(w).

The masks and MCD live in ``lskd_masks.py``, the weights' objective in ``layer_weights.py``; this
file composes them into the loss.  Step 0 trains exactly as PLOP's step 0.  Deviations from the reference, each a fix:

* the plain teacher pass is not repeated (the reference ran the teacher on x twice);
* the GradNorm gradient of w is averaged over ranks (the reference replaced the all-reduced
  gradient by each rank's own, so ranks' weights drifted apart);
* a loss ratio L_i / L_i(0) with L_i(0) = 0 counts as 1 (the reference divides by zero);
* ``--nonnegative_loss_weights`` (off by default) projects w onto w >= 0 before each use and before
  the renormalisation: the reference's objective can drive a weight below 0 (its G_i is a signed
  mean), and the student then maximises that distance until the loss is -inf;
* ``--no_masks`` (off by default) drops the masks of MD, for ablation;
* ``--loss_weights_lr`` (off by default) gives w its own learning rate; the reference trains it
  at the step's lr, which the synthetic benchmark's schedule sets 10x VOC's (0 keeps w fixed);
* ``--mask_distance L1_mean`` (channel statistic undefined, a NameError in the reference) and
  ``L2`` (its "statistics" are vectors, so every mask mode crashes) are rejected.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from utils.errors import ConfigError

from . import AnythingBut, register
from .base import MethodStateError, StepContext
from .layer_weights import TERMS, gradnorm_weight_grad, mean_gradients, shared_parameters
from .lskd_masks import DISTANCES, MASK_MODES, blank_regions, context_distance, region_masks
from .plop import PLOP
from .pod import distilled_layers, pod_distance

MASKED_FROM_LAYER = 2      # MD masks mod4, mod5, head and logits (layer index >= 2)
MCD_LAYER = 4              # the head output


def _mask_distance(text: str) -> str:
    if text == "L1_mean":
        raise argparse.ArgumentTypeError(
            "L1_mean has no channel statistic in the reference (it crashes there); use cos or mean_L1")
    if text == "L2":
        raise argparse.ArgumentTypeError(
            "L2 gives per-pixel vectors, not the scalars the masks rank (the reference crashes); use cos or mean_L1")
    if text not in DISTANCES:
        raise argparse.ArgumentTypeError(f"unknown distance '{text}'; choose one of {', '.join(DISTANCES)}")
    return text


# Flags that act only through a switch (methods/__init__.py).
# The GradNorm-like objective's flags act only while w is learned (--loss_weights_lr 0 fixes it).
FLAG_NEEDS = {"mcd_groups": ("mcd_factor", ()),
              **{f"adaptive_{k}": ("loss_weights_lr", AnythingBut(0.0)) for k in ("alpha", "beta", "gamma")}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """LSKD's flags; the seed spellings (--dis, --sigmoid, --aaaaaa, --mmm, --adaptive*, --ppp) are aliases."""
    g = parser.add_argument_group("LSKD: mask-guided and layer-weighted distillation")
    g.add_argument("--mask_distance", "--dis", dest="mask_distance", type=_mask_distance, default=None,
                   metavar="{cos,mean_L1}", help="how teacher features on blanked images are compared")
    g.add_argument("--mask_mode", "--sigmoid", dest="mask_mode", choices=MASK_MODES, default=None,
                   help="MD masks: whc (spatial and channel quantile masks), none, newnone, gt, old, new")
    g.add_argument("--mcd_factor", "--aaaaaa", dest="mcd_factor", type=float, default=0.0,
                   help="weight of the mask-guided context distillation (LSKD: 0.005)")
    g.add_argument("--mcd_groups", "--mmm", dest="mcd_groups", type=int, default=20,
                   help="channel groups of the context descriptor")
    g.add_argument("--adaptive_alpha", "--adaptivealpha", dest="adaptive_alpha", type=float, default=0.0,
                   help="GradNorm restoring-force exponent (LSKD: 10)")
    g.add_argument("--adaptive_beta", "--adaptivebeta", dest="adaptive_beta", type=float, default=0.0,
                   help="weight of the deeper-layer-weights-larger penalty (LSKD: 1e-4)")
    g.add_argument("--adaptive_gamma", "--adaptivegamma", dest="adaptive_gamma", type=float, default=0.0,
                   help="weight of the tie between the CE and KD weights (LSKD: 5e-4)")
    g.add_argument("--ce_factor", "--ppp", dest="ce_factor", type=float, default=1.0,
                   help="factor of the CE term in LSKD's task vector")
    g.add_argument("--nonnegative_loss_weights", action="store_true",
                   help="deviation: project the learned term weights onto w >= 0 after every update (the "
                        "reference does not; a negative weight makes the student maximise that distance)")
    g.add_argument("--no_masks", action="store_true",
                   help="deviation, for ablation: no MD masks (plain Local POD on every layer, MCD on the unmasked "
                        "head output) and no teacher passes on blanked images")
    g.add_argument("--loss_weights_lr", type=float, default=None, metavar="LR",
                   help="deviation: learning rate of the learned term weights (default: the step's --lr, as in the "
                        "reference, whose weights sat in the head's optimizer group; 0 keeps them fixed)")


@register("LSKD")
class LSKD(PLOP):
    """PLOP + 10 UNKD + MD + MCD with learned term weights (README of wwwwyw/LSKD, VOC 10-1).

    The repository publishes VOC flags only; on ADE the preset keeps PLOP's ADE POD factors.
    """

    selected_by = ('mask_mode', 'mask_distance', 'mcd_factor')

    preset: dict[str, Any] = {
        **PLOP.preset, "unkd": True, "loss_kd": 10.0, "mask_distance": "cos", "mask_mode": "whc",
        "mcd_factor": 0.005, "mcd_groups": 20, "adaptive_alpha": 10.0, "adaptive_beta": 1e-4,
        "adaptive_gamma": 5e-4,
    }
    preset_by_dataset: dict[str, dict[str, Any]] = {"ade": dict(PLOP.preset_by_dataset["ade"])}

    def __init__(self, opts, task):
        super().__init__(opts, task)
        self.distance = opts.mask_distance
        self.mask_mode = opts.mask_mode
        self.mcd_factor = float(opts.mcd_factor)
        self.mcd_groups = int(opts.mcd_groups)
        self.alpha_gn = float(opts.adaptive_alpha)
        self.beta_gn = float(opts.adaptive_beta)
        self.gamma_gn = float(opts.adaptive_gamma)
        self.ce_factor = float(opts.ce_factor)
        self.nonnegative = bool(getattr(opts, "nonnegative_loss_weights", False))
        self.masked = not getattr(opts, "no_masks", False)
        self.weights_lr = getattr(opts, "loss_weights_lr", None)
        if self.weights_lr is not None and not self.weights_lr >= 0:
            raise ConfigError(f"--loss_weights_lr must be >= 0 (0 keeps the weights fixed), got {self.weights_lr}")
        self.new_over_old = task.n_new / task.n_old if task.n_old else 0.0
        if self.incremental and (self.pod is None or not self.pod_logits):
            raise ConfigError("LSKD distils six layers: pass --pod local --pod_logits (or use the LSKD preset)")
        if self.incremental and self.masked and (self.mask_mode is None
                                                 or (self.mask_mode != "gt" and self.distance is None)):
            raise ConfigError("LSKD needs its masks: pass --mask_mode (--sigmoid) and --mask_distance (--dis), "
                              "e.g. --dis cos --sigmoid whc (or use the LSKD preset)")
        if self.mcd_groups < 1:
            raise ConfigError(f"--mcd_groups must be >= 1, got {self.mcd_groups}")
        self.loss_weights = nn.Parameter(torch.ones(len(TERMS)))
        self.initial_losses: Optional[Tensor] = None
        self.initial_frozen = False
        self._weight_grad: Optional[Tensor] = None
        self._shared: Optional[list[Tensor]] = None
        self._teacher_model: Optional[nn.Module] = None
        self._autocast: Callable = contextlib.nullcontext
        self._all_reduce: Callable[[Tensor], Tensor] = lambda t: t

    @property
    def needs_teacher(self) -> bool:
        return self.incremental

    # --- optimisation of w ------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """The model's groups plus w (step > 0), with lr and weight decay like the reference's
        head group, which held w (``--loss_weights_lr`` sets w's own lr)."""
        groups = super().param_groups(model, lr)
        if self.incremental:
            self.loss_weights.data = self.loss_weights.data.to(next(model.parameters()).device)
            weights_lr = lr if self.weights_lr is None else self.weights_lr
            groups.append({"params": [self.loss_weights], "lr": weights_lr, "weight_decay": self.opts.weight_decay})
        return groups

    def before_step(self, ctx: StepContext) -> None:
        super().before_step(ctx)
        if not self.incremental:
            return
        if ctx.teacher is None:
            raise RuntimeError(f"LSKD needs ctx.teacher at step {self.step}")
        self._teacher_model, self._autocast, self._all_reduce = ctx.teacher, ctx.autocast, ctx.all_reduce
        self._shared = shared_parameters(ctx.model)

    def after_backward(self, model: nn.Module) -> None:
        """Replace w's gradient by the weight objective's, averaged over ranks."""
        super().after_backward(model)
        if self._weight_grad is None:
            return
        packed = torch.cat([self._weight_grad, self._weight_grad.new_ones(1)])
        self._all_reduce(packed)
        self.loss_weights.grad = (packed[:-1] / packed[-1]).to(self.loss_weights.dtype)
        self._weight_grad = None

    def after_epoch(self, ctx: StepContext, epoch: int) -> None:
        """Fix L(0) after the first epoch; renormalise w <- n w / sum(w) (reference run.py)."""
        super().after_epoch(ctx, epoch)
        if not self.incremental:
            return
        self.initial_frozen = self.initial_losses is not None
        self._project_weights()
        with torch.no_grad():
            total = self.loss_weights.sum()
            if self.nonnegative and total == 0:  # every term switched off: start again from ones
                self.loss_weights.fill_(1.0)
            else:
                self.loss_weights.mul_(len(TERMS) / total)
        ctx.log(f"step {self.step} epoch {epoch + 1}: LSKD term weights "
                + ", ".join(f"{name} {w:.3f}" for name, w in zip(TERMS, self.loss_weights.tolist())))

    def _project_weights(self) -> None:
        """w <- max(w, 0) under ``--nonnegative_loss_weights`` (the optimizer has just updated it)."""
        if self.nonnegative:
            with torch.no_grad():
                self.loss_weights.clamp_(min=0)

    # --- the loss ---------------------------------------------------------------------------
    def loss(self, batch: dict, out: dict, teacher_out: Optional[dict]) -> dict[str, Tensor]:
        if not self.incremental:
            return super().loss(batch, out, teacher_out)
        teacher = self._teacher(teacher_out)
        if self._teacher_model is None:
            raise RuntimeError("LSKD needs before_step(ctx) before its first loss")
        labels, weight = self.targets(batch["label"], teacher)
        classification = self._classification(out["logits"], labels, weight)
        extra = self._distillation(out, teacher)
        self._project_weights()
        kd = extra.pop("unkd", None)
        kd = extra.pop("kd", kd)
        pod_terms, mcd = self.masked_distillation(batch["image"], labels, out, teacher)
        task = [self.ce_factor * sum(classification.values()), mcd,
                kd if kd is not None else out["logits"].new_zeros(()), *pod_terms]
        losses = torch.stack([t.float() for t in task])
        if self.weights_lr != 0:  # fixed weights (--loss_weights_lr 0) need no objective gradient
            self._update_weight_grad(task, losses.detach())
        terms = {name: w * value for name, w, value in zip(TERMS, self.loss_weights, task)}
        terms.update(extra)
        if self.regularizer is not None:
            penalty = self.regularizer.penalty()
            if penalty is not None:
                terms["reg"] = penalty
        return terms

    def masked_distillation(self, images: Tensor, labels: Tensor, out: dict,
                            teacher: dict) -> tuple[list[Tensor], Tensor]:
        """MD terms lambda_l * mean_b d_l for the six layers, and the MCD term (module docstring)."""
        a_layers = distilled_layers(teacher, True)
        b_layers = distilled_layers(out, True, self.n_old, self.pod_new_logits)
        c_layers = d_layers = [None] * len(a_layers)
        if self.masked and self.mask_mode != "gt":
            with torch.no_grad(), self._autocast():
                blanked = self._teacher_model(blank_regions(images, labels, self.n_old))
            both = distilled_layers(blanked, True)
            c_layers = [t[: len(images)] for t in both]
            d_layers = [t[len(images):] for t in both]
        pod_terms, mcd = [], out["logits"].new_zeros(())
        last = len(a_layers) - 1
        for layer, (a, b, c, d, factor) in enumerate(zip(a_layers, b_layers, c_layers, d_layers, self.pod_factors)):
            if self.masked and layer >= MASKED_FROM_LAYER:
                spatial, channel = region_masks(a, c, d, labels, self.n_old, self.distance, self.mask_mode,
                                                channels=layer < last)
                mask = spatial if channel is None else spatial * channel
                a, b = a * mask, b * mask
            if layer == MCD_LAYER and self.mcd_factor > 0:
                mcd = self.mcd_factor * context_distance(a, b, self.mcd_groups).mean()
            pod_terms.append(factor * pod_distance(a, b, self.spp_scales, self.pod_prepro).mean())
        return pod_terms, mcd

    def _update_weight_grad(self, task: Sequence[Tensor], losses: Tensor) -> None:
        """L(0) bookkeeping and the gradient w gets in :meth:`after_backward`."""
        if self._shared is None:
            raise RuntimeError("LSKD needs before_step(ctx) before its first loss")
        if not self.initial_frozen or self.initial_losses is None:
            self.initial_losses = losses  # epoch 0: ratios are 1 (the reference's L(0) update)
        grad_means = mean_gradients(task, self._shared).to(losses.device)
        self._weight_grad = gradnorm_weight_grad(
            self.loss_weights, grad_means, losses, self.initial_losses, self.alpha_gn, self.beta_gn,
            self.gamma_gn, self.new_over_old)

    # --- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "loss_weights": self.loss_weights.detach().cpu().clone()}

    def in_step_state(self) -> dict:
        state = {**super().in_step_state(), "loss_weights": self.loss_weights.detach().cpu().clone(),
                 "initial_frozen": self.initial_frozen}
        if self.initial_losses is not None:
            state["initial_losses"] = self.initial_losses.cpu().clone()
        return state

    def load_in_step_state(self, state: dict) -> None:
        """w in place: the optimizer holds the parameter itself."""
        super().load_in_step_state(state)
        with torch.no_grad():
            self.loss_weights.copy_(state["loss_weights"])
        self.initial_frozen = state["initial_frozen"]
        if "initial_losses" in state:
            self.initial_losses = state["initial_losses"].to(self.loss_weights.device)

    def load_state_dict(self, state: Optional[dict]) -> None:
        """w from the previous step; a PLOP step-0 checkpoint has none, so w starts at ones
        (the reference loaded it non-strictly for the same reason)."""
        super().load_state_dict(state)
        weights = (state or {}).get("loss_weights")
        if weights is not None:
            if weights.shape != self.loss_weights.shape:
                raise MethodStateError(f"the step {self.step - 1} checkpoint holds {weights.numel()} LSKD loss "
                                       f"weights, {len(TERMS)} are expected; use a checkpoint trained with this code")
            with torch.no_grad():
                self.loss_weights.copy_(weights.to(self.loss_weights.device))
