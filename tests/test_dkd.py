"""DKD (recent_methods.md §5): head, decomposition, inference rule, losses, init, optimiser groups."""
import math
import types

import pytest
import torch
from torch import nn

from dataset.tasks import Task
from methods import get_method_class
from methods.dkd import DKD, sigmoid_predict
from modules.dkd_head import DKDHead, dkd_classifier_forward
from utils.errors import ConfigError


def _opts(**kw):
    base = dict(head="dkd", pos_weight=None, mbce=1.0, kd=5.0, dkd_pos=5.0, dkd_neg=5.0, ac=1.0,
                freeze_bn=True, mem_size=0, weight_decay=1e-4)
    base.update(kw)
    return types.SimpleNamespace(**base)


def _classifiers(sizes, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList([nn.Conv2d(4, n, 1) for n in sizes])


# --- network --------------------------------------------------------------------------------------


def test_decomposition_adds_up_and_matches_plain_convolution():
    cls = _classifiers([3, 2])
    f = torch.rand(2, 4, 3, 5)  # non-negative, like the head's output
    out = dkd_classifier_forward(cls, f)
    w = torch.cat([c.weight for c in cls])[:, :, 0, 0]  # (5, 4)
    b = torch.cat([c.bias for c in cls])
    z = torch.einsum("kc,bchw->bkhw", w, f) + b.view(1, -1, 1, 1)
    pos = torch.einsum("kc,bchw->bkhw", w.clamp(min=0), f)
    neg = torch.einsum("kc,bchw->bkhw", w.clamp(max=0), f)
    torch.testing.assert_close(out["logits_small"], z)
    torch.testing.assert_close(out["logits_pos"], pos)
    torch.testing.assert_close(out["logits_neg"], neg)
    torch.testing.assert_close(out["logits_pos"] + out["logits_neg"] + b.view(1, -1, 1, 1), out["logits_small"])
    assert (out["logits_pos"] >= 0).all() and (out["logits_neg"] <= 0).all()


def test_auxiliary_channel_sees_detached_features():
    cls = _classifiers([3, 1])
    f = torch.rand(1, 4, 2, 2, requires_grad=True)
    out = dkd_classifier_forward(cls, f)
    out["logits_small"][:, 0].sum().backward()
    assert f.grad is None or torch.count_nonzero(f.grad) == 0
    assert torch.count_nonzero(cls[0].weight.grad[0]) > 0  # the aux classifier itself learns
    out = dkd_classifier_forward(cls, f)
    out["logits_small"][:, 1].sum().backward()
    torch.testing.assert_close(f.grad[0, :, 0, 0], cls[0].weight[1, :, 0, 0].detach())


@pytest.mark.parametrize("stride", [16, 8])
def test_head_features_are_non_negative(stride):
    torch.manual_seed(0)
    head = DKDHead(8, out_channels=6, output_stride=stride).train()
    y = head(torch.randn(2, 8, 5, 7))
    assert y.shape == (2, 6, 5, 7)
    assert (y >= 0).all() and (y > 0).any()
    dilations = [m.dilation[0] for m in head.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert dilations[:3] == ([6, 12, 18] if stride == 16 else [12, 24, 36])


def test_inference_rule_on_crafted_scores():
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    # pixel 0: no class above 0.5 -> background, even though the aux channel is high
    # pixel 1: classes 1 and 2 above 0.5 -> the larger (2)
    # pixel 2: only class 3 above 0.5
    # pixel 3: exactly 0.5 is not above 0.5 -> background
    scores = [[0.99, 0.4, 0.3, 0.1], [0.1, 0.6, 0.9, 0.2], [0.1, 0.2, 0.3, 0.7], [0.2, 0.5, 0.1, 0.3]]
    logits = torch.tensor([[logit(p) for p in px] for px in scores]).t().reshape(1, 4, 1, 4)
    assert sigmoid_predict(logits).tolist() == [[[0, 2, 3, 0]]]
    method = DKD(_opts(), Task("voc", "15-5", 0))
    assert method.predict(logits).tolist() == [[[0, 2, 3, 0]]]


# --- losses ---------------------------------------------------------------------------------------


def _bce(x: float, t: float, pos_weight: float = 1.0) -> float:
    s = 1 / (1 + math.exp(-x))
    return -(pos_weight * t * math.log(s) + (1 - t) * math.log(1 - s))


def _class_sum(logits, targets, pos_weight=1.0):
    """Σ_c mean over pixels of BCE, by plain loops."""
    b, c, h, w = logits.shape
    total = 0.0
    for k in range(c):
        acc = 0.0
        for i in range(b):
            for y in range(h):
                for x in range(w):
                    acc += _bce(float(logits[i, k, y, x]), float(targets[i, k, y, x]), pos_weight)
        total += acc / (b * h * w)
    return total


def _sigmoid(t):
    return 1 / (1 + torch.exp(-t))


def test_step0_terms_match_loops():
    task = Task("voc", "15-5", 0)  # classes 0..15; channel 0 = aux
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 16, 2, 3, generator=g)
    labels = torch.tensor([[[0, 3, 255], [15, 3, 1]], [[2, 2, 0], [255, 7, 15]]])
    method = DKD(_opts(mbce=1.5, ac=0.5), task)
    assert method.pos_weight == 2.0 and not method.needs_teacher
    terms = method.loss({"label": labels}, {"logits": logits}, None)
    assert set(terms) == {"mbce", "ac"}
    targets = torch.stack([(labels == c).float() for c in range(1, 16)], dim=1)  # 255 -> negative
    assert terms["mbce"].item() == pytest.approx(1.5 * _class_sum(logits[:, 1:], targets, 2.0), rel=1e-5)
    assert terms["ac"].item() == pytest.approx(0.5 * _class_sum(logits[:, :1], torch.zeros(2, 1, 2, 3)), rel=1e-5)


def test_step1_terms_match_loops():
    task = Task("voc", "15-5", 1)  # old 0..15, new 16..20
    g = torch.Generator().manual_seed(2)
    out = {k: torch.randn(1, 21, 2, 2, generator=g) for k in ("logits", "logits_pos", "logits_neg")}
    old = {k: torch.randn(1, 16, 2, 2, generator=g) for k in ("logits", "logits_pos", "logits_neg")}
    labels = torch.tensor([[[0, 16], [20, 255]]])
    method = DKD(_opts(), task)
    assert method.pos_weight == 1.0 and method.needs_teacher
    terms = method.loss({"label": labels}, out, old)
    assert set(terms) == {"mbce", "ac", "kd", "dkd_pos", "dkd_neg"}
    targets = torch.stack([(labels == c).float() for c in range(16, 21)], dim=1)
    assert terms["mbce"].item() == pytest.approx(_class_sum(out["logits"][:, 16:], targets), rel=1e-5)
    for term, key in (("kd", "logits"), ("dkd_pos", "logits_pos"), ("dkd_neg", "logits_neg")):
        expected = 5.0 * _class_sum(out[key][:, 1:16], _sigmoid(old[key][:, 1:16]))
        assert terms[term].item() == pytest.approx(expected, rel=1e-5), term


def test_ordered_task_trains_the_new_class_channel():
    task = Task("voc", "15-5s_b", 2)  # PLOP's order b: step 2 learns class 3 (bird) on channel 17
    g = torch.Generator().manual_seed(3)
    out = {k: torch.randn(1, 18, 2, 2, generator=g) for k in ("logits", "logits_pos", "logits_neg")}
    old = {k: torch.randn(1, 17, 2, 2, generator=g) for k in ("logits", "logits_pos", "logits_neg")}
    labels = torch.tensor([[[0, 17], [17, 255]]])  # labels are channels (the step's label table)
    terms = DKD(_opts(), task).loss({"label": labels}, out, old)
    targets = (labels == 17).float()[:, None]
    assert terms["mbce"].item() == pytest.approx(_class_sum(out["logits"][:, 17:], targets), rel=1e-5)


def test_pos_weight_defaults_and_explicit_value():
    assert DKD(_opts(), Task("ade", "100-10", 0)).pos_weight == 35.0
    assert DKD(_opts(), Task("ade", "100-10", 2)).pos_weight == 35.0
    assert DKD(_opts(pos_weight=3.0), Task("voc", "15-1", 0)).pos_weight == 3.0


def test_needs_the_sigmoid_head():
    with pytest.raises(ConfigError, match="--head dkd"):
        DKD(_opts(head="deeplab"), Task("voc", "15-5", 0))


def test_presets():
    cls = get_method_class("DKD")
    assert cls.preset["kd"] == 5.0 and cls.preset["head"] == "dkd"
    memory = get_method_class("dkd-m")
    assert memory.preset_by_dataset["voc"]["mem_size"] == 100
    assert memory.preset_by_dataset["ade"]["mem_size"] == 300


# --- construction and optimisation ---------------------------------------------------------------


class _TinyModel(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = DKDHead(8, out_channels=4)
        self.cls = nn.ModuleList([nn.Conv2d(4, n, 1) for n in sizes])

    def forward(self, x):
        return dkd_classifier_forward(self.cls, self.head(self.body(x)))


def test_new_classes_start_from_the_auxiliary_classifier():
    torch.manual_seed(0)
    model = _TinyModel([16, 5])
    DKD(_opts(freeze_bn=False), Task("voc", "15-5", 1)).init_new_classifier(model)
    for j in range(5):
        torch.testing.assert_close(model.cls[1].weight[j], model.cls[0].weight[0])
        assert model.cls[1].bias[j].item() == model.cls[0].bias[0].item()
    assert not torch.equal(model.cls[0].weight[1], model.cls[0].weight[0])  # only the new ones copied


def test_parameter_groups_step0():
    model = _TinyModel([16])
    groups = DKD(_opts(), Task("voc", "15-5", 0)).param_groups(model, lr=0.01)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.01, 1e-4), (0.1, 1e-4), (0.1, 1e-4)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_step1_freezes_norm_and_dropout_and_decays_only_the_new_classifier():
    torch.manual_seed(0)
    model = _TinyModel([16, 5])
    method = DKD(_opts(), Task("voc", "15-5", 1))
    method.init_new_classifier(model)
    groups = method.param_groups(model, lr=0.01)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.01, 0.0), (0.1, 0.0), (0.1, 0.0), (0.1, 1e-4)]
    assert groups[-1]["params"] == list(model.cls[-1].parameters())
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert norm_params and not norm_params & {id(p) for g in groups for p in g["params"]}
    model.train()
    bn = model.body[1]
    before = bn.running_mean.clone()
    x = torch.randn(2, 3, 6, 6)
    a, b = model(x)["logits_small"], model(x)["logits_small"]
    torch.testing.assert_close(a, b)  # dropout off, BN on running statistics: deterministic
    torch.testing.assert_close(bn.running_mean, before)
    method.after_step(None)
    model.train()
    model(x)
    assert not torch.equal(bn.running_mean, before)  # hooks removed


