"""LSKD (methods/lskd.py, lskd_masks.py, layer_weights.py): masks, context descriptor, blanking, the learned-weight update, and
one incremental iteration on a tiny network, against plain loops and hand-derived gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import argparser
from dataset.tasks import Task
from methods.base import StepContext
from methods.layer_weights import TERMS, gradnorm_weight_grad, shared_parameters
from methods.lskd import LSKD
from methods.lskd_masks import blank_regions, context_descriptor, context_distance, region_masks, rowwise_quantile
from segmentation_module import make_model
from utils.errors import ConfigError


def test_rowwise_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 37, generator=g)
    q = torch.tensor([0.0, 0.33, 0.5, 1.0])
    expected = torch.stack([torch.quantile(x[i], q[i].item()) for i in range(4)])
    torch.testing.assert_close(rowwise_quantile(x, q), expected)


def _reference_masks(a, c, d, labels, n_old, dis, mode, channels):
    """Per-image transcription of LSKD's ``features_distillation`` mask code."""
    if dis == "cos":
        dis_old, dis_new = F.cosine_similarity(a, c, dim=1), F.cosine_similarity(a, d, dim=1)
    else:
        dis_old = (c.mean(dim=1) - a.mean(dim=1)).abs()
        dis_new = (d.mean(dim=1) - a.mean(dim=1)).abs()
    ch_old = (c.mean(dim=(2, 3)) - a.mean(dim=(2, 3))).abs()
    ch_new = (d.mean(dim=(2, 3)) - a.mean(dim=(2, 3))).abs()
    masks, chans = [], []
    for old, new, x, old_ch, new_ch in zip(dis_old, dis_new, labels, ch_old, ch_new):
        h, w = x.shape
        r_old = (x < n_old).sum().item() / h / w
        r_new = ((x >= n_old) & (x != 255)).sum().item() / h / w
        if mode == "old":
            ma = torch.sigmoid(old)
        elif mode == "new":
            ma = 1 - torch.sigmoid(new)
        elif mode == "none":
            ma = (torch.where(old < torch.quantile(old, r_old).item(), 0, 1)
                  & torch.where(new > torch.quantile(new, r_new).item(), 0, 1)).float()
        elif mode == "newnone":
            ma = torch.where(new > torch.quantile(new, r_old).item(), 0, 1).float()
        else:  # whc
            if dis == "cos":
                ma_old = torch.where(old < torch.quantile(old, r_old).item(), 0, 1)
                ma_new = torch.where(new > torch.quantile(new, r_new).item(), 0, 1)
            else:
                ma_old = torch.where(old > torch.quantile(old, r_new).item(), 0, 1)
                ma_new = torch.where(new < torch.quantile(new, r_old).item(), 0, 1)
            ma = (ma_old | ma_new).float()
            chans.append((torch.where(old_ch < torch.quantile(old_ch, r_old).item(), 0, 1)
                          | torch.where(new_ch > torch.quantile(new_ch, r_new).item(), 0, 1)).float())
        masks.append(ma)
    spatial = torch.stack(masks)[:, None]
    channel = torch.stack(chans)[:, :, None, None] if (mode == "whc" and channels) else None
    return spatial, channel


def _maps():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 6, 5, 7, generator=g)
    c = a + 0.5 * torch.randn(3, 6, 5, 7, generator=g)
    d = a + torch.randn(3, 6, 5, 7, generator=g)
    labels = torch.randint(0, 6, (3, 10, 14), generator=g)
    labels[0, :2] = 255
    labels[2] = 0  # an image without new pixels
    return a, c, d, labels


@pytest.mark.parametrize("dis", ["cos", "mean_L1"])
@pytest.mark.parametrize("mode", ["whc", "none", "newnone", "old", "new"])
def test_masks_match_reference_loop(dis, mode):
    a, c, d, labels = _maps()
    for channels in (True, False):
        spatial, channel = region_masks(a, c, d, labels, 4, dis, mode, channels)
        ref_spatial, ref_channel = _reference_masks(a, c, d, labels, 4, dis, mode, channels)
        torch.testing.assert_close(spatial, ref_spatial)
        if ref_channel is None:
            assert channel is None
        else:
            torch.testing.assert_close(channel, ref_channel)


