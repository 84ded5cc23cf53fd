"""PLOP's entropy pseudo-labels (methods/pseudo.py): entropy, histograms, both medians,
relabelling and the adaptive factor, against hand computations and plain loops."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.pseudo import (
    adaptive_factor,
    entropy_histogram,
    entropy_thresholds,
    floor_thresholds,
    histogram_median,
    max_normalized_entropy,
    normalized_entropy,
    pseudo_label,
    reference_median,
)


def _reference_find_median_loop(hist):
    """Line-by-line transcription of PLOP ``find_median``'s scan (float32 like the reference)."""
    k, nb = hist.shape
    out = torch.zeros(k, dtype=torch.float32)
    for c in range(k):
        total = hist[c].sum()
        if total <= 0:
            continue
        half = total / 2
        running_sum = 0.0
        for lower_border in range(nb):
            lower_border = lower_border / nb
            bin_index = int(lower_border * nb)
            if half >= running_sum and half <= (running_sum + hist[c, bin_index]):
                break
            running_sum += lower_border * nb
        out[c] = lower_border + ((half - running_sum) / hist[c, bin_index].sum()) * (1 / nb)
    return out


def test_normalized_entropy_by_hand():
    probs = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    # mean_c -p ln p = 0.5 ln 2; / ln 2 (C_old = 2) = 0.5; / ln N_seen with N_seen = 4
    expected = 0.5 / math.log(4)
    assert normalized_entropy(probs, n_seen=4).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.full((1, 5, 1, 1), 0.2)
    assert normalized_entropy(uniform, 7).item() == pytest.approx(max_normalized_entropy(5, 7), rel=1e-5)


def test_histogram_counts_match_loop():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(500, generator=g) * 1.2 - 0.1  # some below 0 and above the range
    classes = torch.randint(0, 4, (500,), generator=g)
    hist = entropy_histogram(values, classes, n_classes=5, bins=10, max_value=1.0)
    expected = torch.zeros(5, 10, dtype=torch.long)
    for v, c in zip(values.tolist(), classes.tolist()):
        expected[c, min(max(int(v * 10), 0), 9)] += 1
    assert torch.equal(hist, expected)


def test_reference_median_all_in_bin_zero_is_interpolated_in_bin_zero():
    hist = torch.zeros(1, 100, dtype=torch.long)
    hist[0, 0] = 10
    assert reference_median(hist).item() == pytest.approx(0.005)  # 0.01 * (10/2) / 10


def test_reference_median_stops_on_a_bin_count_not_on_the_cumulative_count():
    hist = torch.zeros(1, 100, dtype=torch.long)
    hist[0, 0], hist[0, 1] = 2, 10
    # half = 6 > hist[0] = 2; the running sum adds the bin *index* 0, so bin 1 stops with
    # running 0: 0.01 + 6/10 * 0.01 (the true histogram median would be 0.014)
    assert reference_median(hist).item() == pytest.approx(0.016)
    assert histogram_median(hist, 1.0).item() == pytest.approx(0.014)


def test_reference_median_reads_bin_28_at_step_29():
    hist = torch.zeros(1, 100, dtype=torch.long)
    hist[0, 28] = 1000
    hist[0, 99] = 1780  # half = 1390: step 28 misses (378 + 1000), step 29 reads bin 28 again
    running_before_29 = sum((i / 100) * 100 for i in range(29))  # 406 = 0 + 1 + ... + 28
    expected = 0.29 + (1390 - running_before_29) / 1000 * 0.01
    assert reference_median(hist).item() == pytest.approx(expected, rel=1e-6)
    assert int((29 / 100) * 100) == 28  # the quirk itself


def test_reference_median_falls_through_to_the_last_bin():
    hist = torch.zeros(2, 100, dtype=torch.long)
    hist[0, 50] = 10   # half 5 is below no running sum + count: the loop ends at i = 99
    hist[1, 50] = 9000  # half 4500 > running sums before 50 ... but 4500 <= 1225 + 9000 stops
    medians = reference_median(hist)
    assert medians[0].item() == -math.inf  # (5 - 4950) / hist[99] = -inf
    running_before_50 = sum((i / 100) * 100 for i in range(50))
    assert medians[1].item() == pytest.approx(0.5 + (4500 - running_before_50) / 9000 * 0.01, rel=1e-6)


