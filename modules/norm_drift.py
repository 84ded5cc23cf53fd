"""How far a model's eval mode sits from its training mode, read at its norm layers' inputs.

A norm layer's running statistics are gathered from its training-mode inputs.  In eval mode the
layers upstream normalise with those running statistics instead of each batch's, so a layer's
eval-mode input can drift from what its statistics describe: by the content of a new step's
images (a mean shift, ``norm_shifts``), or by a mismatch that compounds over a deep body's blocks
(a variance far above the running one, ``variance_ratios``).  A teacher runs in eval mode, a
student at its first iteration in training mode, so both reach POD and every output distillation.
"""
from __future__ import annotations

import torch
from torch import nn

from modules.norm import is_norm_layer
from utils.modes import eval_mode


@torch.no_grad()
def norm_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per norm layer (in forward order), the channel means and variances of its input when
    ``model`` runs ``images`` in eval mode; the model's mode and statistics are left as they were."""
    norms = dict((name, m) for name, m in model.named_modules() if is_norm_layer(m))
    moments = {}  # per layer its input's channel moments only, not the input: forward order

    def keep_moments(name):
        def hook(module, args):  # returns None: the layer's input goes on unchanged
            x = args[0].float()
            moments.setdefault(name, (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))))
        return hook

    handles = [m.register_forward_pre_hook(keep_moments(name)) for name, m in norms.items()]
    try:
        with eval_mode(model):
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def norm_shifts(model: nn.Module, images: torch.Tensor) -> list[tuple[str, float]]:
    """How far ``images`` move each norm layer's input from its running statistics, in the
    model's eval mode: per layer (in forward order), the mean over channels of |batch mean -
    running mean| / running standard deviation.  Deeper layers show what a step's content does to
    the statistics the student's training-mode norms replace."""
    norms = dict(model.named_modules())
    return [(name, ((mean - norms[name].running_mean.float()).abs() / norms[name].running_var.float().sqrt())
             .mean().item()) for name, (mean, _) in norm_inputs(model, images).items()]


def variance_ratios(model: nn.Module, images: torch.Tensor) -> list[tuple[str, float]]:
    """Per norm layer (in forward order), the largest over channels of its eval-mode input's
    variance over its running variance.  Running statistics are gathered from training-mode
    inputs; near 1 they also describe the eval-mode maps.  Far above 1, eval mode has drifted
    from training mode upstream (it compounds over a deep body's blocks), so a teacher's maps
    have no training-mode counterpart and POD starts far from zero whatever the student learns."""
    norms = dict(model.named_modules())
    return [(name, (var / (norms[name].running_var.float() + norms[name].eps)).max().item())
            for name, (_, var) in norm_inputs(model, images).items()]
