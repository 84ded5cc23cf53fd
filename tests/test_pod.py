"""Local POD (methods/pod.py) against hand computations and plain loops."""
import math

import pytest
import torch

from methods.pod import (
    collapse_new_logits,
    distilled_layers,
    local_pod_embedding,
    pod_distance,
    pod_loss,
    pod_schedule,
)
from utils.errors import ConfigError


def _loop_embedding(x, scales, square_reference=False):
    """Plain transcription of PLOP's ``_local_pod``; with ``square_reference`` the reference's
    k = W // s is used for both axes, otherwise rows use H // s and columns W // s."""
    b, _, h, w = x.shape
    parts = []
    for s in scales:
        kh = (w if square_reference else h) // s
        kw = w // s
        for i in range(s):
            for j in range(s):
                cell = x[..., i * kh:(i + 1) * kh, j * kw:(j + 1) * kw]
                parts.append(cell.mean(dim=3).reshape(b, -1))
                parts.append(cell.mean(dim=2).reshape(b, -1))
    return torch.cat(parts, dim=1)


def test_embedding_by_hand_on_a_2x2_map():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    emb = local_pod_embedding(x, [1, 2])
    # scale 1: row means 1.5, 3.5; column means 2, 3.  scale 2: every 1x1 cell twice.
    expected = sorted([1.5, 3.5, 2.0, 3.0] + [1.0, 2.0, 3.0, 4.0] * 2)
    assert emb.shape == (1, 12)
    assert sorted(emb.flatten().tolist()) == pytest.approx(expected)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 6, 10), (1, 2, 9, 5)])
def test_embedding_matches_loop_square_and_non_square(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    scales = [1, 2, 4]
    ours = local_pod_embedding(x, scales)
    loop = _loop_embedding(x, scales)
    assert ours.shape == loop.shape
    # the order of the entries differs; the multiset per image and the norm do not
    torch.testing.assert_close(ours.sort(dim=1).values, loop.sort(dim=1).values)
    if shape[2] == shape[3]:
        reference = _loop_embedding(x, scales, square_reference=True)
        torch.testing.assert_close(ours.sort(dim=1).values, reference.sort(dim=1).values)
    h, w = shape[2], shape[3]
    assert ours.shape[1] == shape[1] * sum(s * s * (h // s + w // s) for s in scales)


def test_distance_matches_loop_with_squared_maps():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 6, 10, generator=g)
    b = torch.randn(3, 4, 6, 10, generator=g)
    scales = [1, 2, 4]
    expected = torch.stack([
        (_loop_embedding(a[i:i + 1] ** 2, scales) - _loop_embedding(b[i:i + 1] ** 2, scales)).pow(2).sum().sqrt()
        for i in range(3)
    ])
    torch.testing.assert_close(pod_distance(a, b, scales, "pow"), expected)
    torch.testing.assert_close(pod_distance(a, b, scales, "none"),
                               (_loop_embedding(a, scales) - _loop_embedding(b, scales)).norm(dim=1))


def test_distance_by_hand_single_scale():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    # squared b is the same; row means (0.5, 0), column means (0.5, 0): norm sqrt(0.5)
    assert pod_distance(a, b, [1]).item() == pytest.approx(math.sqrt(0.5))


def test_collapse_sums_new_logits_into_background():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0]).view(1, 5, 1, 1)
    out = collapse_new_logits(x, n_old=3)
    assert out.flatten().tolist() == [31.0, 2.0, 3.0]


def test_distilled_layers_order_and_collapse():
    g = torch.Generator().manual_seed(2)
    out = {"stages": [torch.randn(1, c, 4, 4, generator=g) for c in (2, 3, 4, 5)],
           "pre_logits": torch.randn(1, 6, 4, 4, generator=g),
           "logits_small": torch.randn(1, 4, 4, 4, generator=g)}
    layers = distilled_layers(out, with_logits=True, n_old=3)
    assert [t.shape[1] for t in layers] == [2, 3, 4, 5, 6, 3]
    torch.testing.assert_close(layers[-1][:, 0], out["logits_small"][:, 0] + out["logits_small"][:, 3])
    assert len(distilled_layers(out, with_logits=False)) == 5
    dropped = distilled_layers(out, with_logits=True, n_old=3, new_logits="drop")[-1]  # --pod_new_logits drop
    torch.testing.assert_close(dropped, out["logits_small"][:, :3])


