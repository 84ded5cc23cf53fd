"""SDR (recent_methods.md §2): loss terms against plain loops, prototype running means (also over
2 gloo processes), the reference-quirk variants, state across steps."""
import argparse

import pytest
import torch
import torch.distributed as dist

from dataset.tasks import Task
from methods import MethodStateError, StepContext, classic, sdr, sdr_terms
from gloo import run_on_gloo


def _opts(preset=True, **kw):
    p = argparse.ArgumentParser()
    classic.add_arguments(p)
    sdr.add_arguments(p)
    opts = p.parse_args([])
    opts.overlap, opts.weight_decay = False, 1e-4
    if preset:
        for k, v in sdr.SDR.preset.items():
            setattr(opts, k, v)
    for k, v in kw.items():
        setattr(opts, k, v)
    return opts


def _pixels_of(features, labels, c):
    """Feature vectors of the pixels labelled c, by a plain loop."""
    b, _, h, w = features.shape
    return [features[i, :, y, x] for i in range(b) for y in range(h) for x in range(w) if labels[i, y, x] == c]


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


LABELS = torch.tensor([[[0, 1, 1, 255], [2, 2, 0, 1]], [[2, 0, 0, 1], [255, 2, 2, 2]]])  # (2, 2, 4)


# --- per-class statistics and running means ------------------------------------------------------


def test_downsample_labels_is_nearest():
    labels = torch.arange(16).view(1, 4, 4)
    assert sdr_terms.downsample_labels(labels, (2, 2)).tolist() == [[[0, 2], [8, 10]]]


def test_class_statistics_match_loops():
    f = _rand(2, 3, 2, 4)
    protos = _rand(3, 3, seed=1)
    classes = torch.tensor([0, 2])
    sums, counts, sq = sdr_terms.class_statistics(f, LABELS, classes, protos)
    for k, c in enumerate(classes.tolist()):
        rows = _pixels_of(f, LABELS, c)
        torch.testing.assert_close(sums[k], torch.stack(rows).sum(0))
        assert counts[k].item() == len(rows)
        assert sq[k].item() == pytest.approx(sum(float(((r - protos[c]) ** 2).sum()) for r in rows), rel=1e-5)


def test_reference_gather_scrambles_batches_but_not_a_single_image():
    f = _rand(2, 3, 2, 4)
    mask = LABELS == 2
    intended = torch.stack(_pixels_of(f, LABELS, 2))
    one = sdr_terms.reference_class_rows(f[:1], mask[:1], channels_first=True)
    torch.testing.assert_close(one, torch.stack(_pixels_of(f[:1], LABELS[:1], 2)))
    scrambled = sdr_terms.reference_class_rows(f, mask, channels_first=True)
    assert scrambled.shape == intended.shape and not torch.allclose(scrambled, intended)
    # what the reference reads: values listed image by image, channel by channel, then cut in C rows
    values = [f[i, ch, y, x] for i in range(2) for ch in range(3) for y in range(2) for x in range(4) if mask[i, y, x]]
    n = len(values) // 3
    torch.testing.assert_close(scrambled, torch.tensor(values).view(3, n).t())
    torch.testing.assert_close(sdr_terms.reference_class_rows(f, mask, channels_first=False), torch.tensor(values).view(n, 3))


def test_running_means_over_two_batches():
    method = sdr.SDR(_opts(), Task("voc", "15-5", 0))  # disjoint step 0: background is tracked too
    batches = [(_rand(2, 3, 2, 4, seed=s), LABELS if s == 0 else LABELS.flip(0)) for s in (0, 1)]
    for f, y in batches:
        method._update_prototypes(f, y)
    for c in (0, 1, 2):
        rows = [r for f, y in batches for r in _pixels_of(f, y, c)]
        torch.testing.assert_close(method.prototypes[c], torch.stack(rows).mean(0))
        assert method.counts[c].item() == len(rows)
    assert method.counts[3:].sum() == 0 and torch.count_nonzero(method.prototypes[3:]) == 0


@pytest.mark.parametrize("task,overlap", [(Task("voc", "15-5", 0), True), (Task("voc", "15-5", 1), False)])
def test_background_is_not_tracked_in_overlap_or_after_step_0(task, overlap):
    method = sdr.SDR(_opts(overlap=overlap), task)
    if task.step:
        method.load_state_dict({"prototypes": torch.zeros(16, 3), "count_features": torch.zeros(16, dtype=torch.long)})
    new = task.new_classes[1] if task.step else 1  # a class of this step
    labels = torch.where(LABELS == 1, torch.full_like(LABELS, new), LABELS)
    method._update_prototypes(_rand(2, 3, 2, 4), labels)
    assert method.counts[0] == 0 and method.counts[new] == 4 and method.counts[2] == 6