# --- DKD-M exemplar memory (§5.4) -----------------------------------------------------------------

import numpy as np  # noqa: E402

from dataset import memory  # noqa: E402
from dataset.errors import DataError  # noqa: E402
from dataset.incremental import IncrementalSegmentation, label_lut  # noqa: E402


def _presence(rows):
    p = np.zeros((len(rows), 256), dtype=bool)
    for i, classes in enumerate(rows):
        p[i, classes] = True
    return p


def test_batch_presence_adds_confident_pseudo_labels_on_background_only():
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    labels = torch.tensor([[[0, 0, 5, 255]]])  # (1, 1, 4)
    scores = torch.full((1, 4, 1, 4), 0.01)  # channels: aux, 1, 2, 3
    scores[0, 2, 0, 0] = 0.95  # background pixel, confident class 2 -> counts
    scores[0, 3, 0, 1] = 0.85  # background pixel, not confident enough
    scores[0, 1, 0, 2] = 0.99  # labelled pixel keeps its label
    scores[0, 1, 0, 3] = 0.99  # ignored pixel is not background
    logits = scores.apply_(logit)
    present = memory.batch_presence(labels, logits)
    assert np.flatnonzero(present[0].numpy()).tolist() == [0, 2, 5, 255]
    assert np.flatnonzero(memory.batch_presence(labels)[0].numpy()).tolist() == [0, 5, 255]


