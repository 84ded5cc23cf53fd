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