def test_whc_cos_mask_by_hand():
    # one image, 1 x 4 map, labels: half old, half new -> both quantile levels 0.5
    a = torch.tensor([[[[1.0, 1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    c = torch.tensor([[[[1.0, 0.0, 1.0, 1.0]], [[0.0, 1.0, 1.0, 0.0]]]])  # cos with a: 1, 0, .707, 1
    d = torch.tensor([[[[1.0, 1.0, 0.0, 1.0]], [[1.0, 0.0, 1.0, 0.0]]]])  # cos with a: .707, 1, 0, 1
    labels = torch.tensor([[[0, 0, 5, 5]]])
    spatial, channel = region_masks(a, c, d, labels, 4, "cos", "whc", channels=True)
    # s_old >= median(1, 0, .707, 1) = .854 -> pixels 0, 3; s_new <= median(.707, 1, 0, 1) = .854 -> 0, 2
    assert spatial.flatten().tolist() == [1.0, 0.0, 1.0, 1.0]
    # channel stats: c_old = |(.75, .5) - (1, 0)| = (.25, .5); c_new = |(.75, .5) - (1, 0)| = (.25, .5)
    # c_old >= median .375 -> ch 1; c_new <= .375 -> ch 0
    assert channel.flatten().tolist() == [1.0, 1.0]


def test_gt_mask_is_resized_new_region():
    labels = torch.tensor([[[0, 0, 7, 7], [0, 0, 7, 7], [255, 255, 0, 0], [255, 255, 0, 0]]])
    spatial, channel = region_masks(torch.zeros(1, 2, 2, 2), None, None, labels, 4, "cos", "gt", True)
    assert channel is None
    assert spatial.flatten().tolist() == [0.0, 1.0, 0.0, 0.0]


def _reference_second_order(x, scale):
    """Transcription of LSKD's ``second_order_pooling`` (loop over groups, view-based flatten)."""
    k = x.shape[1] // scale
    emb = []
    for j in range(scale):
        t = F.avg_pool2d(x[:, j * k:(j + 1) * k], 5, stride=2, padding=2)
        ba, c, h, w = t.shape
        t = t.permute(0, 2, 3, 1).contiguous().view(-1, c)
        t = torch.matmul(t.unsqueeze(2), t.unsqueeze(1)).view(ba, -1, h, w)
        emb.append(t.contiguous().view(ba, -1))
    return torch.cat(emb, dim=1)


def test_context_descriptor_matches_reference_loop():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 23, 6, 9, generator=g)  # 23 channels, 4 groups of 5: 3 dropped
    b = torch.randn(2, 23, 6, 9, generator=g)
    ours, ref = context_descriptor(a, 4), _reference_second_order(a, 4)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.sort(dim=1).values, ref.sort(dim=1).values)
    expected = (_reference_second_order(a, 4) - _reference_second_order(b, 4)).norm(dim=1)
    torch.testing.assert_close(context_distance(a, b, 4), expected)


def test_context_descriptor_by_hand():
    x = torch.zeros(1, 2, 1, 1)
    x[0, :, 0, 0] = torch.tensor([5.0, 10.0])  # 5x5 pool with zero padding counted: divide by 25
    v = torch.tensor([0.2, 0.4])
    assert context_descriptor(x, 1).flatten().tolist() == pytest.approx(torch.outer(v, v).flatten().tolist())


def test_blank_regions_zeroes_old_then_new():
    images = torch.arange(1, 5, dtype=torch.float).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    labels = torch.tensor([[[0, 3], [255, 5]]])  # n_old = 3: old, new, ignored, new
    out = blank_regions(images, labels, 3)
    assert out.shape == (2, 3, 2, 2)
    assert out[0, 0].flatten().tolist() == [0.0, 2.0, 3.0, 4.0]
    assert out[1, 0].flatten().tolist() == [1.0, 0.0, 3.0, 0.0]


def _hand_gradnorm_grad(w, gm, losses, initial, alpha, beta, gamma, rho):
    grad = [0.0] * 9
    g = [w[i] * gm[i] for i in range(9)]
    ratio = [losses[i] / initial[i] for i in range(9)]
    for group in ((0, 1, 2, 6, 7, 8), (3, 4, 5)):
        mean_g = sum(g[i] for i in group) / len(group)
        mean_r = sum(ratio[i] for i in group) / len(group)
        for i in group:
            target = mean_g * (ratio[i] / mean_r) ** alpha
            grad[i] += 10 * (1 if g[i] > target else -1) * gm[i]
    sign = 1 if w[0] - rho * w[2] > 0 else -1
    grad[0] += gamma * sign
    grad[2] -= gamma * rho * sign
    for j in range(4):
        if 1.25 * w[3 + j] - w[4 + j] > 0:
            grad[3 + j] += 1.25 * beta
            grad[4 + j] -= beta
    return grad


def test_gradnorm_weight_gradient_by_hand():
    w = [1.0, 0.8, 1.2, 1.5, 1.0, 0.9, 1.3, 1.1, 0.7]
    gm = [0.3, -0.2, 0.05, 0.1, -0.4, 0.25, 0.15, -0.05, 0.2]
    losses = [2.0, 0.1, 1.5, 0.8, 0.6, 0.5, 0.9, 0.4, 0.02]
    initial = [2.5, 0.12, 1.4, 1.0, 0.5, 0.7, 0.8, 0.5, 0.03]
    got = gradnorm_weight_grad(torch.tensor(w), torch.tensor(gm), torch.tensor(losses), torch.tensor(initial),
                               alpha=2.0, beta=1e-2, gamma=5e-2, new_over_old=1 / 16)
    expected = _hand_gradnorm_grad(w, gm, losses, initial, 2.0, 1e-2, 5e-2, 1 / 16)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_zero_initial_loss_counts_as_ratio_one():
    ones = torch.ones(9)
    initial = ones.clone()
    initial[1] = 0.0
    got = gradnorm_weight_grad(ones, ones * 0.1, ones, initial, 10.0, 0.0, 0.0, 0.1)
    assert torch.isfinite(got).all()


def test_seed_spellings_are_aliases_and_bad_distances_are_config_errors():
    base = ["--dataset", "shapes", "--method", "FT"]
    opts = argparser.parse_args(base + ["--dis", "mean_L1", "--sigmoid", "none", "--aaaaaa", "0.01", "--mmm", "8",
                                        "--adaptivealpha", "3", "--adaptivebeta", "0.2", "--adaptivegamma", "0.1",
                                        "--ppp", "2"])
    assert (opts.mask_distance, opts.mask_mode, opts.mcd_factor, opts.mcd_groups) == ("mean_L1", "none", 0.01, 8)
    assert (opts.adaptive_alpha, opts.adaptive_beta, opts.adaptive_gamma, opts.ce_factor) == (3, 0.2, 0.1, 2)
    with pytest.raises(ConfigError, match="L1_mean"):
        argparser.parse_args(base + ["--dis", "L1_mean"])
    with pytest.raises(ConfigError, match="L2"):
        argparser.parse_args(base + ["--mask_distance", "L2"])
    lskd = argparser.parse_args(["--dataset", "shapes", "--method", "LSKD", "--dis", "mean_L1"])
    assert lskd.mask_distance == "mean_L1" and lskd.mcd_factor == 0.005 and lskd.unkd and lskd.loss_kd == 10


# --- one incremental iteration on a tiny network ---------------------------------------------------


class _CountingTeacher(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.batch_sizes = []

    def forward(self, images):
        self.batch_sizes.append(len(images))
        return self.model(images)


def _tiny_setup():
    opts = argparser.parse_args(["--dataset", "shapes", "--task", "15-1", "--method", "LSKD", "--backbone",
                                 "resnet18", "--width", "0.125", "--no_pretrained", "--norm_act", "bn"])
    torch.manual_seed(0)
    old_task, task = Task("shapes", "15-1", 0), Task("shapes", "15-1", 1)
    teacher = make_model(opts, old_task.classes_per_step).eval().requires_grad_(False)
    student = make_model(opts, task.classes_per_step)
    student.load_state_dict(teacher.state_dict(), strict=False)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 20:40, 10:50] = 16
    labels[1, :5] = 255
    return opts, task, teacher, student, images, labels


def test_one_iteration_learned_weights_get_the_objective_gradient():
    opts, task, teacher, student, images, labels = _tiny_setup()
    method = LSKD(opts, task)
    method.load_state_dict({"loss_weights": torch.linspace(0.5, 1.5, 9)})
    counting = _CountingTeacher(teacher)
    ctx = StepContext(model=student, teacher=counting, train_loader=[(images, labels)],
                      device=torch.device("cpu"), task=task, opts=opts, log=lambda s: None)
    method.before_step(ctx)
    groups = method.param_groups(student, 0.01)
    assert groups[-1]["params"] == [method.loss_weights]
    counting.batch_sizes.clear()

    student.train()
    out = student(images)
    with torch.no_grad():
        teacher_out = teacher(images)
    terms = method.loss({"image": images, "label": labels}, out, teacher_out)
    assert counting.batch_sizes == [4]  # the two blanked copies, one forward; the plain pass is reused
    assert list(terms) == list(TERMS)

    # independent computation of the expected gradient of w
    weights = method.loss_weights.detach().clone()
    raw = [terms[name] / weights[i] for i, name in enumerate(TERMS)]
    shared = shared_parameters(student)
    gm = []
    for value, param in zip(raw, shared):
        (grad,) = torch.autograd.grad(value, param, retain_graph=True, allow_unused=True)
        gm.append(0.0 if grad is None else grad.mean().item())
    losses = [float(v.detach()) for v in raw]  # epoch 0: L(0) = L, every ratio is 1
    expected = _hand_gradnorm_grad(weights.tolist(), gm, losses, losses, opts.adaptive_alpha, opts.adaptive_beta,
                                   opts.adaptive_gamma, 1 / 16)

    sum(terms.values()).backward()
    method.after_backward(student)
    assert method.loss_weights.grad.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-9)

    method.after_epoch(ctx, 0)
    assert method.initial_frozen and method.loss_weights.sum().item() == pytest.approx(9.0)
    saved = method.state_dict()["loss_weights"]
    carried = LSKD(opts, task)
    carried.load_state_dict({"loss_weights": saved})
    torch.testing.assert_close(carried.loss_weights.detach(), saved)


def test_nonnegative_loss_weights_project_before_use_and_renormalisation():
    """Off (the reference): a negative weight is used as is and survives the renormalisation.  On:
    it counts 0 in the loss and the others are rescaled to sum 9; all zero restarts from ones."""
    opts, task, teacher, student, images, labels = _tiny_setup()
    start = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, -1.0])
    ctx = StepContext(model=student, teacher=teacher, train_loader=[(images, labels)],
                      device=torch.device("cpu"), task=task, opts=opts, log=lambda s: None)
    with torch.no_grad():
        teacher_out = teacher(images)
    for flag in (False, True):
        opts.nonnegative_loss_weights = flag
        method = LSKD(opts, task)
        method.load_state_dict({"loss_weights": start})
        method.before_step(ctx)
        terms = method.loss({"image": images, "label": labels}, student(images), teacher_out)
        method.after_epoch(ctx, 0)
        if flag:
            assert terms["pod_logits"].item() == 0.0
            expected = (start.clamp(min=0) * 9 / 8.5).tolist()
        else:
            assert terms["pod_logits"].item() < 0  # the student is rewarded for moving away
            expected = (start * 9 / 7.5).tolist()
        assert method.loss_weights.detach().tolist() == pytest.approx(expected)
    with torch.no_grad():
        method.loss_weights.fill_(-0.5)
    method.after_epoch(ctx, 1)
    assert method.loss_weights.detach().tolist() == [1.0] * 9


