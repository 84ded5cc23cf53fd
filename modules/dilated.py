"""ASPP's dilated 3x3 convolutions with a backward pass that skips the padding.

With dilation d on an H x W map, tap (i, j) of a "same" 3x3 convolution reads the input at an
offset of ((i-1) d, (j-1) d); where d approaches the map size most taps read only zero padding
(at crop 256 and output stride 16 the map is 16 x 16 and ASPP's dilations are 6, 12 and 18; at
dilation 18 only the centre tap ever sees the image).  oneDNN's forward pass copes, but its
backward pass computes every tap over the whole padded map: measured on 2 CPU cores, bf16, a
(2, 2048, 16, 16) input and 256 outputs, 42 ms at dilation 12 and 64 ms at dilation 18 against
25 ms and 12.5 ms when each tap's gradient is computed on its valid overlap only.

When the dilation reaches the map size on both axes, only the centre tap is left and the
convolution is computed as the 1x1 convolution it then is (forward and backward, on every device;
measured at dilation 18 on 16 x 16, bf16: forward 7.3 -> 1.2 ms, forward + backward 10.8 -> 5.3 ms).

:class:`OverlapDilatedConv2d` is a drop-in ``nn.Conv2d`` (same parameters and state dict).
Otherwise it takes the overlap path when a CPU training pass needs gradients and the taps' valid
area is at most :data:`MAX_VALID_SHARE` of the dense work, and is plain ``nn.Conv2d`` else.  The gradients
are those of the dense convolution, up to summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Below this share of the dense 9 * H * W tap work the overlap backward was faster in the
# measurements above (dilation 6 on 16 x 16, share 0.56, was slower: 36 ms against 22 ms).
MAX_VALID_SHARE = 1 / 3


def _overlap(size: int, offset: int) -> tuple[int, int]:
    """Output positions [lo, hi) whose input position ``p + offset`` lies inside [0, size)."""
    return max(0, -offset), min(size, size - offset)


def valid_share(height: int, width: int, dilation: int) -> float:
    """Share of the dense tap work (9 H W) that reads the image rather than padding."""
    rows = sum(max(0, hi - lo) for lo, hi in (_overlap(height, k * dilation) for k in (-1, 0, 1)))
    cols = sum(max(0, hi - lo) for lo, hi in (_overlap(width, k * dilation) for k in (-1, 0, 1)))
    return rows * cols / (9 * height * width)


class _OverlapConv(torch.autograd.Function):
    """3x3, stride 1, padding = dilation, no bias, one group: dense forward, per-tap backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, dilation: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        return F.conv2d(x, weight, None, 1, dilation, dilation)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        d = ctx.dilation
        n, c_in, height, width = x.shape
        c_out = weight.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for i in range(3):
            dy = (i - 1) * d
            y0, y1 = _overlap(height, dy)
            for j in range(3):
                dx = (j - 1) * d
                x0, x1 = _overlap(width, dx)
                if y0 >= y1 or x0 >= x1:
                    continue  # this tap reads only padding: no gradient flows through it
                # (C_out, N h w) and (N h w, C_in) views of the overlapping windows
                g = grad[:, :, y0:y1, x0:x1].permute(1, 0, 2, 3).reshape(c_out, -1)
                if need_w:
                    window = x[:, :, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
                    grad_w[:, :, i, j] = g @ window.permute(0, 2, 3, 1).reshape(-1, c_in)
                if need_x:
                    back = (weight[:, :, i, j].t() @ g).view(c_in, n, y1 - y0, x1 - x0)
                    grad_x[:, :, y0 + dy:y1 + dy, x0 + dx:x1 + dx] += back.permute(1, 0, 2, 3)
        return grad_x, grad_w, None


class OverlapDilatedConv2d(nn.Conv2d):
    """``nn.Conv2d(c_in, c_out, 3, padding=d, dilation=d, bias=False)`` whose CPU backward skips
    the taps' padding when that is most of the work (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int):
        super().__init__(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        d = self.dilation[0]
        if d >= x.shape[2] and d >= x.shape[3]:
            # Every off-centre tap reads only padding: the convolution is its centre 1x1 tap,
            # exactly, in the forward and in the gradients (the other taps' gradients are zero).
            return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)
        if not (x.device.type == "cpu" and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad)
                and valid_share(x.shape[2], x.shape[3], d) <= MAX_VALID_SHARE):
            return super().forward(x)
        weight = self.weight
        if torch.is_autocast_enabled("cpu"):  # the Function runs outside autocast: cast here
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _OverlapConv.apply(x, weight.to(x.dtype), d)
