"""The plug-in interface between the Trainer and a continual-learning method.

The Trainer knows nothing about methods: it runs the student (and, when ``needs_teacher`` is
true, the frozen teacher) on a batch, hands both output dicts to :meth:`Method.loss`, sums the
named terms it gets back and steps the optimizer.  Everything method-specific -- extra teacher
passes, pseudo-labels, importance estimates, prototypes -- lives behind these hooks.

Model outputs (``out`` / ``teacher_out``), see ``segmentation_module.py``:

=================  ==============================================================================
``logits``         (B, n_seen, H, W) full-resolution logits; channel k is class k
``logits_small``   (B, n_seen, h, w) logits at the head's resolution (output stride)
``body``           (B, C_body, h, w) last backbone stage, after its activation
``stages``         list of the 4 stage outputs (res2..res5) taken *before* the last activation
``pre_logits``     (B, 256, h, w) output of the ASPP head, input of the classifiers
=================  ==============================================================================

Losses are computed in fp32 (the Trainer calls ``loss`` outside autocast); a method casts the
tensors it reads with ``.float()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataset.presence import IGNORE_LABEL as IGNORE_INDEX  # the label every loss skips
from utils.errors import ConfigError, UserError


@dataclass
class StepContext:
    """What a method may look at around a step (``before_step`` / ``after_step``)."""

    model: nn.Module                   # the student, unwrapped from DDP
    teacher: Optional[nn.Module]       # frozen step t-1 model for forward passes, or None at step 0
    train_loader: Any                  # iterable of batches {"image", "label"}
    device: torch.device
    task: Any                          # dataset.tasks.Task
    opts: Any                          # argparse namespace
    autocast: Callable = field(default=lambda: torch.autocast("cpu", enabled=False))
    all_reduce: Callable[[Tensor], Tensor] = field(default=lambda t: t)  # in-place sum over ranks
    log: Callable[[str], None] = field(default=print)
    # The step t-1 model with its exact parameters (regulariser anchors). ``teacher`` may be an
    # inference copy with folded norms (modules.fuse); this defaults to ``teacher``.
    previous_model: Optional[nn.Module] = None

    def __post_init__(self):
        if self.previous_model is None:
            self.previous_model = self.teacher


class MethodStateError(UserError, RuntimeError):
    """A method needs state from the previous step's checkpoint and it is not there."""


class Method:
    """Fine-tuning behaviour; every method overrides what it changes."""

    needs_teacher: bool = False
    # Set when the step-t method cannot run without state saved by the step t-1 method
    # (EWC's Fisher, REMINDER's prototypes); ``load_state_dict`` then raises MethodStateError.
    needs_previous_state: bool = False
    # The ``--head`` the losses are written for (DKD's sigmoid head decomposes every logit).
    model_head: str = "deeplab"

    def __init__(self, opts, task):
        self.opts = opts
        self.task = task
        head = getattr(opts, "head", self.model_head)
        if head != self.model_head:  # argparser refuses it too; this guards direct construction
            name = getattr(self, "name", type(self).__name__)
            raise ConfigError(f"--method {name} trains the {self.model_head} head: pass --head {self.model_head} "
                              f"(got --head {head})")

    # --- which flags a method reads -----------------------------------------------------------
    @classmethod
    def flag_modules(cls) -> set[str]:
        """Modules whose flags (their ``add_arguments``) this method reads: its own module's and
        its base classes'.  Any other method's flag on its command line is an error, not a
        silently ignored option (``argparser.check_method_flags``)."""
        return {c.__module__ for c in cls.__mro__ if issubclass(c, Method)}

    @classmethod
    def behaviour_class(cls) -> type["Method"]:
        """The nearest class, this one or a base, that defines behaviour rather than only a
        preset.  LwF, ILT, EWC or MiB are FT's class with flags preset, as ``--method`` only
        presets flags in the reference, so ``--method MiB --pod local`` composes like
        ``--method FT --pod local`` with MiB's flags (``argparser.family_class``)."""
        for c in cls.__mro__:
            if any(callable(v) or isinstance(v, (property, classmethod, staticmethod))
                   for k, v in vars(c).items() if not k.startswith("__")):
                return c
        return cls

    # --- construction -------------------------------------------------------------------------
    def init_new_classifier(self, model: nn.Module) -> None:
        """Initialise the step-t classifier after the step t-1 weights were loaded (step > 0)."""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Optimizer groups; reference: body, head and classifiers at one lr and weight decay."""
        wd = self.opts.weight_decay
        groups = [
            {"params": [p for p in model.body.parameters() if p.requires_grad], "lr": lr, "weight_decay": wd},
            {"params": [p for p in model.head.parameters() if p.requires_grad], "lr": lr, "weight_decay": wd},
            {"params": [p for p in model.cls.parameters() if p.requires_grad], "lr": lr, "weight_decay": wd},
        ]
        return [g for g in groups if g["params"]]

    # --- training -----------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        """Once before the first epoch of a step (PLOP thresholds, importance snapshots)."""

    def loss(self, batch: dict, out: dict, teacher_out: Optional[dict]) -> dict[str, Tensor]:
        """Named loss terms for one batch; the Trainer back-propagates their sum."""
        return {"ce": cross_entropy_all_pixels(out["logits"], batch["label"])}

    def after_backward(self, model: nn.Module) -> None:
        """After backward, before the optimizer step, every iteration (EWC Fisher, PI path)."""

    def after_epoch(self, ctx: StepContext, epoch: int) -> None:
        """After every training epoch (LSKD renormalises its learned loss weights)."""

    def after_step(self, ctx: StepContext) -> None:
        """Once after the last epoch of a step, before its checkpoint is written."""

    # --- inference ----------------------------------------------------------------------------
    def predict(self, logits: Tensor) -> Tensor:
        """Class map (B, H, W) from logits (B, C, H, W)."""
        return logits.argmax(dim=1)

    # --- persistence (inside the step checkpoint) ---------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Receives the ``method_state`` of the step t-1 checkpoint (None at step 0)."""

    # --- persistence inside a step (the epoch checkpoint ``step-<t>.last.pth``) ---------------
    def in_step_state(self) -> dict:
        """What this step has gathered so far and later epochs read (EWC/RW/PI statistics, SDR
        prototypes, LSKD's learned weights), saved after every validated epoch so that a resumed
        step continues exactly.  Rank 0 writes it, so it must be equal on every rank (statistics
        of all-reduced gradients or features are).  Everything else a method holds must follow
        from the step t-1 state, the teacher and ``before_step``."""
        return {}

    def load_in_step_state(self, state: dict) -> None:
        """Restore :meth:`in_step_state` when a step resumes; called after ``before_step``."""


def cross_entropy_all_pixels(logits: Tensor, labels: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """CE averaged over *all* B*H*W pixels, ignored ones contributing 0 (reference §4.0).

    ``weight`` (B,) optionally scales each image's pixels (PLOP's adaptive factor).
    """
    per_pixel = F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
    return mean_over_pixels(per_pixel, weight)


def mean_over_pixels(per_pixel: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean of a (B, H, W) loss map over every pixel, each image optionally scaled by weight[b]."""
    if weight is not None:
        per_pixel = per_pixel * weight.view(-1, 1, 1)
    return per_pixel.mean()