def test_single_class_images_are_split_evenly():
    rows = [[c] for c in (1, 2, 3) for _ in range(10)]
    indices = list(range(100, 130))
    for size, expected in ((9, [3, 3, 3]), (10, [3, 3, 4])):
        chosen = memory.select_balanced(_presence(rows), indices, [1, 2, 3], size, seed=3)
        assert len(chosen) == len(set(chosen)) == size
        counts = sorted(sum(rows[i - 100][0] == c for i in chosen) for c in (1, 2, 3))
        assert counts == expected


def test_round_robin_matches_a_list_based_reference():
    rng = np.random.default_rng(0)
    presence = rng.random((40, 256)) < 0.15
    presence[:, 6] = False  # a class with no candidate is skipped
    indices = list(range(1000, 1040))
    classes = [1, 2, 3, 4, 5, 6]
    for size in (7, 25, 60):
        got = memory.select_balanced(presence, indices, classes, size, seed=11)
        # independent re-implementation of the reference loop (delete from a shuffled list)
        r = np.random.default_rng(11)
        pool = list(r.permutation(40))
        order = list(r.permutation(np.asarray(classes)))
        expected = []
        while len(expected) < size:
            before = len(expected)
            for c in order:
                hit = next((k for k, cand in enumerate(pool) if presence[cand, c]), None)
                if hit is not None:
                    expected.append(indices[pool.pop(hit)])
                    if len(expected) == size:
                        break
            if len(expected) == before:
                break
        assert got == expected
    eligible = int(presence[:, classes].any(axis=1).sum())
    assert len(memory.select_balanced(presence, indices, classes, 60, seed=11)) == eligible < 60


