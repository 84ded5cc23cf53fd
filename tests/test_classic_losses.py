"""Classic-family losses (reference mib_plop.md §4.0-§4.4, §4.8) against plain per-pixel loops.

Every expected value is computed here with Python floats and ``math``, one pixel at a time,
straight from the formulas of the reference; the code under test is vectorised.
"""
from __future__ import annotations

import argparse
import math
import types

import pytest
import torch
import torch.nn.functional as F

from dataset.tasks import Task
from methods import get_method_class
from methods.classic import ClassicMethod, add_arguments
from methods.losses import (
    bce_with_ignore,
    feature_distillation_mse,
    icarl_disjoint_loss,
    icarl_distillation,
    knowledge_distillation,
    unbiased_cross_entropy,
    unbiased_knowledge_distillation,
)

IGN = 255


# --- plain-Python helpers -----------------------------------------------------------------------


def pixels(t: torch.Tensor):
    """(b, h, w) of every pixel of a (B, C, H, W) or (B, H, W) tensor."""
    B, H, W = t.shape[0], t.shape[-2], t.shape[-1]
    return [(b, i, j) for b in range(B) for i in range(H) for j in range(W)]


def vec(t, b, i, j):
    return [float(v) for v in t[b, :, i, j]]


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def log_sum_exp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def bce(x, t):
    return -(t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 2, 3, generator=g) * 2   # n_seen = 5
    teacher = torch.randn(2, 3, 2, 3, generator=g) * 2  # n_old = 3: bg, 1, 2
    labels = torch.tensor([[[0, 3, 4], [IGN, 0, 1]], [[4, IGN, 0], [3, 3, 2]]])
    return logits, teacher, labels


# --- LwF KD -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_kd_renormalises_old_channels_and_divides_by_n_old(tensors, alpha):
    logits, teacher, _ = tensors
    total = 0.0
    for b, i, j in pixels(logits):
        p = softmax(vec(logits, b, i, j)[:3])
        q = softmax([alpha * v for v in vec(teacher, b, i, j)])
        total += -sum(qc * math.log(pc) for qc, pc in zip(q, p)) / 3
    expected = total / len(pixels(logits))
    assert knowledge_distillation(logits, teacher, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_kd_mask_zeroes_pixels_but_keeps_all_pixel_mean(tensors):
    logits, teacher, _ = tensors
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[0, 0, 1] = True
    p = softmax(vec(logits, 0, 0, 1)[:3])
    q = softmax(vec(teacher, 0, 0, 1))
    expected = -sum(qc * math.log(pc) for qc, pc in zip(q, p)) / 3 / 12
    assert knowledge_distillation(logits, teacher, 1.0, mask).item() == pytest.approx(expected, rel=1e-5)


# --- MiB UNCE / UNKD ----------------------------------------------------------------------------


def test_unce_merges_background_with_old_classes_and_averages_over_all_pixels(tensors):
    logits, _, labels = tensors
    n_old = 3
    total = 0.0
    for b, i, j in pixels(labels):
        x, y = vec(logits, b, i, j), int(labels[b, i, j])
        if y == IGN:
            continue  # contributes 0, but still counts in the mean
        if y < n_old:  # background, or an old label that the loss treats as background
            total += -(log_sum_exp(x[:n_old]) - log_sum_exp(x))
        else:
            total += -(x[y] - log_sum_exp(x))
    expected = total / labels.numel()
    assert unbiased_cross_entropy(logits, labels, n_old).item() == pytest.approx(expected, rel=1e-5)


def test_unce_equals_ce_without_old_classes_except_for_background_merge():
    # With n_old = 1 the merged background is channel 0 alone: UNCE == CE over all pixels.
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, IGN]]])
    ce = F.cross_entropy(logits, labels, ignore_index=IGN, reduction="sum") / 4
    assert unbiased_cross_entropy(logits, labels, 1).item() == pytest.approx(ce.item(), rel=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_unkd_merges_student_background_with_new_classes(tensors, alpha):
    logits, teacher, _ = tensors
    n_old = 3
    total = 0.0
    for b, i, j in pixels(logits):
        x = vec(logits, b, i, j)
        q = softmax([alpha * v for v in vec(teacher, b, i, j)])
        den = log_sum_exp(x)
        log_bg = log_sum_exp([x[0]] + x[n_old:]) - den
        per = q[0] * log_bg + sum(q[c] * (x[c] - den) for c in range(1, n_old))
        total += -per / n_old
    expected = total / len(pixels(logits))
    assert unbiased_knowledge_distillation(logits, teacher, alpha).item() == pytest.approx(expected, rel=1e-5)


# --- LwF-MC ----------------------------------------------------------------------------------------


def test_bce_with_ignore_sums_channels_and_zeroes_ignored_pixels(tensors):
    logits, _, labels = tensors
    total = 0.0
    for b, i, j in pixels(labels):
        y = int(labels[b, i, j])
        if y == IGN:
            continue
        total += sum(bce(x, 1.0 if c == y else 0.0) for c, x in enumerate(vec(logits, b, i, j)))
    expected = total / labels.numel()
    assert bce_with_ignore(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_icarl_distillation_is_n_old_times_elementwise_mean(tensors):
    logits, teacher, _ = tensors
    terms = [bce(vec(logits, b, i, j)[c], sigmoid(vec(teacher, b, i, j)[c]))
             for b, i, j in pixels(logits) for c in range(3)]
    expected = 3 * sum(terms) / len(terms)  # reference: n_old * BCEWithLogitsLoss(mean)
    assert icarl_distillation(logits, teacher).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("keep_background", [False, True])
def test_icarl_disjoint_soft_old_targets(tensors, keep_background):
    logits, teacher, labels = tensors
    n_old, first_soft = 3, (1 if keep_background else 0)
    total = 0.0
    for b, i, j in pixels(labels):
        y = int(labels[b, i, j])
        target = [1.0 if c == y else 0.0 for c in range(5)]  # 255: all zeros
        for c in range(first_soft, n_old):
            target[c] = sigmoid(float(teacher[b, c, i, j]))
        total += sum(bce(x, t) for x, t in zip(vec(logits, b, i, j), target))
    expected = total / labels.numel()  # ignored pixels are *not* skipped here (reference IcarlLoss)
    got = icarl_disjoint_loss(logits, labels, teacher, keep_background=keep_background)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_feature_mse_is_mean_over_all_elements():
    a = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])
    b = torch.tensor([[[[0.0, 2.0]], [[2.0, -1.0]]]])
    assert feature_distillation_mse(a, b).item() == pytest.approx((1 + 0 + 4 + 0) / 4)