def test_quirk_drops_the_first_class_present_instead_of_background():
    method = sdr.SDR(_opts(overlap=True, sdr_reference_quirks=True), Task("voc", "15-5", 0))
    labels = torch.tensor([[[1, 1], [2, 255]]])  # no background: the reference drops class 1
    method._update_prototypes(_rand(1, 3, 2, 2), labels)
    assert method.counts.tolist()[:3] == [0, 0, 1]


def _ddp_worker(rank, world, out_path):
    method = sdr.SDR(_opts(), Task("voc", "15-5", 0))
    method.before_step(StepContext(model=None, teacher=None, train_loader=None, device=torch.device("cpu"),
                                   task=method.task, opts=method.opts, all_reduce=_sum_over_ranks))
    for seed in (0, 1):
        f, y = _rand(2, 3, 2, 4, seed=seed), (LABELS if seed == 0 else LABELS.flip(0))
        shard = slice(rank, rank + 1)
        out = {"logits": _rand(2, 16, 2, 4, seed=7)[shard], "body": f[shard]}
        method.loss({"label": y[shard]}, out, None)
    torch.save(method.state_dict(), f"{out_path}.{rank}")


def _sum_over_ranks(t):
    dist.all_reduce(t)
    return t


def test_prototypes_over_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    out = str(tmp_path / "proto")
    run_on_gloo(_ddp_worker, 2, out)
    states = [torch.load(f"{out}.{r}") for r in (0, 1)]
    torch.testing.assert_close(states[0]["prototypes"], states[1]["prototypes"])
    assert torch.equal(states[0]["count_features"], states[1]["count_features"])
    batches = [(_rand(2, 3, 2, 4, seed=s), LABELS if s == 0 else LABELS.flip(0)) for s in (0, 1)]
    for c in (0, 1, 2):
        rows = [r for f, y in batches for r in _pixels_of(f, y, c)]
        torch.testing.assert_close(states[0]["prototypes"][c], torch.stack(rows).mean(0))
        assert states[0]["count_features"][c].item() == len(rows)


# --- the four terms ------------------------------------------------------------------------------


def test_prototype_matching_matches_loops():
    f = _rand(2, 3, 2, 4)
    protos = _rand(16, 3, seed=1)
    labels = torch.tensor([[[0, 0, 16, 255], [0, 0, 0, 0]], [[0, 17, 0, 0], [0, 0, 0, 0]]])
    teacher_pred = torch.tensor([[[3, 5, 3, 3], [0, 3, 5, 5]], [[5, 5, 0, 3], [3, 3, 0, 0]]])
    teacher_logits = torch.nn.functional.one_hot(teacher_pred, 16).permute(0, 3, 1, 2).float()
    pseudo = torch.where(labels == 0, teacher_pred, torch.zeros_like(teacher_pred))
    per_class = {c: _pixels_of(f, pseudo, c) for c in (3, 5)}
    expected_sum_after = sum(float(((torch.stack(r).mean(0) - protos[c]) ** 2).mean())
                             for c, r in per_class.items()) / 2
    got = sdr_terms.prototype_matching(f, labels, teacher_logits, protos, sum_after=True)
    assert got.item() == pytest.approx(expected_sum_after, rel=1e-5)
    pixels = [(r, c) for c, rows in per_class.items() for r in rows]
    expected_pixel = sum(float(((r - protos[c]) ** 2).mean()) for r, c in pixels) / len(pixels)
    got = sdr_terms.prototype_matching(f, labels, teacher_logits, protos, sum_after=False)
    assert got.item() == pytest.approx(expected_pixel, rel=1e-5)


def test_feature_clustering_and_separation_match_loops():
    f = _rand(2, 3, 2, 4)
    protos = _rand(3, 3, seed=1)
    classes = torch.tensor([0, 1, 2])
    sums, counts, sq = sdr_terms.class_statistics(f, LABELS, classes, protos)
    mse = [float(torch.stack([((r - protos[c]) ** 2).mean() for r in _pixels_of(f, LABELS, c)]).mean())
           for c in range(3)]
    assert sdr_terms.feature_clustering(sums, counts, sq, 3).item() == pytest.approx(sum(mse) / 3, rel=1e-5)
    loop = 0.0
    for m in mse:  # the reference's loop, division inside
        loop = (loop + m) / 3
    assert sdr_terms.feature_clustering(sums, counts, sq, 3, quirks=True).item() == pytest.approx(loop, rel=1e-5)
    means = [torch.stack(_pixels_of(f, LABELS, c)).mean(0) for c in range(3)]
    inv = [1 / float((means[a] - means[b]).norm()) for a in range(3) for b in range(3) if a != b]
    assert sdr_terms.cluster_separation(sums, counts).item() == pytest.approx(sum(inv) / len(inv), rel=1e-5)
    assert sdr_terms.cluster_separation(sums[:1], counts[:1]).item() == 0.0  # a single class: nothing finite