def test_loss_weights_lr_sets_the_weights_group_and_each_epoch_logs_the_weights():
    """By default w learns at the step's lr (the reference's head group); --loss_weights_lr gives it
    its own, one SGD step moves w by that lr times its gradient, and after_epoch logs w."""
    opts, task, teacher, student, images, labels = _tiny_setup()
    lines = []
    ctx = StepContext(model=student, teacher=teacher, train_loader=[(images, labels)],
                      device=torch.device("cpu"), task=task, opts=opts, log=lines.append)
    assert LSKD(opts, task).param_groups(student, 0.01)[-1]["lr"] == 0.01
    opts.loss_weights_lr = 0.001
    method = LSKD(opts, task)
    groups = method.param_groups(student, 0.01)
    assert [g["lr"] for g in groups] == [0.01, 0.01, 0.01, 0.001]
    method.loss_weights.grad = torch.arange(9.0)
    torch.optim.SGD(groups[-1:], lr=0.01).step()
    assert method.loss_weights.detach().tolist() == pytest.approx([1 - 0.001 * i for i in range(9)])
    method.before_step(ctx)
    method.after_epoch(ctx, 2)
    weights = [9 * (1 - 0.001 * i) / (9 - 0.036) for i in range(9)]
    assert lines[-1:] == ["step 1 epoch 3: LSKD term weights " + ", ".join(
        f"{name} {w:.3f}" for name, w in zip(TERMS, weights))]
    opts.loss_weights_lr = -0.001
    with pytest.raises(ConfigError, match="--loss_weights_lr"):
        LSKD(opts, task)


