"""Inference copies with folded norms (modules/fuse.py) and where the Trainer uses them."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from argparser import parse_args
from dataset.tasks import Task
from methods.pod import pod_loss
from modules.fuse import FoldedNorm, fold_conv_norm, inference_copy
from modules.norm import ABN, InPlaceABN, norm_affine
from segmentation_module import make_model
from train import Precision, Trainer, evaluate

SMALL = ["--backbone", "resnet18", "--width", "0.25", "--no_pretrained", "--output_stride", "16"]


def _model(norm_act: str, seed: int = 0):
    opts = parse_args(["--dataset", "shapes", "--task", "15-1", "--norm_act", norm_act, *SMALL])
    torch.manual_seed(seed)
    model = make_model(opts, [16, 1])
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(4, 3, 64, 64) * 2 + 0.5)
        for module in model.modules():
            if isinstance(module, (ABN, nn.BatchNorm2d)):
                module.weight.normal_()  # negative weights exercise |w| + eps of InPlaceABN
                module.bias.normal_()
    return model.eval()


def test_fold_conv_norm_by_hand():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    norm = ABN(1, activation="identity")
    with torch.no_grad():
        conv.weight.fill_(3.0)
        norm.weight.fill_(2.0)
        norm.bias.fill_(0.5)
        norm.running_mean.fill_(1.0)
        norm.running_var.fill_(4.0 - norm.eps)  # sqrt(var + eps) = 2
    fold_conv_norm(conv, norm)
    # norm(conv(x)) = 2 * (3x - 1) / 2 + 0.5 = 3x - 0.5
    assert conv.weight.item() == pytest.approx(3.0)
    assert conv.bias.item() == pytest.approx(-0.5)
    assert conv(torch.full((1, 1, 1, 1), 2.0)).item() == pytest.approx(5.5)


def test_fold_inplace_abn_uses_abs_weight_plus_eps():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    norm = InPlaceABN(1, activation="identity")
    with torch.no_grad():
        conv.weight.fill_(1.0)
        norm.weight.fill_(-2.0)
        norm.running_var.fill_(1.0 - norm.eps)
    fold_conv_norm(conv, norm)
    assert conv.weight.item() == pytest.approx(2.0 + norm.eps)


@pytest.mark.parametrize("norm_act", ["iabn", "abn", "bn", "iabn_sync"])
def test_inference_copy_matches_eval_model(norm_act):
    model = _model(norm_act)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = inference_copy(model)
    # resnet18: stem + 8 blocks x 2 convs + 3 projection shortcuts = 20 folded norms
    assert sum(isinstance(m, FoldedNorm) for m in fused.modules()) == 20
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    for key in ("logits", "body", "pre_logits"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4)
    for a, b in zip(got["stages"], expected["stages"], strict=True):  # PLOP's pre-activations
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for k, v in model.state_dict().items():  # the original is untouched
        torch.testing.assert_close(v, before[k])
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in fused.parameters())


def test_bf16_channels_last_copy():
    model = _model("iabn")
    fused = inference_copy(model, torch.bfloat16, channels_last=True)
    conv = fused.body.mod2.block1.convs.conv2
    assert conv.weight.dtype == torch.bfloat16
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fused.head.map_bn.running_var.dtype == torch.float32  # unfolded norms stay fp32
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)["logits"]
        with torch.autocast("cpu", torch.bfloat16):
            got = fused(x)["logits"].float()
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 0.05 * scale


def test_evaluate_leaves_the_model_alone():
    model = _model("iabn").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    labels = torch.randint(0, 17, (2, 64, 64))
    loader = [(torch.randn(2, 3, 64, 64), labels)]
    predict = lambda logits: logits.argmax(1)  # noqa: E731
    matrix = evaluate(model, loader, 17, predict, torch.device("cpu"))
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    # the same confusion matrix as the eval-mode model itself
    model.eval()
    with torch.no_grad():
        pred = model(loader[0][0])["logits"].argmax(1)
    expected = torch.bincount((labels * 17 + pred).flatten(), minlength=17 * 17).reshape(17, 17)
    assert torch.equal(matrix.mat.cpu(), expected)


def test_trainer_runs_a_folded_teacher_and_anchors_to_the_exact_one():
    opts = parse_args(["--dataset", "shapes", "--task", "15-1", "--method", "MiB", "--regularizer", "ewc",
                       "--norm_act", "iabn", *SMALL])
    task = Task("shapes", "15-1", 1)
    teacher = make_model(opts, task.at(0).classes_per_step).eval().requires_grad_(False)
    student = make_model(opts, task.classes_per_step)
    method = opts.method_cls(opts, task)
    trainer = Trainer(student, teacher, method, opts, torch.device("cpu"), lr=0.01, iters_per_epoch=1, epochs=1)
    assert trainer.teacher_forward is not teacher
    assert any(isinstance(m, FoldedNorm) for m in trainer.teacher_forward.modules())
    ctx = trainer.context([], task)
    assert ctx.teacher is trainer.teacher_forward and ctx.previous_model is teacher
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ctx.teacher(x)["logits"], teacher(x)["logits"], atol=1e-4, rtol=1e-4)


def test_under_fix_bn_the_trainer_runs_the_exact_teacher_so_distillation_starts_at_zero():
    opts = parse_args(["--dataset", "shapes", "--task", "15-1", "--method", "PLOP", "--fix_bn",
                       "--norm_act", "iabn", *SMALL])
    task = Task("shapes", "15-1", 1)
    teacher = _model("iabn").eval().requires_grad_(False)  # non-trivial running statistics
    student = make_model(opts, task.classes_per_step)
    student.load_state_dict(teacher.state_dict(), strict=False)
    method = opts.method_cls(opts, task)
    trainer = Trainer(student, teacher, method, opts, torch.device("cpu"), lr=0.01, iters_per_epoch=1, epochs=1)
    assert trainer.teacher_forward is teacher
    student.train()
    student.freeze_bn()  # what train_epoch does under --fix_bn
    x = torch.randn(2, 3, 64, 64)
    out = student(x)  # with gradients, as in a training step
    with torch.no_grad():
        expected = trainer.teacher_forward(x)
    for got, want in zip(out["stages"], expected["stages"], strict=True):
        assert torch.equal(got.detach(), want)  # bit for bit
    loss = pod_loss(expected["stages"], out["stages"], [0.01] * 4, (1, 2, 4))
    loss.backward()
    assert loss.item() == 0  # POD starts at exactly 0 ...
    assert all(p.grad is None or not p.grad.any() for p in student.parameters())  # ... with no gradient
    folded = Precision(torch.device("cpu"), False).inference_copy(teacher)
    with torch.no_grad():
        rounded = folded(x)["stages"]
    assert any(not torch.equal(a.float().contiguous(), b) for a, b in zip(rounded, expected["stages"]))


def test_precision_copy_dtype():
    model = _model("abn")
    cpu_amp = Precision(torch.device("cpu"), True).inference_copy(model)
    fp32 = Precision(torch.device("cpu"), False).inference_copy(model)
    assert next(cpu_amp.parameters()).dtype == torch.bfloat16
    assert next(fp32.parameters()).dtype == torch.float32
    assert math.isfinite(float(fp32(torch.randn(1, 3, 32, 32))["logits"].sum()))


def test_norm_affine_without_affine_parameters():
    norm = torch.nn.BatchNorm2d(3, affine=False).eval()
    norm.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    norm.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    mult, shift = norm_affine(norm)
    inv = 1 / torch.sqrt(norm.running_var + norm.eps)
    torch.testing.assert_close(mult, inv)
    torch.testing.assert_close(shift, -norm.running_mean * inv)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), mult.view(1, 3, 1, 1) * x + shift.view(1, 3, 1, 1))
