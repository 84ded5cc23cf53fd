"""scripts/pod_gap.py: the batch-norm part of POD's starting distance, against hand values."""

import pytest
import torch
from torch import nn

from scripts_loader import load_script

pod_gap = load_script("scripts/pod_gap.py")


class ModeScaled(nn.Module):
    """Five 'distilled maps' equal to the input, times ``factor`` in training mode only."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        y = x * (self.factor if self.training else 1.0)
        return {"stages": [y, y + 1, 2 * y, y.abs()], "pre_logits": y - 3}


def test_a_training_mode_scale_of_1_1_is_a_relative_gap_of_0_21_on_squared_maps():
    # pow prepro: Phi((1.1 y)^2) - Phi(y^2) = 0.21 Phi(y^2) for the maps linear in y (Phi is linear).
    x = torch.rand(3, 2, 8, 6) + 0.5
    gaps = pod_gap.norm_mode_gap(ModeScaled(1.1), x)
    assert gaps[0] == pytest.approx(0.21, rel=1e-5)
    assert gaps[2] == pytest.approx(0.21, rel=1e-5)
    assert gaps[3] == pytest.approx(0.21, rel=1e-5)
    # stage 2, (1.1y + 1)^2 vs (y + 1)^2 at another point: computed through the plain definition
    a, b = (x + 1) ** 2, (1.1 * x + 1) ** 2
    emb = pod_gap.local_pod_embedding
    expected = ((emb(b, [1, 2, 4]) - emb(a, [1, 2, 4])).norm(dim=1) / emb(a, [1, 2, 4]).norm(dim=1)).mean()
    assert gaps[1] == pytest.approx(expected.item(), rel=1e-5)
    # without the square the same scale is a 0.1 gap
    assert pod_gap.norm_mode_gap(ModeScaled(1.1), x, prepro="none")[0] == pytest.approx(0.1, rel=1e-5)
    assert pod_gap.norm_mode_gap(ModeScaled(1.0), x) == [0.0] * 5


def test_batch_norm_gap_is_zero_at_matching_statistics_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(2, momentum=None)  # cumulative average: running stats = the batch's after one pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            y = self.bn(x)
            return {"stages": [y] * 4, "pre_logits": y}

    net = Net()
    x = torch.randn(64, 2, 8, 8) * 3 + 2
    with torch.no_grad():
        net.train()(x)  # running mean = batch mean, running var = unbiased batch var
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gaps = pod_gap.norm_mode_gap(net, x)
    # only the unbiased/biased variance factor sqrt(n / (n-1)) separates the two modes
    n = 64 * 8 * 8
    y_eval = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), keepdim=True) + 1e-5)
    y_train = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    emb = pod_gap.local_pod_embedding
    expected = ((emb(y_train ** 2, [1, 2, 4]) - emb(y_eval ** 2, [1, 2, 4])).norm(dim=1)
                / emb(y_eval ** 2, [1, 2, 4]).norm(dim=1)).mean().item()
    assert expected == pytest.approx(1 / (1 - 1 / n) - 1, rel=1e-2)
    assert gaps == pytest.approx([expected] * 5, rel=1e-3)
    assert not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_first_norm_shift_in_running_standard_deviations():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Identity()
            self.bn = nn.BatchNorm2d(2)
            self.later = nn.BatchNorm2d(2)  # not the first: ignored

        def forward(self, x):
            return self.later(self.bn(self.conv(x)))

    net = Net().train()
    net.bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
    net.bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    x = torch.randn(4, 2, 5, 5)
    x = x - x.mean(dim=(0, 2, 3), keepdim=True) + torch.tensor([2.0, -2.5]).view(1, 2, 1, 1)
    # |2 - 1| / 2 = 0.5 and |-2.5 + 2| / 0.5 = 1.0
    assert pod_gap.first_norm_shift(net, x) == pytest.approx(0.75, rel=1e-5)
    assert net.training and net.bn.running_mean.tolist() == [1.0, -2.0]


def test_every_norm_layers_shift_in_forward_order_and_its_blocks_mean():
    """norm_shifts: each norm layer's input against its own running statistics, in the order the
    forward pass reaches them (not the order they were registered); by_block averages them per
    block of the body and per head."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.BatchNorm2d(1)  # registered first, reached last
            self.body = nn.Module()
            self.body.mod1 = nn.BatchNorm2d(1)
            self.body.mod2 = nn.Sequential(nn.BatchNorm2d(1), nn.BatchNorm2d(1))

        def forward(self, x):
            return self.head(self.body.mod2(self.body.mod1(x)) * 0 + 3)

    net = Net()
    net.body.mod1.running_mean.fill_(1.0)  # input mean 2, running std 1: shift 1
    net.body.mod2[0].running_var.fill_(4.0)  # mod1's output: mean (2 - 1) / sqrt(1 + eps) ~ 1, std 2: ~0.5
    net.body.mod2[1].running_mean.fill_(0.5)
    net.head.running_mean.fill_(1.0)  # its input is the constant 3: |3 - 1| / 1 = 2
    x = torch.randn(8, 1, 4, 4)
    x = x - x.mean() + 2
    shifts = pod_gap.norm_shifts(net, x)
    assert [name for name, _ in shifts] == ["body.mod1", "body.mod2.0", "body.mod2.1", "head"]
    # mod2[1] sees mod2[0]'s output, (y - 0) / 2 with y = mod1's output of mean ~1: mean ~0.5, running 0.5
    y = (x - 1) / (1 + 1e-5) ** 0.5
    z = y / (4 + 1e-5) ** 0.5
    expected = [1.0, y.mean().item() / 2, abs(z.mean().item() - 0.5), 2.0]
    assert [s for _, s in shifts] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert pod_gap.first_norm_shift(net, x) == pytest.approx(1.0, rel=1e-4)
    blocks = pod_gap.by_block(shifts)
    assert list(blocks) == ["body.mod1", "body.mod2", "head"]
    assert blocks["body.mod2"] == pytest.approx((expected[1] + expected[2]) / 2, rel=1e-4, abs=1e-6)
    # measured in eval mode, the model's own mode and running statistics left as they were
    assert net.training and net.body.mod1.running_mean.item() == 1.0 and net.head.running_mean.item() == 1.0


