"""DKD's network variant: ASPP head with non-negative output and sigmoid classifiers
(recent_methods.md §5.1; Baek et al., "Decomposed Knowledge Distillation for Class-Incremental
Semantic Segmentation", NeurIPS 2022).

Two pieces, both used only when the model is built with ``--head dkd``:

* :class:`DKDHead` -- torchvision-style ASPP (1x1, three 3x3 atrous branches, image pooling),
  projection 1x1 + BN + ReLU + Dropout(0.1), then DKD's extra 3x3 conv + BN + ReLU
  (``last_conv``).  The final ReLU makes the features f >= 0, which is what gives the
  decomposition below its meaning: with f >= 0, the positive weights can only raise a score and
  the negative weights only lower it.
* :func:`dkd_classifier_forward` -- runs the per-step classifiers of the standard
  ``IncrementalSegmentationModule`` (``cls[0]`` has ``classes_per_step[0]`` channels, and so on),
  with DKD's meaning of the channels: channel 0 is the *auxiliary* classifier, applied to
  ``f.detach()`` so that it never shapes the features; channel k is class k.  There is no
  background channel (background is "no class above 0.5", see ``methods.dkd.DKD.predict``), so
  channel indices still equal class ids and checkpoints keep the layout of the softmax models.
  It also returns the bias-free decomposed logits z+ = W+ f and z- = W- f with
  W+ = max(W, 0), W- = min(W, 0), so that z = z+ + z- + b (§5.1).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]

# Atrous rates of the three 3x3 branches (DeepLabV3): doubled at output stride 8.
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def _conv_bn_relu(cin: int, cout: int, kernel: int, norm_layer: NormLayer, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        norm_layer(cout),
        nn.ReLU(inplace=True),
    )


class _ImagePooling(nn.Module):
    """ASPP image-level branch: global average, 1x1 conv + BN + ReLU, broadcast back to h x w."""

    def __init__(self, cin: int, cout: int, norm_layer: NormLayer):
        super().__init__()
        self.conv = _conv_bn_relu(cin, cout, 1, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.conv(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)


class DKDHead(nn.Module):
    """ASPP + projection + DKD's ``last_conv``; output (B, out_channels, h, w), every value >= 0."""

    def __init__(self, in_channels: int, out_channels: int = 256, output_stride: int = 16,
                 norm_layer: NormLayer = nn.BatchNorm2d, dropout: float = 0.1):
        super().__init__()
        rates = ASPP_RATES[output_stride]
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1, norm_layer)]
            + [_conv_bn_relu(in_channels, out_channels, 3, norm_layer, dilation=r) for r in rates]
            + [_ImagePooling(in_channels, out_channels, norm_layer)]
        )
        self.project = nn.Sequential(
            _conv_bn_relu(len(self.branches) * out_channels, out_channels, 1, norm_layer),
            nn.Dropout(dropout),
        )
        self.last_conv = _conv_bn_relu(out_channels, out_channels, 3, norm_layer)
        self.out_channels = out_channels
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming-normal convs and unit/zero norm affine, as DKD's (VainF DeepLabV3+) ASPP.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.last_conv(self.project(x))


def dkd_classifier_forward(classifiers: nn.ModuleList, features: Tensor) -> dict[str, Tensor]:
    """Logits and decomposed logits of DKD's sigmoid classifiers at the head's resolution.

    ``classifiers`` are the per-step 1x1 convs (channel 0 of ``classifiers[0]`` is the auxiliary
    classifier).  Returns, each (B, C, h, w) with channel k = class k:

    * ``logits_small``: z = W f + b; channel 0 uses ``f.detach()`` (§5.1 aux classifier);
    * ``logits_pos``:   z+ = max(W, 0) f  (bias-free);
    * ``logits_neg``:   z- = min(W, 0) f  (bias-free), so z = z+ + z- + b.

    The DKD losses never read channel 0 of z+ / z-; it is computed on ``f.detach()`` like the
    auxiliary logit so that the channel layout stays the same for all three maps.
    """
    weight = torch.cat([c.weight for c in classifiers]).to(features.dtype)  # (C, F, 1, 1)
    bias = torch.cat([c.bias for c in classifiers]).to(features.dtype)
    zeros = torch.zeros_like(bias)
    pos, neg = weight.clamp(min=0), weight.clamp(max=0)

    def stacked(rows: slice):
        w = torch.cat([weight[rows], pos[rows], neg[rows]])
        b = torch.cat([bias[rows], zeros[rows], zeros[rows]])
        return w, b

    # One conv for the classes on f, one (3 output channels) for the auxiliary on f.detach().
    w_cls, b_cls = stacked(slice(1, None))
    w_aux, b_aux = stacked(slice(0, 1))
    z_cls = F.conv2d(features, w_cls, b_cls).chunk(3, dim=1)
    z_aux = F.conv2d(features.detach(), w_aux, b_aux).chunk(3, dim=1)
    logits, logits_pos, logits_neg = (torch.cat([a, c], dim=1) for a, c in zip(z_aux, z_cls))
    return {"logits_small": logits, "logits_pos": logits_pos, "logits_neg": logits_neg}
