"""EWC / RW / PI (reference mib_plop.md §4.5-§4.7) against hand formulas and plain loops.

Parameters and gradients are set by hand on a toy segmentation model, so every expected value
is an explicit formula evaluated here element by element.
"""
from __future__ import annotations

import argparse
import copy
import types

import pytest
import torch
from torch import nn

from methods.base import MethodStateError, StepContext, cross_entropy_all_pixels
from methods.classic import ClassicMethod, add_arguments
from methods.regularizers import EWC, PI, RW, min_max_normalize

ALPHA = 0.9


class Toy(nn.Module):
    """A 1x1-conv "segmentation model" with the body/head/cls layout of the real one."""

    def __init__(self, classes_per_step):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 1)
        self.head = nn.Identity()
        self.cls = nn.ModuleList([nn.Conv2d(4, n, 1) for n in classes_per_step])

    def forward(self, x):
        f = torch.relu(self.body(x))
        return {"logits": torch.cat([c(f) for c in self.cls], dim=1), "body": f}


def models(seed=0):
    """Student at step 1 (classes [2, 1]) and its teacher (classes [2]) with other weights."""
    torch.manual_seed(seed)
    teacher = Toy([2])
    student = Toy([2, 1])
    student.load_state_dict(teacher.state_dict(), strict=False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def make_opts(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = parser.parse_args(list(argv))
    opts.weight_decay = 0.0
    return opts


def ctx(model, teacher):
    return StepContext(model=model, teacher=teacher, train_loader=None, device=torch.device("cpu"), task=None, opts=None)


def task(step):
    return types.SimpleNamespace(step=step, n_old=2 if step else 0)


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    grads = {}
    for n, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=g)
        grads[n] = p.grad.clone()
    return grads


def random_stats(model, seed, positive=True):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) * 3 + (0.1 if positive else -1.5) for n, p in model.named_parameters()}


def manual_penalty(student, teacher, omega):
    """sum over teacher parameters, element by element: omega * (theta - theta_teacher)^2."""
    params = dict(student.named_parameters())
    total = 0.0
    for n, t in teacher.named_parameters():
        for w, a, b in zip(omega[n].flatten().tolist(), params[n].flatten().tolist(), t.flatten().tolist()):
            total += w * (a - b) ** 2
    return total


# --- normalisation ------------------------------------------------------------------------------


def test_min_max_normalize_per_tensor():
    got = min_max_normalize(torch.tensor([2.0, 4.0, 6.0]))
    assert got.tolist() == pytest.approx([0.0, 2 / (4 + 1e-8), 4 / (4 + 1e-8)])


# --- EWC ----------------------------------------------------------------------------------------


