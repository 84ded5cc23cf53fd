"""LSKD's learned layer weights (recent_methods.md §6.2): w over the nine terms of its task
vector, trained by a GradNorm-like objective that replaces w's gradient.

G_i is a *signed mean* of the term's gradient on one shared parameter (the reference's choice),
not a norm, so the objective does not keep w positive; ``--nonnegative_loss_weights`` (LSKD's
flag) projects it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TERMS = ("ce", "mcd", "unkd", "pod_mod2", "pod_mod3", "pod_mod4", "pod_mod5", "pod_head", "pod_logits")
# GradNorm groups (indices into TERMS) and the shared parameter each term's gradient is read on:
# the first parameter of the head's last norm layer (``red_bn``) or of a backbone stage.
GROUP_A = (0, 1, 2, 6, 7, 8)
GROUP_B = (3, 4, 5)
SHARED = ("head", "head", "head", "mod2", "mod3", "mod4", "mod5", "head", "head")
GRADNORM_SCALE = 10.0      # weight of the |G_i - target_i| sums in the reference objective
MONOTONE_RATIO = 1.25      # beta term: ReLU(1.25 w_{3+j} - w_{4+j}), j = 0..3


def gradnorm_weight_grad(weights: Tensor, grad_means: Tensor, losses: Tensor, initial: Tensor,
                         alpha: float, beta: float, gamma: float, new_over_old: float) -> Tensor:
    """Gradient w.r.t. w of LSKD's weight objective (recent_methods.md §6.2):

        10 sum_{g in A, B} sum_{i in g} |G_i - mean_g(G) r_i^alpha| + gamma |w_0 - (C_new/C_old) w_2|
        + beta sum_{j=0}^{3} ReLU(1.25 w_{3+j} - w_{4+j}),

    G_i = w_i * mean(dL_i/dtheta_i) (a signed mean, as in the code), r_i = (L_i/L_i(0)) over its
    group mean, the targets mean_g(G) r^alpha held constant.  A ratio with L_i(0) = 0 is 1.
    """
    w = weights.detach().clone().requires_grad_(True)
    g = w * grad_means
    ratio = torch.where(initial != 0, losses / initial.where(initial != 0, torch.ones_like(initial)),
                        torch.ones_like(losses))
    objective = w.new_zeros(())
    for group in (GROUP_A, GROUP_B):
        index = list(group)
        r = ratio[index] / ratio[index].mean()
        target = g[index].detach().mean() * r ** alpha
        objective = objective + GRADNORM_SCALE * (g[index] - target).abs().sum()
    objective = objective + gamma * (w[0] - new_over_old * w[2]).abs()
    objective = objective + beta * F.relu(MONOTONE_RATIO * w[3:7] - w[4:8]).sum()
    return torch.autograd.grad(objective, w)[0]


def shared_parameters(model: nn.Module) -> list[Tensor]:
    """theta_i per term (SHARED): the first parameter of ``head.red_bn`` or of ``body.mod2..5``."""
    try:
        found = {"head": next(model.head.red_bn.parameters())}
        found.update({f"mod{k}": next(getattr(model.body, f"mod{k}").parameters()) for k in range(2, 6)})
    except (AttributeError, StopIteration):
        raise RuntimeError("LSKD reads gradients on head.red_bn and body.mod2..mod5; "
                           "this model has no such layers") from None
    return [found[name] for name in SHARED]


def mean_gradients(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """mean(dL_i/dtheta_i) per term; 0 where L_i does not depend on theta_i (graph kept)."""
    means = []
    for loss, param in zip(losses, params, strict=True):
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, param, retain_graph=True, allow_unused=True)
        else:
            grad = None
        means.append(grad.float().mean() if grad is not None else param.new_zeros((), dtype=torch.float32))
    return torch.stack(means)