def test_variance_ratio_is_the_eval_mode_drift_that_compounds_downstream():
    """variance_ratios: per norm layer the largest channel's eval-mode input variance over its
    running variance (+ eps); a mismatch upstream multiplies every later layer's ratio, and
    by_block(..., max) keeps each block's largest."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Module()
            self.body.mod1 = nn.BatchNorm2d(2)
            self.body.mod2 = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2))

        def forward(self, x):
            y = self.body.mod1(x) * 3  # a block whose eval-mode output is 3x too wide
            return self.body.mod2(y)

    net = Net().train()
    net.body.mod1.running_var.copy_(torch.tensor([0.25, 4.0]))
    x = torch.randn(6, 2, 5, 5)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)  # unit variance
    ratios = pod_gap.variance_ratios(net, x)
    eps = 1e-5
    # mod1: max(1 / 0.25, 1 / 4); mod2.0 sees 3 x / sqrt(0.25 + eps) in channel 0, variance
    # 9 / (0.25 + eps), against its running variance 1; mod2.1 sees that divided by (1 + eps)
    first = 1 / (0.25 + eps)
    second = 9 * first / (1 + eps)
    third = second / (1 + eps)
    assert [name for name, _ in ratios] == ["body.mod1", "body.mod2.0", "body.mod2.1"]
    assert [r for _, r in ratios] == pytest.approx([first, second, third], rel=1e-4)
    assert pod_gap.by_block(ratios, max) == pytest.approx({"body.mod1": first, "body.mod2": second}, rel=1e-4)
    assert net.training and net.body.mod1.running_var.tolist() == [0.25, 4.0]


def test_first_iteration_pod_in_the_losss_units_per_layer():
    """first_iteration_pod: each layer's share of the method's POD term (its factor, schedule and
    1/L), with the student in training mode (here 1.1x the teacher's maps) and in eval mode (here
    equal to them: zero)."""
    from types import SimpleNamespace
    method = SimpleNamespace(pod_logits=False, pod_factors=[1.0, 0.0, 0.0, 0.0, 0.5], spp_scales=(1,),
                             pod_prepro="none", schedule=2.0, n_old=2, pod_new_logits="sum")
    x = torch.rand(3, 2, 4, 6)
    terms = pod_gap.first_iteration_pod(method, ModeScaled(1.1).eval(), ModeScaled(1.1), x, ModeScaled(1.1))
    # Phi at scale 1: the means over columns and over rows; d = |Phi(1.1 y) - Phi(y)| = 0.1 |Phi(y)| for
    # y = x and for y = x - 3 (the constant cancels)
    size = torch.cat([x.mean(dim=3).flatten(1), x.mean(dim=2).flatten(1)], dim=1).norm(dim=1).mean().item()
    assert terms["training"] == pytest.approx([1.0 * 2.0 * 0.1 * size / 5, 0, 0, 0, 0.5 * 2.0 * 0.1 * size / 5],
                                              rel=1e-5, abs=1e-9)
    assert terms["eval"] == [0.0] * 5