def test_ewc_fisher_ema_starts_from_ones_at_step0():
    student = Toy([2])
    reg = EWC(importance=500, alpha=ALPHA)
    reg.start(student, None)
    assert reg.penalty() is None
    g1 = set_grads(student, 1)
    reg.update(penalty_in_grad=False)
    g2 = set_grads(student, 2)
    reg.update(penalty_in_grad=False)
    for n in g1:
        for f, a, b in zip(reg.fisher[n].flatten().tolist(), g1[n].flatten().tolist(), g2[n].flatten().tolist()):
            assert f == pytest.approx(ALPHA * b * b + (1 - ALPHA) * (ALPHA * a * a + (1 - ALPHA) * 1.0), rel=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_ewc_penalty_on_teacher_params_only(normalize):
    student, teacher = models()
    fisher = random_stats(teacher, 3)
    reg = EWC(importance=7.0, alpha=ALPHA, normalize=normalize)
    reg.load_previous({"name": "ewc", "fisher": fisher})
    reg.start(student, teacher)
    omega = {n: ((f - f.min()) / (f.max() - f.min() + 1e-8) if normalize else f) for n, f in fisher.items()}
    penalty = reg.penalty()
    assert penalty.item() == pytest.approx(7.0 * manual_penalty(student, teacher, omega), rel=1e-5)
    penalty.backward()
    new = student.cls[1]
    assert new.weight.grad is None and new.bias.grad is None  # the new classifier is free
    assert student.cls[0].weight.grad is not None


def test_ewc_running_fisher_continues_from_raw_previous_and_ones_for_new_params():
    student, teacher = models()
    fisher = random_stats(teacher, 3)
    reg = EWC(importance=1.0, alpha=ALPHA)
    reg.load_previous({"name": "ewc", "fisher": fisher})
    reg.start(student, teacher)
    assert torch.equal(reg.fisher["cls.0.weight"], fisher["cls.0.weight"])
    assert torch.equal(reg.fisher["cls.1.weight"], torch.ones_like(student.cls[1].weight))


@pytest.mark.parametrize("name", ["ewc", "rw", "pi"])
def test_one_backward_update_matches_reference_two_backwards(name):
    """Reference: backward(task); update(grads); backward(penalty).  Ours: backward(task + reg)."""
    student, teacher = models()
    previous = {"name": name, "fisher": random_stats(teacher, 3), "score": random_stats(teacher, 4)}
    opts = make_opts("--regularizer", name, "--reg_importance", "50", "--reg_iterations", "1")
    image = torch.randn(2, 3, 3, 3)
    label = torch.randint(0, 3, (2, 3, 3))

    def run_ours(model):
        method = ClassicMethod(opts, task(1))
        method.load_state_dict({"regularizer": copy.deepcopy(previous)})
        method.before_step(ctx(model, teacher))
        grads = []
        for it in range(3):
            model.zero_grad()
            terms = method.loss({"image": image, "label": label}, model(image), None)
            assert set(terms) == {"ce", "reg"}
            sum(terms.values()).backward()
            method.after_backward(model)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.01 * p.grad)
        return method, grads

    def run_reference(model):
        method = ClassicMethod(opts, task(1))
        method.load_state_dict({"regularizer": copy.deepcopy(previous)})
        method.before_step(ctx(model, teacher))
        reg = method.regularizer
        grads = []
        for it in range(3):
            model.zero_grad()
            cross_entropy_all_pixels(model(image)["logits"], label).backward()
            reg.update(penalty_in_grad=False)  # statistics from the task gradient alone
            reg.penalty().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.01 * p.grad)
        return method, grads

    twin = copy.deepcopy(student)
    ours, ours_grads = run_ours(student)
    ref, ref_grads = run_reference(twin)
    for a, b in zip(ours_grads, ref_grads):
        for n in a:
            torch.testing.assert_close(a[n], b[n])
    for kind, stats in ref.state_dict()["regularizer"].items():
        if kind != "name":
            for n in stats:
                torch.testing.assert_close(ours.state_dict()["regularizer"][kind][n], stats[n], rtol=1e-4, atol=1e-6)


# --- RW -----------------------------------------------------------------------------------------


def test_rw_path_score_every_k_iterations_and_saved_average():
    student, teacher = models()
    prev_fisher, prev_score = random_stats(teacher, 3), random_stats(teacher, 4)
    reg = RW(importance=1.0, alpha=ALPHA, iterations=2)
    reg.load_previous({"name": "rw", "fisher": prev_fisher, "score": prev_score})
    reg.start(student, teacher)
    n, m = "cls.0.weight", "cls.1.weight"  # an old and a new parameter
    p_new = student.cls[1].weight
    history = []  # (theta, grad, fisher before update) per iteration
    fisher = {n: prev_fisher[n].clone(), m: torch.ones_like(p_new)}
    for it in range(5):
        grads = set_grads(student, 10 + it)
        history.append({k: (dict(student.named_parameters())[k].detach().clone(), grads[k], fisher[k].clone())
                        for k in (n, m)})
        reg.update(penalty_in_grad=False)
        for k in (n, m):
            fisher[k] = ALPHA * grads[k] ** 2 + (1 - ALPHA) * fisher[k]
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p))
    for k in (n, m):
        torch.testing.assert_close(reg.fisher[k], fisher[k])
        # score: at iterations 2 and 4, against the snapshots of iterations 0 and 2
        expected = torch.zeros_like(fisher[k]).flatten()
        for cur, prev in ((2, 0), (4, 2)):
            theta, g, f = (t.flatten() for t in history[cur][k])
            theta_prev = history[prev][k][0].flatten()
            for i in range(expected.numel()):
                d = float(theta_prev[i] - theta[i])
                expected[i] += float(g[i]) * d / (0.5 * float(f[i]) * d * d + 1e-8)
        torch.testing.assert_close(reg.score[k].flatten(), expected, rtol=1e-4, atol=1e-5)
    saved = reg.state_dict()["score"]
    raw = reg.score
    torch.testing.assert_close(saved[n], 0.5 * (raw[n].clamp(min=0) + prev_score[n]))  # averaged with step t-1
    torch.testing.assert_close(saved[m], raw[m].clamp(min=0))  # new parameter: no previous score


