"""REMINDER (methods/reminder.py): prototypes, CSW weights and loss against plain loops, the
method state, and a 2-process run where thresholds and prototypes agree across ranks."""
import math
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo import run_on_gloo
from torch import nn

from dataset.tasks import Task
from methods.base import MethodStateError, StepContext
from methods.pseudo import entropy_thresholds
from methods.reminder import (
    Reminder,
    class_feature_sums,
    class_similarity_weights,
    csw_distillation,
    step_prototypes,
)


def _naive_sums(features, labels, first, count):
    """REMINDER's compute_prototype: upsample (align_corners=True), then sum per class."""
    up = F.interpolate(features, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    pixels = up.permute(0, 2, 3, 1)
    sums = torch.stack([pixels[labels == first + k].sum(dim=0) for k in range(count)])
    counts = torch.tensor([float((labels == first + k).sum()) for k in range(count)])
    return sums, counts


@pytest.mark.parametrize("feature_size,label_size", [((4, 3), (13, 11)), ((5, 5), (20, 20)), ((1, 1), (3, 4))])
def test_class_sums_equal_upsample_then_sum(feature_size, label_size):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, *feature_size, generator=g)
    labels = torch.randint(0, 6, (2, *label_size), generator=g)
    labels[0, 0, :] = 255
    sums, counts = class_feature_sums(features, labels, first=2, count=3)
    expected_sums, expected_counts = _naive_sums(features, labels, 2, 3)
    torch.testing.assert_close(sums, expected_sums, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == expected_counts.tolist()


def test_similarity_weights_by_hand_and_delta_cut():
    new = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    old = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    cos = torch.tensor([[1.0, 0.0, c], [0.0, 1.0, c]])
    expected = torch.softmax(cos, dim=1)
    torch.testing.assert_close(class_similarity_weights(new, old, delta=0.0), expected)
    cut = class_similarity_weights(new, old, delta=1.0)  # entries below 1/3 are dropped
    torch.testing.assert_close(cut, torch.where(expected < 1 / 3, torch.zeros_like(expected), expected))
    assert (cut == 0).sum() == 2 and (expected[expected < 1 / 3]).numel() == 2


def test_csw_loss_equals_plain_loop_over_new_pixels():
    g = torch.Generator().manual_seed(1)
    n_old, n_new, t = 3, 2, 3.0
    logits = torch.randn(2, n_old + n_new, 4, 5, generator=g)
    teacher = torch.randn(2, n_old, 4, 5, generator=g)
    labels = torch.randint(0, n_old + n_new, (2, 4, 5), generator=g)
    labels[1, 0, :] = 255
    weights = torch.rand(n_new, n_old, generator=g)
    for first in (0, 1):  # 1: --csw_foreground_only, background's channel left out of both sides
        total, count = 0.0, 0
        for b in range(2):
            for y in range(4):
                for x in range(5):
                    label = int(labels[b, y, x])
                    if n_old <= label < 255:
                        q = torch.softmax(teacher[b, first:, y, x] / t, 0) * weights[label - n_old, first:] + 1e-7
                        logp = torch.log_softmax(logits[b, first:n_old, y, x] / t, 0)
                        total += float(-(q * logp).sum())
                        count += 1
        expected = t * t * total / count
        got = csw_distillation(logits, teacher, labels, weights, n_old, t, first=first)
        assert got.item() == pytest.approx(expected, rel=1e-5)
    no_new = torch.zeros_like(labels)
    assert csw_distillation(logits, teacher, no_new, weights, n_old, t).item() == 0.0


def test_csw_gradient_reaches_student_only():
    logits = torch.randn(1, 4, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), 3)
    csw_distillation(logits, teacher, labels, torch.ones(1, 3), 3).backward()
    assert logits.grad.abs().sum() > 0 and teacher.grad is None


class _HeadOnly(nn.Module):
    """A 'model' whose head output is a fixed map per image (indexed by the image's first value)."""

    def __init__(self, features):
        super().__init__()
        self.features = features
        self.eval_calls = 0

    def forward(self, images):
        self.eval_calls += int(not self.training)
        return {"pre_logits": self.features[images[:, 0, 0, 0].long()]}


def _image_ids(n, size):
    return torch.arange(n).float().view(-1, 1, 1, 1).expand(-1, 3, *size)


def test_step_prototypes_average_batch_prototypes_over_batches_containing_the_class():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(4, 3, 2, 2, generator=g)
    labels = torch.zeros(4, 6, 6, dtype=torch.long)
    labels[0, :3] = 5
    labels[3, :, :2] = 5   # class 5 in batches 0 and 1, class 6 in batch 1 only
    labels[2, 1:4, 1:4] = 6
    images = _image_ids(4, (6, 6))
    batches = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    model = _HeadOnly(features).train()
    protos = step_prototypes(model, batches, first=5, count=3, autocast=torch.enable_grad,
                             all_reduce=lambda t: t)
    assert model.training and model.eval_calls == 2  # evaluated in eval mode, mode restored
    per_batch = [_naive_sums(features[i:i + 2], labels[i:i + 2], 5, 3) for i in (0, 2)]
    means = [s / c.clamp(min=1)[:, None] for s, c in per_batch]
    torch.testing.assert_close(protos[0], (means[0][0] + means[1][0]) / 2)  # two batches
    torch.testing.assert_close(protos[1], means[1][1])                      # one batch
    assert protos[2].abs().sum() == 0                                        # never seen


