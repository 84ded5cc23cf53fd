"""ResNet-18/34/50/101/152 in the in-place-ABN layout of MiB/PLOP (reference/mib_plop.md §3.1).

Module names follow mapillary/inplace_abn's ``models/resnet.py`` and ``modules/residual.py``
(``mod1.conv1``, ``mod2.block1.convs.bn1``, ``mod2.block1.proj_conv`` ...), so its ImageNet
checkpoint ``resnet101_iabn_sync.pth.tar`` loads strictly.  As in PLOP, the last block of each
stage also hands out its residual sum *before* the final leaky ReLU (PLOP's "attentions", the
input of POD distillation).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import Tensor, nn

from modules.norm import activate
from utils.errors import ConfigError

NormAct = Callable[[int], nn.Module]

# name -> (blocks per stage mod2..mod5, bottleneck blocks?)   (inplace_abn's ``_NETS``)
RESNETS = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
    "resnet152": ((3, 8, 36, 3), True),
}
# output stride -> dilation of mod2..mod5 (PLOP ``ResNet.__init__``); a stage with dilation 1
# (but mod2) starts with a stride-2 block, a dilated stage keeps the resolution.
# 32 is the undilated classifier layout, in which backbones are pretrained (scripts/pretrain_shapes.py).
STAGE_DILATIONS = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}


class ModelConfigError(ConfigError):
    """A backbone / output-stride / width combination that cannot be built."""


def scale_channels(channels: int, width: float) -> int:
    """Channel count under the ``--width`` multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def stride_and_dilation(stage_dilation: int, stage: int, block: int) -> tuple[int, int]:
    """inplace_abn ``ResNet._stride_dilation``: stride 2 in the first block of undilated mod3..5."""
    stride = 2 if stage_dilation == 1 and block == 0 and stage > 0 else 1
    return stride, stage_dilation


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation, bias=False)


class ResidualBlock(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) block; the last norm has no activation.

    out = act(convs(x) + shortcut(x)), shortcut a 1x1 conv + norm (``proj_*``) when the shape
    changes; act is the activation of ``convs.bn1`` (leaky ReLU 0.01), as in inplace_abn.
    """

    def __init__(
        self, in_channels: int, channels: tuple[int, ...], norm_act: NormAct, stride: int = 1, dilation: int = 1
    ):
        super().__init__()
        if len(channels) == 2:
            layers = [
                ("conv1", _conv(in_channels, channels[0], 3, stride, dilation)),
                ("bn1", norm_act(channels[0])),
                ("conv2", _conv(channels[0], channels[1], 3, 1, dilation)),
                ("bn2", norm_act(channels[1])),
            ]
        else:
            layers = [
                ("conv1", _conv(in_channels, channels[0], 1)),
                ("bn1", norm_act(channels[0])),
                ("conv2", _conv(channels[0], channels[1], 3, stride, dilation)),
                ("bn2", norm_act(channels[1])),
                ("conv3", _conv(channels[1], channels[2], 1)),
                ("bn3", norm_act(channels[2])),
            ]
        layers[-1][1].activation = "identity"
        self.convs = nn.Sequential(OrderedDict(layers))
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = _conv(in_channels, channels[-1], 1, stride)
            self.proj_bn = norm_act(channels[-1])
            self.proj_bn.activation = "identity"

    # (conv, norm) children that modules.fuse may fold for inference; convs.* are found as a Sequential.
    fusable_pairs = (("proj_conv", "proj_bn"),)

    def residual_sum(self, x: Tensor) -> Tensor:
        """convs(x) + shortcut(x): the block output before its activation."""
        shortcut = self.proj_bn(self.proj_conv(x)) if hasattr(self, "proj_conv") else x
        return self.convs(x) + shortcut

    def activation(self, x: Tensor, inplace: bool) -> Tensor:
        bn1 = self.convs.bn1
        return activate(x, bn1.activation, bn1.activation_param, inplace=inplace)

    def forward(self, x: Tensor) -> Tensor:
        # The sum is a fresh tensor that nothing else reads, so the activation may overwrite it.
        return self.activation(self.residual_sum(x), inplace=True)


class ResNet(nn.Module):
    """Backbone ``x -> (out, stages)``: out the activated mod5 output, stages the residual sums of
    the last block of mod2..mod5 before their activation (PLOP ``ResNet.forward``)."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        bottleneck: bool,
        norm_act: NormAct,
        output_stride: int = 16,
        width: float = 1.0,
    ):
        super().__init__()
        if output_stride not in STAGE_DILATIONS:
            raise ModelConfigError(f"output stride {output_stride} is not supported; pass --output_stride 16 or 8")
        if width <= 0:
            raise ModelConfigError(f"--width must be positive, got {width}")
        stem = scale_channels(64, width)
        self.mod1 = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)),
            ("bn1", norm_act(stem)),
            ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
        ]))
        channels = tuple(scale_channels(c, width) for c in ((64, 64, 256) if bottleneck else (64, 64)))
        in_channels = stem
        self.stage_channels: list[int] = []  # channels of the 4 ``stages`` outputs
        for stage, (num_blocks, dilation) in enumerate(zip(blocks_per_stage, STAGE_DILATIONS[output_stride])):
            blocks = []
            for block in range(num_blocks):
                stride, dil = stride_and_dilation(dilation, stage, block)
                blocks.append((f"block{block + 1}", ResidualBlock(in_channels, channels, norm_act, stride, dil)))
                in_channels = channels[-1]
            self.add_module(f"mod{stage + 2}", nn.Sequential(OrderedDict(blocks)))
            self.stage_channels.append(in_channels)
            channels = tuple(2 * c for c in channels)
        self.out_channels = in_channels

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.mod1(x)
        stages = []
        for stage in (self.mod2, self.mod3, self.mod4, self.mod5):
            *body, last = stage
            for block in body:
                x = block(x)
            pre_activation = last.residual_sum(x)
            stages.append(pre_activation)
            x = last.activation(pre_activation, inplace=False)  # keep the pre-activation intact
        return x, stages


def build_backbone(name: str, norm_act: NormAct, output_stride: int = 16, width: float = 1.0) -> ResNet:
    """``--backbone`` (resnet18/34/50/101/152) with ``--output_stride`` and ``--width``."""
    if name not in RESNETS:
        raise ModelConfigError(f"unknown --backbone '{name}'; choose one of {', '.join(RESNETS)}")
    blocks, bottleneck = RESNETS[name]
    return ResNet(blocks, bottleneck, norm_act, output_stride, width)