def test_rw_penalty_uses_normalised_fisher_plus_normalised_score():
    student, teacher = models()
    fisher, score = random_stats(teacher, 3), random_stats(teacher, 4)
    reg = RW(importance=2.0, alpha=ALPHA)
    reg.load_previous({"name": "rw", "fisher": fisher, "score": score})
    reg.start(student, teacher)
    omega = {k: min_max_normalize(fisher[k]) + min_max_normalize(score[k]) for k in fisher}
    assert reg.penalty().item() == pytest.approx(2.0 * manual_penalty(student, teacher, omega), rel=1e-5)


# --- PI -----------------------------------------------------------------------------------------


def test_pi_path_integral_and_saved_omega():
    student, teacher = models()
    prev = random_stats(teacher, 4)
    reg = PI(importance=1.0)
    reg.load_previous({"name": "pi", "score": prev})
    start_new = student.cls[1].weight.detach().clone()
    reg.start(student, teacher)
    thetas, grads = [], []
    for it in range(4):
        grads.append(set_grads(student, 20 + it))
        thetas.append({k: v.detach().clone() for k, v in student.named_parameters()})
        reg.update(penalty_in_grad=False)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p))
    saved = reg.state_dict()["score"]
    end = {k: v.detach() for k, v in student.named_parameters()}
    for k, start in (("cls.0.weight", teacher.cls[0].weight), ("cls.1.weight", start_new)):
        flat = [t[k].flatten().tolist() for t in thetas]
        expected = []
        for i in range(len(flat[0])):
            delta = sum(float(grads[it][k].flatten()[i]) * (flat[it - 1][i] - flat[it][i]) for it in range(1, 4))
            omega = max(0.0, delta / ((float(end[k].flatten()[i]) - float(start.flatten()[i])) ** 2 + 1e-20))
            expected.append(omega + (float(prev[k].flatten()[i]) if k in prev else 0.0))
        assert saved[k].flatten().tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_pi_penalty_uses_normalised_previous_omega():
    student, teacher = models()
    score = random_stats(teacher, 4)
    reg = PI(importance=3.0, normalize=True)
    reg.load_previous({"name": "pi", "score": score})
    reg.start(student, teacher)
    omega = {k: min_max_normalize(v) for k, v in score.items()}
    assert reg.penalty().item() == pytest.approx(3.0 * manual_penalty(student, teacher, omega), rel=1e-5)


# --- life cycle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ewc", "rw", "pi"])
def test_missing_previous_state_is_an_error(name):
    method = ClassicMethod(make_opts("--regularizer", name), task(1))
    assert method.needs_previous_state
    with pytest.raises(MethodStateError, match=f"--regularizer {name}"):
        method.load_state_dict(None)
    with pytest.raises(MethodStateError):
        method.load_state_dict({})
    other = "pi" if name != "pi" else "ewc"
    with pytest.raises(MethodStateError):
        method.load_state_dict({"regularizer": {"name": other, "fisher": {}, "score": {}}})
    ClassicMethod(make_opts("--regularizer", name), task(0)).load_state_dict(None)  # step 0: fine


def test_step0_accumulates_and_step1_penalises_with_saved_state():
    student, teacher = models()
    step0_model = Toy([2])
    opts = make_opts("--regularizer", "ewc", "--reg_importance", "5")
    m0 = ClassicMethod(opts, task(0))
    m0.load_state_dict(None)
    m0.before_step(ctx(step0_model, None))
    image, label = torch.randn(1, 3, 2, 2), torch.randint(0, 2, (1, 2, 2))
    terms = m0.loss({"image": image, "label": label}, step0_model(image), None)
    assert set(terms) == {"ce"}
    terms["ce"].backward()
    grads = {n: p.grad.clone() for n, p in step0_model.named_parameters()}
    m0.after_backward(step0_model)
    state = m0.state_dict()
    for n, g in grads.items():
        torch.testing.assert_close(state["regularizer"]["fisher"][n], ALPHA * g ** 2 + (1 - ALPHA))
    m1 = ClassicMethod(opts, task(1))
    m1.load_state_dict(state)
    m1.before_step(ctx(student, step0_model))
    omega = {n: min_max_normalize(f) for n, f in state["regularizer"]["fisher"].items()}
    reg = m1.loss({"image": image, "label": label}, student(image), None)["reg"]
    assert reg.item() == pytest.approx(5 * manual_penalty(student, step0_model, omega), rel=1e-5)


