"""LGKD (recent_methods.md §4): the label-guided KD against a plain loop, per-setting weights,
and its place in the PLOP loss."""
import argparse
import math

import pytest
import torch

from dataset.tasks import Task
from methods import classic, lgkd, plop


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _loop_lgkd(z, zt, y_small, prev_kd, novel_kd, alpha=1.0):
    """LGKD's targets built explicitly per pixel, as in the paper's Eq. (padding, transplant)."""
    b, c, h, w = z.shape
    n_old = zt.shape[1]
    total, count = 0.0, 0
    for i in range(b):
        for r in range(h):
            for s in range(w):
                label = int(y_small[i, r, s])
                if label == 255:
                    continue
                count += 1
                q = [math.exp(alpha * float(v)) for v in zt[i, :, r, s]]
                q = [v / sum(q) for v in q]
                den = sum(math.exp(float(v)) for v in z[i, :, r, s])
                log_p = [float(v) - math.log(den) for v in z[i, :, r, s]]
                target = q + [0.0] * (c - n_old)
                weight = prev_kd
                if label >= n_old:
                    target[label], target[0], weight = q[0], 0.0, novel_kd
                total += weight * sum(t * lp for t, lp in zip(target, log_p))
    return -total / count


def test_label_guided_kd_matches_loop_with_downsampled_labels():
    z, zt = _rand(2, 6, 2, 3), _rand(2, 4, 2, 3, seed=1)  # C_old 4, new classes 4 and 5
    labels = torch.full((2, 4, 6), 7, dtype=torch.long)  # full resolution; only even rows/cols are read
    small = torch.tensor([[[0, 4, 255], [5, 0, 0]], [[255, 0, 0], [4, 4, 0]]])
    labels[:, ::2, ::2] = small
    got = lgkd.label_guided_kd(z, zt, labels, prev_kd=5.0, novel_kd=0.5, alpha=1.5)
    assert got.item() == pytest.approx(_loop_lgkd(z, zt, small, 5.0, 0.5, alpha=1.5), rel=1e-5)


def test_zero_novel_weight_keeps_novel_pixels_in_the_mean():
    z, zt = _rand(1, 5, 1, 2), _rand(1, 3, 1, 2, seed=1)
    labels = torch.tensor([[[0, 4]]])
    both = lgkd.label_guided_kd(z, zt, labels, prev_kd=1.0, novel_kd=0.0)
    # the second pixel adds nothing to the sum but counts in the denominator: half the first value
    first = lgkd.label_guided_kd(z[..., :1], zt[..., :1], labels[:, :, :1], 1.0, 0.0)
    assert both.item() == pytest.approx(first.item() / 2, rel=1e-6)


def test_all_ignored_gives_zero():
    z, zt = _rand(1, 5, 1, 2), _rand(1, 3, 1, 2, seed=1)
    assert lgkd.label_guided_kd(z, zt, torch.full((1, 1, 2), 255), 1.0, 1.0).item() == 0.0


@pytest.mark.parametrize("dataset,task,expected", [
    ("voc", "15-1", (1.0, 0.0)), ("voc", "15-5", (5.0, 1.0)), ("voc", "19-1", (5.0, 0.5)),
    ("ade", "100-50", (1.0, 20.0)), ("ade", "100-10", (1.0, 1.0)), ("ade", "50-50", (2.0, 10.0)),
    ("shapes", "15-1", (1.0, 0.0)), ("voc", "10-1", (10.0, 2.0)),
])
def test_per_setting_weights(dataset, task, expected):
    assert lgkd.lgkd_weights(dataset, task, None, None) == expected


def test_explicit_weights_win():
    assert lgkd.lgkd_weights("voc", "15-1", 3.0, None) == (3.0, 0.0)
    assert lgkd.lgkd_weights("voc", "15-1", None, 0.25) == (1.0, 0.25)


def _opts(dataset="voc", **kw):
    p = argparse.ArgumentParser()
    for module in (classic, plop, lgkd):
        module.add_arguments(p)
    opts = p.parse_args([])
    preset = dict(lgkd.LGKD.preset)
    preset.update(lgkd.LGKD.preset_by_dataset.get(dataset, {}))
    for k, v in {**preset, **kw}.items():
        setattr(opts, k, v)
    opts.weight_decay = 1e-4
    return opts


def _outputs(n, seed, channels=(4, 4, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(1, c, 4, 4, generator=g) for c in channels]
    logits_small = torch.randn(1, n, 4, 4, generator=g)
    return {"stages": stages, "pre_logits": torch.randn(1, 4, 4, 4, generator=g), "logits_small": logits_small,
            "logits": logits_small.repeat_interleave(2, 2).repeat_interleave(2, 3), "body": stages[-1]}


def test_lgkd_replaces_the_logit_kd_in_plops_loss():
    task = Task("voc", "15-5s", 1)  # 15-1 step 1: C_old 16, new class 16
    method = lgkd.LGKD(_opts(), task)
    assert (method.prev_kd, method.novel_kd) == (1.0, 0.0) and method.needs_teacher
    method.thresholds = torch.full((17,), 1.0)  # what before_step computes: accept every pseudo-label
    student, teacher = _outputs(17, 0), _outputs(16, 1)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4, :4] = 16
    terms = method.loss({"label": labels}, student, teacher)
    assert {"ce", "pod", "lgkd"} <= set(terms) and not {"kd", "unkd"} & set(terms)
    expected = lgkd.label_guided_kd(student["logits_small"], teacher["logits_small"], labels, 1.0, 0.0)
    assert terms["lgkd"].item() == pytest.approx(expected.item())
    off = lgkd.LGKD(_opts(lgkd=False), task)  # without --lgkd, --loss_kd is PLOP's plain KD again
    off.thresholds = method.thresholds
    assert "kd" in off.loss({"label": labels}, student, teacher)


def test_presets_follow_plop_per_dataset():
    assert lgkd.LGKD.preset["loss_kd"] == 1.0 and lgkd.LGKD.preset["lgkd"] is True
    assert lgkd.LGKD.preset["pod_factor"] == 0.01 and lgkd.LGKD.preset["init_balanced"] is True
    assert lgkd.LGKD.preset_by_dataset["ade"] == {"pod_factor": 0.001, "pod_logits_factor": 1e-5}