def test_fixed_weights_skip_the_weight_objective():
    """--loss_weights_lr 0: w stays as loaded through a whole iteration and its gradient is the
    loss's own (the GradNorm objective is not computed, as nothing would use it)."""
    opts, task, teacher, student, images, labels = _tiny_setup()
    opts.loss_weights_lr = 0.0
    method = LSKD(opts, task)
    start = torch.linspace(0.5, 1.5, 9)
    method.load_state_dict({"loss_weights": start})
    method.before_step(StepContext(model=student, teacher=teacher, train_loader=[(images, labels)],
                                   device=torch.device("cpu"), task=task, opts=opts, log=lambda s: None))
    optimizer = torch.optim.SGD(method.param_groups(student, 0.01), lr=0.01, momentum=0.9, weight_decay=1e-4)
    with torch.no_grad():
        teacher_out = teacher(images)
    terms = method.loss({"image": images, "label": labels}, student(images), teacher_out)
    assert method._weight_grad is None
    sum(terms.values()).backward()
    own = method.loss_weights.grad.clone()
    method.after_backward(student)
    torch.testing.assert_close(method.loss_weights.grad, own)
    optimizer.step()
    torch.testing.assert_close(method.loss_weights.detach(), start)


def test_no_masks_is_plain_local_pod_on_every_layer_without_blanked_passes():
    """--no_masks: each MD term is lambda_l * mean_b d_l of the unmasked maps (the student's logits
    with the new class summed into background), MCD reads the unmasked head output, and the
    teacher never sees a blanked image."""
    from methods.pod import collapse_new_logits, pod_distance

    opts, task, teacher, student, images, labels = _tiny_setup()
    opts.no_masks, opts.mask_mode, opts.mask_distance = True, None, None  # masks' flags no longer needed
    method = LSKD(opts, task)
    counting = _CountingTeacher(teacher)
    method.before_step(StepContext(model=student, teacher=counting, train_loader=[(images, labels)],
                                   device=torch.device("cpu"), task=task, opts=opts, log=lambda s: None))
    counting.batch_sizes.clear()
    out = student(images)
    with torch.no_grad():
        teacher_out = teacher(images)
    pod_terms, mcd = method.masked_distillation(images, labels, out, teacher_out)
    assert counting.batch_sizes == []
    a = [*teacher_out["stages"], teacher_out["pre_logits"], teacher_out["logits_small"]]
    b = [*out["stages"], out["pre_logits"], collapse_new_logits(out["logits_small"], task.n_old)]
    factors = [0.01] * 5 + [0.0005]
    for term, ta, tb, factor in zip(pod_terms, a, b, factors, strict=True):
        torch.testing.assert_close(term, factor * pod_distance(ta.float(), tb.float(), [1, 2, 4]).mean())
    torch.testing.assert_close(mcd, 0.005 * context_distance(a[4], b[4], 20).mean())


def test_step_zero_is_plop_step_zero_and_bad_setups_fail_clearly():
    opts, task, teacher, student, images, labels = _tiny_setup()
    method = LSKD(opts, Task("shapes", "15-1", 0))
    assert not method.needs_teacher and len(method.param_groups(student, 0.01)) == 3
    out = student(images)
    terms = method.loss({"image": images, "label": labels}, out, None)
    assert list(terms) == ["ce"]
    opts.pod_logits = False
    with pytest.raises(ConfigError, match="--pod_logits"):
        LSKD(opts, task)
    opts.pod_logits, opts.mask_mode = True, None
    with pytest.raises(ConfigError, match="--sigmoid"):
        LSKD(opts, task)