@pytest.mark.parametrize("name", ["ewc", "rw", "pi"])
def test_non_finite_gradients_skip_the_update(name):
    student = Toy([2])
    reg = {"ewc": EWC, "rw": RW, "pi": PI}[name](importance=1.0, alpha=ALPHA, iterations=1)
    reg.start(student, None)
    set_grads(student, 1)
    reg.update(penalty_in_grad=False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
    before = {k: {n: t.clone() for n, t in v.items()} for k, v in reg._saved_statistics().items()}
    set_grads(student, 2)
    student.body.weight.grad[0, 0] = float("inf")
    student.cls[0].bias.grad[0] = float("nan")
    reg.update(penalty_in_grad=False)
    after = reg._saved_statistics()
    for kind in before:
        for n in before[kind]:
            torch.testing.assert_close(after[kind][n], before[kind][n])


@pytest.mark.parametrize("name", ["ewc", "rw", "pi"])
def test_update_never_syncs_the_host(name, monkeypatch):
    student, teacher = models()
    previous = {"name": name, "fisher": random_stats(teacher, 3), "score": random_stats(teacher, 4)}
    reg = {"ewc": EWC, "rw": RW, "pi": PI}[name](importance=1.0, alpha=ALPHA, iterations=1)
    reg.load_previous(previous)
    reg.start(student, teacher)
    reg.penalty().backward()

    def no_sync(*args, **kwargs):
        raise AssertionError("host synchronisation in the per-iteration update")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    for _ in range(2):
        reg.update(penalty_in_grad=True)
        reg.penalty()


def test_teacher_names_must_match_the_student():
    student, teacher = models()
    wrapped = nn.Module()
    wrapped._orig_mod = student  # what torch.compile's wrapper looks like to named_parameters
    reg = EWC(importance=1.0)
    reg.load_previous({"name": "ewc", "fisher": random_stats(teacher, 3)})
    with pytest.raises(RuntimeError, match="teacher parameter's name"):
        reg.start(wrapped, teacher)


def _iterations(method, model, start, stop, image, label):
    for it in range(start, stop):
        model.zero_grad()
        torch.manual_seed(it)  # the batch of iteration ``it``, wherever it runs
        noisy = image + 0.1 * torch.randn_like(image)
        sum(method.loss({"image": noisy, "label": label}, model(noisy), None).values()).backward()
        method.after_backward(model)
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.05 * p.grad)


@pytest.mark.parametrize("name", ["ewc", "rw", "pi"])
@pytest.mark.parametrize("restore", [True, False])
def test_in_step_state_makes_a_resumed_step_exact(name, restore):
    """6 iterations in one go == 4, then a new process (fresh method and model at the step's
    start, before_step, weights and in-step state of iteration 4 loaded) running 2 more; without
    the in-step state the saved statistics differ."""
    previous = {"name": name, "fisher": random_stats(models()[1], 3), "score": random_stats(models()[1], 4)}
    opts = make_opts("--regularizer", name, "--reg_importance", "50", "--reg_iterations", "2")
    image, label = torch.randn(2, 3, 3, 3), torch.randint(0, 3, (2, 3, 3))

    def started():
        model, teacher = models()
        method = ClassicMethod(opts, task(1))
        method.load_state_dict({"regularizer": copy.deepcopy(previous)})
        method.before_step(ctx(model, teacher))
        return method, model

    method, model = started()
    _iterations(method, model, 0, 4, image, label)
    weights, in_step = copy.deepcopy(model.state_dict()), copy.deepcopy(method.in_step_state())
    _iterations(method, model, 4, 6, image, label)
    expected = method.state_dict()["regularizer"]

    method, model = started()
    model.load_state_dict(weights)
    if restore:
        method.load_in_step_state(in_step)
    _iterations(method, model, 4, 6, image, label)
    resumed = method.state_dict()["regularizer"]
    same = all(torch.equal(resumed[k][n], expected[k][n]) for k in expected if k != "name" for n in expected[k])
    assert same == restore