def _opts(**kw):
    base = dict(loss_kd=0.0, loss_de=0.0, alpha=1.0, unce=False, unkd=False, init_balanced=True, bce=False,
                freeze=False, icarl=False, icarl_importance=1.0, icarl_disjoint=False, icarl_bkg=False,
                regularizer=None, reg_importance=1.0, reg_alpha=0.9, reg_no_normalize=False, reg_iterations=10,
                pod="local", pod_factor=0.01, pod_logits=True, pod_logits_factor=5e-4, pod_prepro="pow",
                pod_new_logits="sum", spp_scales=[1, 2, 4], no_pod_schedule=False, pseudo="entropy", threshold=0.001,
                classif_adaptive_factor=True, pseudo_median="reference", csw_kd=0.5, delta_csw=0.0,
                weight_decay=1e-4)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_missing_or_mismatched_prototypes_are_method_state_errors():
    Reminder(_opts(), Task("voc", "15-1", 0)).load_state_dict(None)  # step 0 needs nothing
    with pytest.raises(MethodStateError, match="prototypes"):
        Reminder(_opts(), Task("voc", "15-1", 1)).load_state_dict(None)
    with pytest.raises(MethodStateError, match="16 old classes"):
        Reminder(_opts(), Task("voc", "15-1", 1)).load_state_dict({"prototypes": torch.zeros(5, 8)})
    Reminder(_opts(csw_kd=0.0), Task("voc", "15-1", 1)).load_state_dict(None)  # no CSW, no state


def test_after_step_keeps_old_rows_and_appends_this_steps_classes():
    task = Task("voc", "15-1", 1)  # old 0..15, new 16
    method = Reminder(_opts(), task)
    old = torch.randn(16, 3)
    method.load_state_dict({"prototypes": old})
    features = torch.randn(2, 3, 2, 2)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[1, :2] = 16
    ctx = StepContext(model=_HeadOnly(features), teacher=None, train_loader=[(_image_ids(2, (4, 4)), labels)],
                      device=torch.device("cpu"), task=task, opts=None, log=lambda s: None)
    method.after_step(ctx)
    state = method.state_dict()["prototypes"]
    assert state.shape == (17, 3)
    torch.testing.assert_close(state[:16], old)
    sums, counts = _naive_sums(features, labels, 16, 1)
    torch.testing.assert_close(state[16], sums[0] / counts[0])


# --- two processes: thresholds and prototypes agree across ranks -----------------------------------


class _Teacher(nn.Module):
    """Fixed logits and head features per image id, like a frozen model."""

    def __init__(self, logits, features):
        super().__init__()
        self.logits, self.features = logits, features

    def forward(self, images):
        ids = images[:, 0, 0, 0].long()
        return {"logits": self.logits[ids], "pre_logits": self.features[ids]}


def _data():
    g = torch.Generator().manual_seed(3)
    n, n_old = 8, 3
    logits = torch.randn(n, n_old, 8, 8, generator=g) * 4
    features = torch.randn(n, 4, 2, 2, generator=g)
    labels = torch.randint(0, 5, (n, 8, 8), generator=g)
    labels[labels.eq(1) | labels.eq(2)] = 0
    return _image_ids(n, (8, 8)), labels, _Teacher(logits, features)


def _statistics(batches, all_reduce):
    images, labels, model = _data()
    thresholds = {mode: entropy_thresholds(model, batches, 3, 5, 0.001, mode, all_reduce=all_reduce)
                  for mode in ("reference", "exact")}
    prototypes = step_prototypes(model, batches, first=3, count=2, autocast=torch.enable_grad, all_reduce=all_reduce)
    return {**thresholds, "prototypes": prototypes}


def _shard(rank, world):
    images, labels, _ = _data()
    return [(images[i:i + 2], labels[i:i + 2]) for i in range(2 * rank, 8, 2 * world)]


def _worker(rank, world, out_dir):
    def all_reduce(t):
        dist.all_reduce(t)
        return t

    # thresholds need the batches twice (two modes), so materialise the shard
    torch.save(_statistics(_shard(rank, world), all_reduce), os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_agree_with_each_other_and_with_one_process(tmp_path):
    run_on_gloo(_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _statistics(_shard(0, 1), lambda t: t)
    for key in single:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][key], single[key], equal_nan=True)
    # each rank alone would disagree: the reduction matters
    alone = _statistics(_shard(0, 2), lambda t: t)
    assert not torch.allclose(alone["prototypes"], single["prototypes"])
