"""DKD and DKD-M: decomposed knowledge distillation with sigmoid classifiers
(Baek et al., NeurIPS 2022; recent_methods.md §5).

DKD changes the network (``--head dkd``, see ``modules/dkd_head.py``): every class is an
independent sigmoid, there is no background channel, channel 0 is an auxiliary classifier on
detached features, and the classifier also returns the bias-free positive / negative parts of
its logits.  The losses (§5.2) are binary cross-entropies, each a pixel mean per class and then
a *sum* over classes; 255 pixels are not ignored (they are negatives for every class), as in the
reference.  DKD-M (``--method DKD-M`` or ``--mem_size N``) adds a class-balanced exemplar memory,
built by ``dataset/memory.py`` (§5.4).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.norm import is_norm_layer

from . import register
from .base import Method


# Flags that act only through a switch (methods/__init__.py).
FLAG_NEEDS = {"pos_weight": ("mbce", ())}


def add_arguments(parser) -> None:
    g = parser.add_argument_group("DKD (recent_methods.md §5)")
    g.add_argument("--pos_weight", type=float, default=None,
                   help="positive weight of the mBCE on new classes (DKD default: VOC 2 at step 0 and 1 after, ADE 35)")
    g.add_argument("--mbce", type=float, default=0.0, help="weight of the multi-label BCE on new classes")
    g.add_argument("--kd", type=float, default=0.0, help="weight of DKD's sigmoid KD on old classes")
    g.add_argument("--dkd_pos", type=float, default=0.0, help="weight of the positive-logit distillation")
    g.add_argument("--dkd_neg", type=float, default=0.0, help="weight of the negative-logit distillation")
    g.add_argument("--ac", type=float, default=0.0, help="weight of the auxiliary-classifier BCE")
    g.add_argument("--freeze_bn", action="store_true",
                   help="steps > 0: normalisation and dropout layers in eval mode, norm parameters frozen")
    g.add_argument("--mem_size", type=int, default=0, help="exemplar memory size (DKD-M: VOC 100, ADE 300)")


def bce_class_sum(logits: Tensor, targets: Tensor, pos_weight: Optional[float] = None) -> Tensor:
    """Σ_c mean_pixels BCE(z_c, t_c) over (B, C, H, W): DKD's reduction for every term (§5.2)."""
    weight = None if pos_weight is None else torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    per_element = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight, reduction="none")
    return per_element.mean(dim=(0, 2, 3)).sum()


def multilabel_bce(logits: Tensor, labels: Tensor, classes: list[int], pos_weight: float) -> Tensor:
    """L_mbce (§5.2): channel j of ``logits`` is class ``classes[j]``, target 1[y = class].

    Background, masked old classes and 255 pixels are all negatives (255 is not ignored).
    """
    ids = torch.as_tensor(classes, device=labels.device).view(1, -1, 1, 1)
    targets = (labels.unsqueeze(1) == ids).to(logits.dtype)
    return bce_class_sum(logits, targets, pos_weight)


def sigmoid_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """BCE(z_c, σ(z^T_c)) summed over classes (§5.2 L_kd, and L_dkd on z+ / z-)."""
    return bce_class_sum(student, torch.sigmoid(teacher))


def sigmoid_predict(logits: Tensor) -> Tensor:
    """DKD inference (§5.1): argmax over classes 1..C; background 0 where no σ(z_c) exceeds 0.5."""
    scores = torch.sigmoid(logits[:, 1:].float())
    best, pred = scores.max(dim=1)
    return torch.where(best > 0.5, pred + 1, torch.zeros_like(pred))


# Reference pos_weight (§5.2, configs and scripts): dataset -> (step 0, steps > 0).
POS_WEIGHT = {"voc": (2.0, 1.0), "shapes": (2.0, 1.0), "ade": (35.0, 35.0)}


def _force_eval(module: nn.Module, _inputs) -> None:
    module.train(False)


