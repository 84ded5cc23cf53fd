"""The ASPP convolution whose backward skips padding (modules/dilated.py) against nn.Conv2d."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modules.dilated import MAX_VALID_SHARE, OverlapDilatedConv2d, valid_share


def test_valid_share_by_hand():
    # 16 x 16, dilation 18: only the centre tap reads the image
    assert valid_share(16, 16, 18) == pytest.approx(1 / 9)
    # dilation 12: per axis 16 + 4 + 4 valid positions out of 3 * 16
    assert valid_share(16, 16, 12) == pytest.approx((24 / 48) ** 2)
    # dilation 6 on 16 x 12: rows 16 + 10 + 10, cols 12 + 6 + 6
    assert valid_share(16, 12, 6) == pytest.approx((36 / 48) * (24 / 36))
    assert valid_share(16, 16, 1) > MAX_VALID_SHARE


@pytest.mark.parametrize("dilation,shape", [(12, (16, 16)), (18, (16, 16)), (9, (10, 14)), (7, (6, 20)),
                                            (3, (8, 8)), (20, (8, 20)), (12, (10, 16))])
def test_same_output_and_gradients_as_conv2d(dilation, shape):
    torch.manual_seed(0)
    ours = OverlapDilatedConv2d(5, 4, dilation).double()
    dense = nn.Conv2d(5, 4, 3, padding=dilation, dilation=dilation, bias=False).double()
    dense.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, *shape, dtype=torch.float64, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    grad = torch.randn(2, 4, *shape, dtype=torch.float64)
    out, expected = ours(x), dense(x_dense)
    torch.testing.assert_close(out, expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_dense.grad)
    torch.testing.assert_close(ours.weight.grad, dense.weight.grad)


@pytest.mark.parametrize("dilation", [12, 18])  # the overlap backward and the centre-tap path
def test_under_bf16_autocast_gradients_reach_the_fp32_weight(dilation):
    torch.manual_seed(0)
    ours = OverlapDilatedConv2d(8, 4, dilation)
    dense = nn.Conv2d(8, 4, 3, padding=dilation, dilation=dilation, bias=False)
    dense.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 16, 16)
    for conv in (ours, dense):
        with torch.autocast("cpu", torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
    assert ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours.weight.grad, dense.weight.grad, rtol=2e-2, atol=2e-2)


def test_centre_tap_path_keeps_a_folded_bias_and_skips_the_other_taps():
    """Dilation >= both map sides: the output is the centre 1x1 tap plus the bias (a norm folded
    into the convolution adds one), whatever the off-centre weights hold."""
    torch.manual_seed(0)
    conv = OverlapDilatedConv2d(3, 2, 6).eval()
    conv.bias = nn.Parameter(torch.tensor([0.5, -1.0]))
    x = torch.randn(1, 3, 4, 6)
    with torch.no_grad():
        expected = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 1, 1], x) + conv.bias.view(1, 2, 1, 1)
        conv.weight[:, :, 0, 0] = 1e6  # a tap that only ever reads padding
        torch.testing.assert_close(conv(x), expected)
