"""DeepLabV3 ASPP head as in MiB/PLOP ``modules/deeplab.py`` (reference/mib_plop.md §3.2).

Differences from torchvision's ASPP that matter for reproducing the reference: the image-pooling
branch is *added* to the reduced map branch (not concatenated), the norm layers carry the leaky
ReLU, and at evaluation the "global" pooling is a stride-1 ``pooling_size`` average (a local
average on images larger than ``pooling_size`` feature pixels).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.dilated import OverlapDilatedConv2d
from modules.norm import LEAKY_SLOPE
from utils.errors import ConfigError

# output stride -> dilations of the three 3x3 map convs (the reference uses 32, not 36, at OS 8)
ASPP_DILATIONS = {16: (6, 12, 18), 8: (12, 24, 32)}


class DeeplabV3(nn.Module):
    """ASPP: ``red_bn(red_conv(map_bn(cat(map_convs(x)))) + pool_branch(x))``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        hidden_channels: int = 256,
        norm_act: Callable[[int], nn.Module] = nn.BatchNorm2d,
        output_stride: int = 16,
        pooling_size: Optional[int] = 32,
    ):
        super().__init__()
        if output_stride not in ASPP_DILATIONS:
            raise ConfigError(f"output stride {output_stride} is not supported; pass --output_stride 16 or 8")
        self.pooling_size = pooling_size
        self.out_channels = out_channels
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden_channels, 1, bias=False)]
            + [OverlapDilatedConv2d(in_channels, hidden_channels, d) for d in ASPP_DILATIONS[output_stride]]
        )
        self.map_bn = norm_act(hidden_channels * 4)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = norm_act(hidden_channels)
        self.red_conv = nn.Conv2d(hidden_channels * 4, out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = norm_act(out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference ``DeeplabV3.reset_parameters``: xavier-normal convs, leaky-ReLU(0.01) gain."""
        gain = nn.init.calculate_gain("leaky_relu", LEAKY_SLOPE)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight, gain)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.red_conv(self.map_bn(torch.cat([conv(x) for conv in self.map_convs], dim=1)))
        out += self.pool_branch(x)  # (B, C, 1, 1) broadcasts like the reference's repeat
        return self.red_bn(out)

    def pool_branch(self, x: Tensor) -> Tensor:
        """Image-pooling branch: global average in training, a ``pooling_size`` window in eval.

        The reference pads the window averages (replicate) before the 1x1 conv / norm / 1x1 conv;
        those are per-pixel in eval mode, so padding their output instead is identical and
        cheaper, and a 1x1 result is left to broadcast.
        """
        if self.training or self.pooling_size is None:
            pooled = x.mean(dim=(2, 3), keepdim=True)
        else:
            kh, kw = min(self.pooling_size, x.shape[2]), min(self.pooling_size, x.shape[3])
            pooled = F.avg_pool2d(x, (kh, kw), stride=1)
        out = self.pool_red_conv(self.global_pooling_bn(self.global_pooling_conv(pooled)))
        if out.shape[2] == 1 and out.shape[3] == 1:
            return out
        # reference padding: (k - 1) // 2 before, k // 2 after, on each axis
        return F.pad(out, ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2), mode="replicate")