def test_feature_sparsification_matches_loops():
    f = _rand(2, 3, 2, 4) + 0.1
    got = sdr_terms.feature_sparsification(f, LABELS, "max_maskedforclass", "exponential")
    group_max = {c: max(float(v.max()) for v in _pixels_of(f, LABELS, c)) for c in (0, 1, 2, 255)}
    total = 0.0
    for i in range(2):
        for y in range(2):
            for x in range(4):
                v = f[i, :, y, x] / (group_max[int(LABELS[i, y, x])] + 1e-15)
                total += float(v.exp().sum() / (v.sum() + 1e-15))
    assert got.item() == pytest.approx(total / 16, rel=1e-5)
    got = sdr_terms.feature_sparsification(f, LABELS, "L1", "squared")
    v = f / f.sum(1, keepdim=True)
    assert got.item() == pytest.approx(float(((v ** 2).sum(1) / v.sum(1)).mean()), rel=1e-5)


# --- the method ----------------------------------------------------------------------------------


def _step1_method(**kw):
    method = sdr.SDR(_opts(**kw), Task("voc", "15-5", 1))
    method.load_state_dict({"prototypes": _rand(16, 3, seed=4), "count_features": torch.full((16,), 5)})
    return method


def test_step1_terms_and_weights():
    method = _step1_method()
    assert method.needs_teacher
    labels = torch.tensor([[[0, 16, 16, 255], [0, 0, 17, 0]]])
    f = _rand(1, 3, 2, 4)
    student = {"logits": _rand(1, 21, 2, 4, seed=2), "body": f}
    teacher = {"logits": _rand(1, 16, 2, 4, seed=3), "body": f}
    before = method.prototypes.clone()
    terms = method.loss({"label": labels}, student, teacher)
    assert set(terms) == {"unce", "unkd", "pm", "fc", "sep", "fs"}
    assert torch.equal(method.prototypes[:16], before[:16])  # old prototypes are frozen
    torch.testing.assert_close(method.prototypes[16], torch.stack(_pixels_of(f, labels, 16)).mean(0))
    protos = method.prototypes.clone()
    classes = torch.tensor([0, 16, 17])  # L_fc includes background by default
    sums, counts, sq = sdr_terms.class_statistics(f, labels, classes, protos)
    assert terms["fc"].item() == pytest.approx(1e-3 * sdr_terms.feature_clustering(sums, counts, sq, 3).item(), rel=1e-6)
    no_bg = _step1_method(lfc_nobgr=True).loss({"label": labels}, student, teacher)
    sums, counts, sq = sdr_terms.class_statistics(f, labels, classes[1:], protos)
    assert no_bg["fc"].item() == pytest.approx(1e-3 * sdr_terms.feature_clustering(sums, counts, sq, 3).item(), rel=1e-6)


def test_state_round_trip_and_missing_prototypes():
    method = sdr.SDR(_opts(), Task("voc", "15-5", 0))
    method.loss({"label": LABELS}, {"logits": _rand(2, 16, 2, 4), "body": _rand(2, 3, 2, 4)}, None)
    state = method.state_dict()
    assert state["prototypes"].shape == (16, 3)
    nxt = sdr.SDR(_opts(), Task("voc", "15-5", 1))
    nxt.load_state_dict(state)
    assert nxt.prototypes.shape == (21, 3) and torch.equal(nxt.prototypes[:16], state["prototypes"])
    assert nxt.counts[16:].sum() == 0
    with pytest.raises(MethodStateError, match="prototypes"):
        sdr.SDR(_opts(), Task("voc", "15-5", 1)).load_state_dict({})
    sdr.SDR(_opts(preset=False), Task("voc", "15-5", 1)).load_state_dict({})  # nothing tracked: fine


def test_sparsification_needs_its_options():
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match="lfs_normalization"):
        sdr.SDR(_opts(preset=False, loss_featspars=1e-3), Task("voc", "15-5", 0))


def test_preset_is_the_reference_one():
    p = sdr.SDR.preset
    assert (p["loss_kd"], p["loss_de_prototypes"], p["loss_fc"], p["lfc_sep_clust"], p["loss_featspars"]) == \
        (100.0, 0.01, 1e-3, 1e-3, 1e-3)
    assert p["unce"] and p["unkd"] and "init_balanced" not in p