def test_build_memory_merges_previous_items_and_json_round_trip(tmp_path):
    previous = ([7, 8], _presence([[1], [2]]))
    candidates = ([8, 9, 10], _presence([[3], [3], [3]]))  # image 8 was also a step t-1 image
    chosen, rows = memory.build_memory(candidates, previous, classes=[1, 2, 3], size=3, seed=0)
    assert sorted(chosen) in ([7, 8, 9], [7, 8, 10])
    assert np.flatnonzero(rows[chosen.index(8)]).tolist() == [2, 3]  # classes of both sources
    path = memory.memory_path(tmp_path, 2)
    memory.save_memory(path, 2, chosen, rows, seed=0)
    loaded, loaded_rows = memory.load_memory(path)
    assert loaded == chosen and np.array_equal(loaded_rows, rows)
    with pytest.raises(DataError, match="does not exist"):
        memory.load_memory(memory.memory_path(tmp_path, 5))


class _Source:
    """Three 2x3 images whose labels hold an old (3), a new (17), a future (19) class and 255."""

    labels = np.array([[[0, 3, 17], [255, 19, 3]], [[3, 3, 0], [0, 0, 0]], [[17, 0, 255], [3, 0, 0]]], np.uint8)

    def __len__(self):
        return len(self.labels)

    def load(self, index):
        return np.zeros((2, 3, 3), np.uint8), self.labels[index]


def test_memory_labels_are_masked_like_current_data():
    task = Task("voc", "15-1", 2)  # old 0..16, new 17
    source = _Source()
    lut = label_lut(task, "train", "plop")
    identity = lambda image, label: (image, label)  # noqa: E731
    train = IncrementalSegmentation(source, np.array([0, 2]), identity, lut, _presence([[17], [17]]))
    exemplars = memory.memory_dataset(train, [1, 0], _presence([[3], [3, 17]]))
    assert len(exemplars) == 2
    _, first = exemplars[0]
    assert first.tolist() == [[0, 0, 0], [0, 0, 0]]  # old class 3 -> background
    _, second = exemplars[1]
    assert second.tolist() == [[0, 0, 17], [255, 0, 0]]  # new kept, 255 kept, old/future -> 0
    assert second.tolist() == train[0][1].tolist()  # the same image reads the same in both datasets


class _ConstantModel(nn.Module):
    """Sigmoid logits: class 2 confident on images whose first pixel is bright."""

    def forward(self, x):
        b, _, h, w = x.shape
        logits = torch.full((b, 4, h, w), -5.0)
        logits[:, 2] = torch.where(x[:, 0, :1, :1] > 0, 5.0, -5.0).expand(b, h, w)
        return {"logits": logits}


def test_candidate_presence_runs_the_model_over_the_dataset():
    class Source(_Source):
        def load(self, index):
            return np.full((2, 3, 3), 255 if index == 1 else 0, np.uint8), self.labels[index]

    task = Task("voc", "15-1", 2)
    data = IncrementalSegmentation(Source(), np.array([0, 1, 2]), lambda i, l: (i, l),
                                   label_lut(task, "train", "plop"), _presence([[], [], []]))
    rows = memory.candidate_presence(_ConstantModel(), data, torch.device("cpu"), batch_size=2)
    # image 1 (bright): every background pixel becomes the confident class 2
    assert [np.flatnonzero(r).tolist() for r in rows] == [[0, 17, 255], [2], [0, 17, 255]]