def test_pod_loss_weights_schedule_and_layer_average():
    g = torch.Generator().manual_seed(3)
    teacher = [torch.randn(2, 2, 4, 4, generator=g) for _ in range(3)]
    student = [torch.randn(2, 2, 4, 4, generator=g) for _ in range(3)]
    factors = [0.01, 0.0, 5e-4]  # the zero-factor layer is skipped but still counts in L
    schedule = pod_schedule(16, 1)
    assert schedule == pytest.approx(4.0)
    expected = 0.0
    for a, b, f in zip(teacher, student, factors):
        per_image = [(_loop_embedding(a[i:i + 1] ** 2, [1, 2, 4]) - _loop_embedding(b[i:i + 1] ** 2, [1, 2, 4])).norm()
                     for i in range(2)]
        expected += f * schedule * (sum(per_image) / 2)
    expected /= 3
    got = pod_loss(teacher, student, factors, [1, 2, 4], "pow", schedule)
    assert got.item() == pytest.approx(float(expected), rel=1e-5)


def test_map_smaller_than_scale_is_a_config_error():
    with pytest.raises(ConfigError, match="--spp_scales"):
        local_pod_embedding(torch.zeros(1, 1, 2, 2), [1, 4])


def _fake_outputs(g, n_classes):
    return {"stages": [torch.randn(2, c, 8, 8, generator=g) for c in (2, 3, 4, 4)],
            "pre_logits": torch.randn(2, 5, 8, 8, generator=g),
            "logits_small": torch.randn(2, n_classes, 8, 8, generator=g),
            "logits": torch.randn(2, n_classes, 16, 16, generator=g)}


def _loop_distance(a, b):
    return sum((_loop_embedding(a[i:i + 1] ** 2, [1, 2, 4]) - _loop_embedding(b[i:i + 1] ** 2, [1, 2, 4])).norm()
               for i in range(len(a))) / len(a)


@pytest.mark.parametrize("flags,logits_factor,schedule", [
    ([], 5e-4, math.sqrt(17 / 1)),
    (["--no_pod_schedule", "--pod_logits_factor", "0.2"], 0.2, 1.0),
])
def test_plop_pod_term_on_fake_outputs(flags, logits_factor, schedule):
    import argparser
    from dataset.tasks import Task
    from methods.plop import PLOP

    opts = argparser.parse_args(["--dataset", "shapes", "--task", "15-1", "--method", "PLOP", *flags])
    opts.pseudo = None
    method = PLOP(opts, Task("shapes", "15-1", 1))
    g = torch.Generator().manual_seed(4)
    teacher, student = _fake_outputs(g, 16), _fake_outputs(g, 17)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    terms = method.loss({"label": labels}, student, teacher)
    assert set(terms) == {"ce", "pod"}
    pairs = list(zip(teacher["stages"] + [teacher["pre_logits"]], student["stages"] + [student["pre_logits"]]))
    expected = sum(0.01 * _loop_distance(a, b) for a, b in pairs)
    collapsed = torch.cat([student["logits_small"][:, :1] + student["logits_small"][:, 16:],
                           student["logits_small"][:, 1:16]], dim=1)
    expected = expected + logits_factor * _loop_distance(teacher["logits_small"], collapsed)
    assert terms["pod"].item() == pytest.approx(float(expected) * schedule / 6, rel=1e-5)


def _direct_embedding(x, scales):
    """The reference's per-scale cell means, written out (no nesting)."""
    b, c, h, w = x.shape
    parts = []
    for s in scales:
        rows, cols = h // s, w // s
        cells = x[:, :, : s * rows, : s * cols].reshape(b, c, s, rows, s, cols)
        parts += [cells.mean(dim=5).flatten(1), cells.mean(dim=3).flatten(1)]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("shape,scales", [((16, 12), [1, 2, 4]), ((8, 8), [1, 2, 4]), ((12, 18), [1, 3]),
                                          ((10, 14), [1, 2, 4])])
def test_nested_embedding_equals_per_scale_means_with_gradients(shape, scales):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3 * sum(s * (shape[0] + shape[1]) for s in scales), dtype=torch.float64)
    ours, direct = local_pod_embedding(x, scales), _direct_embedding(x, scales)
    assert ours.shape == direct.shape
    torch.testing.assert_close(ours, direct)
    (g_ours,) = torch.autograd.grad((ours * weights[:, : ours.shape[1]]).sum(), x)
    (g_direct,) = torch.autograd.grad((direct * weights[:, : direct.shape[1]]).sum(), x)
    torch.testing.assert_close(g_ours, g_direct)


def test_distilled_layers_are_dense_fp32_copies_of_channels_last_maps():
    torch.manual_seed(0)
    maps = [torch.randn(2, c, s, s).bfloat16().contiguous(memory_format=torch.channels_last)
            for c, s in ((4, 8), (6, 4))]
    out = {"stages": maps, "pre_logits": maps[1], "logits_small": torch.randn(2, 3, 4, 4)}
    layers = distilled_layers(out, with_logits=True, n_old=2)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in layers)
    torch.testing.assert_close(layers[0], maps[0].float())
    torch.testing.assert_close(layers[3][:, 0], out["logits_small"][:, 0] + out["logits_small"][:, 2])
