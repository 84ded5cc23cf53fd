"""Inference copies with batch norm folded into the preceding convolution.

A frozen network (the teacher at step > 0, any model under evaluation) applies each norm layer
as a fixed per-channel affine map, y = act(m * conv(x) + s), so m and s can live in the
convolution's weight and bias and the norm layer shrinks to its activation: one element-wise
pass less after every convolution.  The copy can also be stored in bfloat16, so that autocast
casts no weight on any call, and channels-last, oneDNN's faster layout on CPUs.  Together they
took ResNet-101 evaluation at crop 256 from 13.7 to 21-23 img/s under CPU autocast (2 cores,
scripts/bench_speed.py).

Outputs, the pre-activation ``stages`` PLOP distils included, equal the eval-mode model's up to
rounding (tests/test_fuse.py).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from .norm import activate, is_norm_layer, norm_affine


class FoldedNorm(nn.Module):
    """What remains of a norm layer whose affine map went into the convolution: its activation.

    Keeps ``activation`` / ``activation_param`` because residual blocks read them.
    """

    def __init__(self, activation: str, activation_param: float):
        super().__init__()
        self.activation = activation
        self.activation_param = activation_param

    def forward(self, x: Tensor) -> Tensor:
        return activate(x, self.activation, self.activation_param, inplace=True)

    def extra_repr(self) -> str:
        return f"activation={self.activation}[{self.activation_param}]"


def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module) -> None:
    """Make ``conv`` compute ``norm(conv(x))`` before the activation, with eval-mode statistics.

    In place (the caller owns a copy): scaling the existing weight avoids initialising a new
    layer, which for a ResNet-101 costs more than the folding itself.
    """
    mult, shift = norm_affine(norm)
    with torch.no_grad():
        conv.weight.mul_(mult.to(conv.weight.dtype).view(-1, 1, 1, 1))
        bias = shift if conv.bias is None else shift + mult * conv.bias.float()
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def _conv_norm_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names of (convolution, norm) children where the norm reads only that convolution's output:
    consecutive children of a Sequential, plus pairs a module declares in ``fusable_pairs``."""
    pairs = list(getattr(module, "fusable_pairs", ()))
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            if type(module._modules[first]) is nn.Conv2d and is_norm_layer(module._modules[second]):
                pairs.append((first, second))
    return [(c, n) for c, n in pairs if hasattr(module, c) and hasattr(module, n)]


def inference_copy(model: nn.Module, dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> nn.Module:
    """A frozen eval-mode copy of ``model`` with conv+norm pairs folded, optionally cast to ``dtype``
    and stored channels-last (oneDNN's preferred layout for bf16 convolutions and pooling on CPUs;
    every activation then follows the weights' layout).

    ``model`` itself is not modified.  Norm layers that do not follow a single convolution
    (e.g. DeepLab's norm of the concatenated ASPP branches) stay as they are, in eval mode.
    """
    fused = copy.deepcopy(model).eval().requires_grad_(False)
    for module in list(fused.modules()):
        for conv_name, norm_name in _conv_norm_pairs(module):
            norm = getattr(module, norm_name)
            fold_conv_norm(getattr(module, conv_name), norm)
            setattr(module, norm_name, FoldedNorm(getattr(norm, "activation", "identity"),
                                                  getattr(norm, "activation_param", 0.0)))
    if dtype is not None:
        fused = fused.to(dtype)
        for module in fused.modules():
            if is_norm_layer(module):
                module.float()  # statistics keep their precision; the kernels take bf16 inputs
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    return fused
