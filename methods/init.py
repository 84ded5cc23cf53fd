"""MiB's balanced initialisation of the new classifier (Cermelli et al., CVPR 2020, §3.3; ref §3.4).

Used with ``--init_balanced`` by MiB, PLOP, REMINDER, LGKD and LSKD.
"""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def init_balanced(model: nn.Module) -> None:
    """Give every new class the background's weights and split the background's probability.

    With N new classes, every row of ``cls[-1]`` becomes the background row of ``cls[0]`` and
    every new bias, *and the background bias*, becomes ``b_bg - log(N + 1)``.  Then each new
    logit equals the background logit minus log(N + 1), so ``exp(z_bg) + sum_new exp(z_j)`` is
    the old ``exp(z_bg)``: old-class probabilities are unchanged and the old background
    probability is split evenly over background and the N new classes.
    """
    if len(model.cls) < 2:
        raise ValueError("init_balanced needs a new classifier: call it at step > 0, after loading step t-1")
    background, new = model.cls[0], model.cls[-1]
    n_new = new.weight.shape[0]
    bias = background.bias[0] - math.log(n_new + 1)
    new.weight.copy_(background.weight[0:1].expand_as(new.weight))
    new.bias.fill_(bias)
    background.bias[0] = bias
