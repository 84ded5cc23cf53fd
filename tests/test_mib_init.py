"""MiB balanced initialisation (reference mib_plop.md §3.4) on the real segmentation model.

The expected probabilities come from the step t-1 model itself: after the initialisation the
step-t model must give every old foreground class the same probability, and split the old
background probability evenly over background and the N new classes.
"""
from __future__ import annotations

import argparse
import types

import pytest
import torch

from dataset.tasks import Task
from methods import get_method_class
from methods.classic import add_arguments
from methods.init import init_balanced
from segmentation_module import make_model

MODEL_OPTS = types.SimpleNamespace(backbone="resnet18", width=0.125, output_stride=16, norm_act="abn",
                                   pooling=32, no_pretrained=True, pretrained=None)


def method_opts(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def old_and_new():
    """Step t-1 model with classifiers [16, 2] and a step-t model [16, 2, 3] loaded from it."""
    torch.manual_seed(0)
    old = make_model(MODEL_OPTS, [16, 2]).eval()
    with torch.no_grad():
        for c in old.cls:
            c.bias.normal_(0, 1.0)  # a non-trivial background bias
    new = make_model(MODEL_OPTS, [16, 2, 3])
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert set(missing) == {"cls.2.weight", "cls.2.bias"} and not unexpected
    return old, new.eval()


def test_balanced_init_keeps_old_probabilities_and_splits_background(old_and_new):
    old, new = old_and_new
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p_old = old(x)["logits"].softmax(dim=1)
        init_balanced(new)
        p_new = new(x)["logits"].softmax(dim=1)
    n_new = 3
    assert p_new.shape[1] == 21
    torch.testing.assert_close(p_new[:, 1:18], p_old[:, 1:18], rtol=1e-4, atol=1e-6)  # old foreground
    share = p_old[:, :1] / (n_new + 1)
    torch.testing.assert_close(p_new[:, :1], share, rtol=1e-4, atol=1e-6)            # background
    torch.testing.assert_close(p_new[:, 18:], share.expand(-1, n_new, -1, -1), rtol=1e-4, atol=1e-6)


def test_new_rows_copy_background_row_and_bias(old_and_new):
    old, _ = old_and_new
    model = make_model(MODEL_OPTS, [16, 2, 3])
    model.load_state_dict(old.state_dict(), strict=False)
    b_bg = old.cls[0].bias[0].item()
    init_balanced(model)
    for row in model.cls[2].weight:
        assert torch.equal(row, old.cls[0].weight[0])
    expected = b_bg - torch.log(torch.tensor(4.0)).item()
    assert model.cls[2].bias.tolist() == pytest.approx([expected] * 3, rel=1e-6)
    assert model.cls[0].bias[0].item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(model.cls[0].bias[1:], old.cls[0].bias[1:])  # old classes untouched


def test_method_hook_follows_the_flag():
    task = Task("voc", "15-1", 1)
    model = make_model(MODEL_OPTS, [16, 1])
    before = model.cls[1].weight.clone()
    get_method_class("FT")(method_opts(), task).init_new_classifier(model)
    assert torch.equal(model.cls[1].weight, before)
    get_method_class("MiB")(method_opts("--init_balanced"), task).init_new_classifier(model)
    assert torch.equal(model.cls[1].weight[0], model.cls[0].weight[0])


def test_step0_model_has_no_new_classifier():
    with pytest.raises(ValueError, match="step > 0"):
        init_balanced(make_model(MODEL_OPTS, [16]))