def test_losses_are_fp32_for_bf16_inputs(tensors):
    logits, teacher, labels = tensors
    assert knowledge_distillation(logits.bfloat16(), teacher.bfloat16()).dtype == torch.float32
    assert unbiased_cross_entropy(logits.bfloat16(), labels, 3).dtype == torch.float32


# --- the Method: which terms, with which weights ------------------------------------------------


def make_opts(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = parser.parse_args(list(argv))
    opts.weight_decay = 1e-4
    return opts


STEP1 = Task("voc", "15-1", 1)  # n_old = 16, one new class (16)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 17, 4, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 17, (2, 4, 4), generator=g)
    labels[labels < 16] = 0
    labels[0, 0, :] = IGN
    out = {"logits": logits, "body": torch.randn(2, 8, 2, 2, generator=g)}
    teacher = {"logits": torch.randn(2, 16, 4, 4, generator=g), "body": torch.randn(2, 8, 2, 2, generator=g)}
    return {"image": torch.zeros(2, 3, 4, 4), "label": labels}, out, teacher


def test_defaults_are_plain_fine_tuning(batch):
    b, out, teacher = batch
    method = get_method_class("FT")(make_opts(), STEP1)
    assert not method.needs_teacher
    terms = method.loss(b, out, None)
    ce = F.cross_entropy(out["logits"], b["label"], ignore_index=IGN, reduction="sum") / b["label"].numel()
    assert set(terms) == {"ce"} and terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_mib_terms_and_weights(batch):
    b, out, teacher = batch
    opts = make_opts("--unce", "--unkd", "--loss_kd", "10", "--init_balanced")
    method = get_method_class("MiB")(opts, STEP1)
    assert method.needs_teacher
    terms = method.loss(b, out, teacher)
    assert set(terms) == {"unce", "unkd"}
    assert terms["unce"].item() == pytest.approx(unbiased_cross_entropy(out["logits"], b["label"], 16).item())
    kd = unbiased_knowledge_distillation(out["logits"], teacher["logits"])
    assert terms["unkd"].item() == pytest.approx(10 * kd.item(), rel=1e-6)


def test_ft_class_with_mib_flags_is_mib(batch):
    b, out, teacher = batch
    flags = ("--unce", "--unkd", "--loss_kd", "10", "--init_balanced")
    ft = get_method_class("ft")(make_opts(*flags), STEP1).loss(b, out, teacher)
    mib = get_method_class("mib")(make_opts(*flags), STEP1).loss(b, out, teacher)
    assert {k: v.item() for k, v in ft.items()} == {k: v.item() for k, v in mib.items()}


def test_step0_has_no_teacher_terms_and_uses_ce():
    step0 = Task("voc", "15-1", 0)
    b, out = {"label": torch.tensor([[[0, 5], [15, IGN]]])}, {"logits": torch.randn(1, 16, 2, 2)}
    method = ClassicMethod(make_opts("--unce", "--unkd", "--loss_kd", "10", "--loss_de", "1"), step0)
    assert not method.needs_teacher
    assert set(method.loss(b, out, None)) == {"ce"}  # UNCE needs old classes
    method = ClassicMethod(make_opts("--icarl", "--icarl_importance", "10"), step0)
    assert not method.needs_teacher
    assert set(method.loss(b, out, None)) == {"bce"}


def test_ilt_terms(batch):
    b, out, teacher = batch
    terms = ClassicMethod(make_opts("--loss_kd", "100", "--loss_de", "100", "--alpha", "2"), STEP1).loss(b, out, teacher)
    assert set(terms) == {"ce", "kd", "de"}
    assert terms["kd"].item() == pytest.approx(100 * knowledge_distillation(out["logits"], teacher["logits"], 2.0).item(), rel=1e-6)
    assert terms["de"].item() == pytest.approx(100 * F.mse_loss(out["body"], teacher["body"]).item(), rel=1e-6)


def test_lwfmc_combined_and_disjoint(batch):
    b, out, teacher = batch
    terms = ClassicMethod(make_opts("--icarl", "--icarl_importance", "10"), STEP1).loss(b, out, teacher)
    assert set(terms) == {"bce", "icarl"}
    assert terms["icarl"].item() == pytest.approx(10 * icarl_distillation(out["logits"], teacher["logits"]).item(), rel=1e-6)
    method = ClassicMethod(make_opts("--icarl", "--icarl_disjoint", "--icarl_bkg"), STEP1)
    terms = method.loss(b, out, teacher)
    assert set(terms) == {"icarl"}
    expected = icarl_disjoint_loss(out["logits"], b["label"], teacher["logits"], keep_background=True)
    assert terms["icarl"].item() == pytest.approx(expected.item())


def test_needs_teacher_only_for_nonzero_teacher_terms():
    assert not ClassicMethod(make_opts("--regularizer", "ewc"), STEP1).needs_teacher
    assert not ClassicMethod(make_opts("--unkd"), STEP1).needs_teacher  # --unkd without a weight
    assert ClassicMethod(make_opts("--loss_de", "1"), STEP1).needs_teacher
    assert ClassicMethod(make_opts("--icarl"), STEP1).needs_teacher


def test_registry_names_and_presets():
    expected = {
        "FT": {}, "LwF": {"loss_kd": 100}, "lwfmc": {"icarl": True, "icarl_importance": 10},
        "LwF-MC": {"icarl": True, "icarl_importance": 10}, "ilt": {"loss_kd": 100, "loss_de": 100},
        "EWC": {"regularizer": "ewc", "reg_importance": 500}, "rw": {"regularizer": "rw", "reg_importance": 100},
        "PI": {"regularizer": "pi", "reg_importance": 500},
        "MIB": {"loss_kd": 10, "unce": True, "unkd": True, "init_balanced": True},
    }
    for name, preset in expected.items():
        cls = get_method_class(name)
        assert issubclass(cls, ClassicMethod) and cls.preset == preset, name


def test_cli_flag_beats_preset():
    import argparser

    opts = argparser.parse_args(["--dataset", "shapes", "--method", "MIB", "--loss_kd", "100"])
    assert (opts.loss_kd, opts.unce, opts.unkd, opts.init_balanced) == (100, True, True, True)
    opts = argparser.parse_args(["--dataset", "shapes", "--method", "EWC", "--reg_importance", "100"])
    assert (opts.regularizer, opts.reg_importance) == ("ewc", 100)


def test_freeze_drops_body_from_optimizer_at_step_gt0():
    model = types.SimpleNamespace(
        body=torch.nn.Linear(2, 2), head=torch.nn.Linear(2, 2), cls=torch.nn.ModuleList([torch.nn.Linear(2, 1)])
    )
    groups = ClassicMethod(make_opts("--freeze"), STEP1).param_groups(model, 0.1)
    body = {id(p) for p in model.body.parameters()}
    assert len(groups) == 2 and not any(id(p) in body for g in groups for p in g["params"])
    assert len(ClassicMethod(make_opts(), STEP1).param_groups(model, 0.1)) == 3


def test_per_image_weight_equals_weighting_each_image_mean():
    """PLOP's adaptive factor on UNCE/BCE: mean_pixels(nu_b * l_bp) = mean_b(nu_b * mean_p l_bp)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 4, 6, generator=g)
    labels = torch.randint(0, 5, (3, 4, 6), generator=g)
    labels[1, 0] = 255
    weight = torch.tensor([0.2, 1.0, 0.0])
    for loss in (lambda x, y, w=None: unbiased_cross_entropy(x, y, 3, w), bce_with_ignore):
        expected = sum(float(weight[b]) * loss(logits[b:b + 1], labels[b:b + 1]).item() for b in range(3)) / 3
        assert loss(logits, labels, weight).item() == pytest.approx(expected, rel=1e-5)