def test_reference_median_matches_the_reference_loop_on_random_histograms():
    g = torch.Generator().manual_seed(4)
    hist = torch.zeros(12, 100, dtype=torch.long)
    for c in range(1, 12):  # row 0 stays empty
        bins = torch.randint(0, 100, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        hist[c, bins] = torch.randint(1, 5000, bins.shape, generator=g)
    hist[5, :3] = torch.tensor([100, 50, 20])
    torch.testing.assert_close(reference_median(hist), _reference_find_median_loop(hist), equal_nan=True)


def test_floor_follows_python_max_semantics():
    medians = torch.tensor([float("nan"), -math.inf, math.inf, 0.0005, 0.002, 0.0])
    floored = floor_thresholds(medians, 0.001)
    expected = [max(torch.tensor(m), 0.001) for m in medians.tolist()]  # the reference's loop
    assert math.isnan(floored[0].item()) and math.isnan(float(expected[0]))
    assert floored[1:].tolist() == pytest.approx([float(e) for e in expected[1:]])


def test_histogram_median_is_the_true_median_up_to_a_bin():
    g = torch.Generator().manual_seed(5)
    values = torch.rand(10001, generator=g) ** 3 * 0.02
    hist = entropy_histogram(values, torch.zeros_like(values, dtype=torch.long), 1, 4096, 0.02)
    true_median = values.median().item()
    assert histogram_median(hist, 0.02).item() == pytest.approx(true_median, abs=0.02 / 4096)
    assert histogram_median(torch.zeros(1, 8, dtype=torch.long), 1.0).item() == 0.0


def test_pseudo_label_relabels_confident_background_and_ignores_the_rest():
    logits = torch.tensor([[[[0.0, 0.0, 0.0, 0.0]], [[6.0, 0.1, 6.0, 0.0]]]])  # (1, 2, 1, 4)
    labels = torch.tensor([[[0, 0, 2, 255]]])  # bg, bg, new class 2, ignored
    n_old, n_seen = 2, 3

    def entropy_of(l0, l1):
        p = torch.softmax(torch.tensor([l0, l1]), 0)
        return -(p * torch.log(p + 1e-8)).mean().item() / math.log(2) / math.log(3)

    confident, uncertain = entropy_of(0.0, 6.0), entropy_of(0.0, 0.1)
    assert confident < uncertain
    tau = (confident + uncertain) / 2
    thresholds = torch.full((n_seen,), tau)
    result = pseudo_label(labels, logits, thresholds, n_old, n_seen)
    assert result.labels.tolist() == [[[1, 255, 2, 255]]]
    assert result.background.tolist() == [[[True, True, False, False]]]
    assert result.confident.tolist() == [[[True, False, False, False]]]
    # thresholds are per argmax class: a tau_1 below pixel A's entropy rejects it too
    result = pseudo_label(labels, logits, torch.tensor([1.0, confident / 2, 1.0]), n_old, n_seen)
    assert result.labels.tolist() == [[[255, 255, 2, 255]]]


def test_adaptive_factor_counts_and_images_without_background():
    background = torch.tensor([[[True, True, True, False]], [[False, False, False, False]]])
    confident = torch.tensor([[[True, False, True, False]], [[False, False, False, False]]])
    factor = adaptive_factor(confident, background)
    assert factor[0].item() == pytest.approx(2 / 3, rel=1e-5)
    assert factor[1].item() == 0.0 and torch.isfinite(factor).all()


class _FixedTeacher(nn.Module):
    """Returns the logits stored for each image (looked up by the image's first value)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return {"logits": self.logits[images[:, 0, 0, 0].long()]}


def test_threshold_pass_equals_histogram_of_all_background_pixels():
    g = torch.Generator().manual_seed(6)
    n_old, n_seen, n_images, size = 3, 5, 6, 24
    logits = torch.randn(n_images, n_old, size, size, generator=g) * 3
    labels = torch.randint(0, n_seen, (n_images, size, size), generator=g)
    labels[labels >= n_old] = 0  # masked labels: 0 or new classes
    labels[:, 0, :] = 4
    images = torch.arange(n_images).float().view(-1, 1, 1, 1).expand(-1, 3, size, size)
    batches = [(images[i:i + 2], labels[i:i + 2]) for i in range(0, n_images, 2)]
    probs = torch.softmax(logits, 1)
    ent, pred, bg = normalized_entropy(probs, n_seen), probs.argmax(1), labels == 0

    got = entropy_thresholds(_FixedTeacher(logits), batches, n_old, n_seen, 0.001, "reference")
    hist = torch.zeros(n_seen, 100, dtype=torch.long)
    for v, c in zip(ent[bg].tolist(), pred[bg].tolist()):
        hist[c, min(int(v * 100), 99)] += 1
    torch.testing.assert_close(got, floor_thresholds(_reference_find_median_loop(hist), 0.001), equal_nan=True)

    got = entropy_thresholds(_FixedTeacher(logits), batches, n_old, n_seen, 0.0, "exact")
    width = max_normalized_entropy(n_old, n_seen) / 4096
    for c in range(n_seen):
        values = ent[bg & (pred == c)]
        expected = values.quantile(0.5).item() if values.numel() else 0.0
        assert got[c].item() == pytest.approx(expected, abs=2 * width), c
    assert (got[n_old:] == 0).all()  # never predicted by the teacher


def _plop_opts(**kw):
    import argparser

    opts = argparser.parse_args(["--dataset", "shapes", "--task", "15-1", "--method", "PLOP"])
    for k, v in kw.items():
        setattr(opts, k, v)
    return opts


def test_plop_loss_uses_pseudo_labels_and_per_image_factor():
    from dataset.tasks import Task
    from methods.base import StepContext
    from methods.plop import PLOP

    task = Task("shapes", "15-1", 1)  # n_old 16, n_seen 17
    method = PLOP(_plop_opts(pod=None), task)
    g = torch.Generator().manual_seed(7)
    teacher_logits = torch.randn(2, 16, 3, 4, generator=g) * 4
    teacher_logits[:, 3, 0, 0] = 50.0  # confident pixel (0, 0): class 3
    logits = torch.randn(2, 17, 3, 4, generator=g)
    labels = torch.zeros(2, 3, 4, dtype=torch.long)
    labels[0, 2, :] = 16
    labels[1] = 16                     # image 1 has no background at all
    labels[1, 0, 0] = 255

    loader = [(torch.zeros(2, 3, 3, 4), labels)]
    ctx = StepContext(model=None, teacher=_FixedTeacher(teacher_logits), train_loader=loader,
                      device=torch.device("cpu"), task=task, opts=None, log=lambda s: None)
    method.before_step(ctx)  # real thresholds from one pass
    assert method.thresholds.shape == (17,)

    probs = torch.softmax(teacher_logits, 1)
    entropy = -(probs * torch.log(probs + 1e-8)).mean(1) / math.log(16) / math.log(17)
    expected_labels = labels.clone()
    confident = torch.zeros(2)
    for b in range(2):
        for y in range(3):
            for x in range(4):
                if labels[b, y, x] < 16:
                    c = int(probs[b, :, y, x].argmax())
                    ok = entropy[b, y, x] < method.thresholds[c]
                    expected_labels[b, y, x] = c if ok else 255
                    confident[b] += float(ok)
    assert expected_labels[0, 0, 0] == 3
    nu = torch.tensor([confident[0] / (8 + 1e-6), 0.0])
    per_pixel = F.cross_entropy(logits, expected_labels, ignore_index=255, reduction="none")
    expected = (per_pixel * nu.view(2, 1, 1)).mean()

    terms = method.loss({"label": labels}, {"logits": logits}, {"logits": teacher_logits})
    assert list(terms) == ["ce"]
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(terms["ce"])

    no_factor = PLOP(_plop_opts(pod=None, classif_adaptive_factor=False), task)
    no_factor.thresholds = method.thresholds
    plain = no_factor.loss({"label": labels}, {"logits": logits}, {"logits": teacher_logits})["ce"]
    assert plain.item() == pytest.approx(per_pixel.mean().item(), rel=1e-5)