@register("DKD")
class DKD(Method):
    """Sigmoid head; mBCE on new classes, BCE-KD and decomposed KD on old ones, auxiliary BCE."""

    model_head = "dkd"
    preset = {"head": "dkd", "mbce": 1.0, "kd": 5.0, "dkd_pos": 5.0, "dkd_neg": 5.0, "ac": 1.0,
              "freeze_bn": True}

    def __init__(self, opts, task):
        super().__init__(opts, task)
        if opts.pos_weight is not None:
            self.pos_weight = opts.pos_weight
        else:
            self.pos_weight = POS_WEIGHT[task.dataset][0 if task.step == 0 else 1]
        self.new_classes = task.channels([c for c in task.new_classes if c != 0])  # channel 0: the aux classifier
        self._eval_hooks: list = []

    @property
    def needs_teacher(self) -> bool:
        return self.task.step > 0

    @property
    def freezes_norm(self) -> bool:
        return self.opts.freeze_bn and self.task.step > 0

    # --- construction -------------------------------------------------------------------------
    def init_new_classifier(self, model: nn.Module) -> None:
        """Every new class starts as a copy of the auxiliary classifier (§5.1) and, with
        ``--freeze_bn``, norm layers are frozen here, before the optimizer and DDP see them."""
        if self.opts.ac > 0:
            aux, new = model.cls[0], model.cls[-1]
            with torch.no_grad():
                new.weight.copy_(aux.weight[:1].expand_as(new.weight))
                new.bias.copy_(aux.bias[:1].expand_as(new.bias))
        if self.freezes_norm:
            self._freeze_norm_and_dropout(model)

    def _freeze_norm_and_dropout(self, model: nn.Module) -> None:
        # The Trainer calls model.train() every epoch, so eval mode is forced at every forward.
        for module in model.modules():
            if is_norm_layer(module):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
            if is_norm_layer(module) or isinstance(module, nn.modules.dropout._DropoutNd):
                self._eval_hooks.append(module.register_forward_pre_hook(_force_eval))

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """§5.3: head and classifiers at 10x lr; at steps > 0 only the new classifier decays."""
        wd = self.opts.weight_decay

        def params(*modules: nn.Module) -> list:
            return [p for m in modules for p in m.parameters() if p.requires_grad]

        if self.task.step == 0:
            groups = [{"params": params(model.body), "lr": lr, "weight_decay": wd},
                      {"params": params(model.head), "lr": 10 * lr, "weight_decay": wd},
                      {"params": params(model.cls), "lr": 10 * lr, "weight_decay": wd}]
        else:
            groups = [{"params": params(model.body), "lr": lr, "weight_decay": 0.0},
                      {"params": params(model.head), "lr": 10 * lr, "weight_decay": 0.0},
                      {"params": params(*model.cls[:-1]), "lr": 10 * lr, "weight_decay": 0.0},
                      {"params": params(model.cls[-1]), "lr": 10 * lr, "weight_decay": wd}]
        return [g for g in groups if g["params"]]

    # --- training -----------------------------------------------------------------------------
    def loss(self, batch: dict, out: dict, teacher_out: Optional[dict]) -> dict[str, Tensor]:
        """§5.2 totals: mbce·L_mbce + ac·L_ac, plus kd·L_kd + dkd_pos·L+ + dkd_neg·L- at t > 0."""
        o = self.opts
        logits = out["logits"].float()
        terms: dict[str, Tensor] = {}
        if o.mbce > 0:
            lo, hi = self.new_classes[0], self.new_classes[-1] + 1
            terms["mbce"] = o.mbce * multilabel_bce(logits[:, lo:hi], batch["label"], self.new_classes,
                                                    self.pos_weight)
        if o.ac > 0:
            aux = logits[:, :1]
            terms["ac"] = o.ac * bce_class_sum(aux, torch.zeros_like(aux))
        if teacher_out is not None:
            old = slice(1, self.task.n_old)  # old classes 1..N_old; the teacher's aux is excluded
            if o.kd > 0:
                terms["kd"] = o.kd * sigmoid_distillation(logits[:, old], teacher_out["logits"][:, old].float())
            for key, weight in (("pos", o.dkd_pos), ("neg", o.dkd_neg)):
                if weight > 0:
                    student = out[f"logits_{key}"][:, old].float()
                    teacher = teacher_out[f"logits_{key}"][:, old].float()
                    terms[f"dkd_{key}"] = weight * sigmoid_distillation(student, teacher)
        return terms

    def after_step(self, ctx) -> None:
        for handle in self._eval_hooks:
            handle.remove()
        self._eval_hooks.clear()

    # --- inference ----------------------------------------------------------------------------
    def predict(self, logits: Tensor) -> Tensor:
        return sigmoid_predict(logits)


@register("DKD-M", "DKDM")
class DKDMemory(DKD):
    """DKD with the class-balanced exemplar memory of §5.4 (sizes of the reference configs)."""

    selected_by = ('mem_size',)

    preset_by_dataset = {"voc": {"mem_size": 100}, "shapes": {"mem_size": 100}, "ade": {"mem_size": 300}}
