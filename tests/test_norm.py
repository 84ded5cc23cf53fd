"""ABN family (modules/norm.py): numerics against torch's BatchNorm2d, state dicts, sync over gloo."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gloo import run_on_gloo
from modules.norm import (
    ABN,
    BatchNormAct,
    InPlaceABN,
    InPlaceABNSync,
    UnknownNormError,
    freeze_norm_layers,
    make_norm_act,
)
from utils.errors import ConfigError

PURE = [ABN, InPlaceABN, InPlaceABNSync]
KEYS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _weights(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(c, generator=g)
    w[0] = -w[0].abs() - 0.5  # a negative weight: ABN and InPlaceABN differ there
    return w, torch.randn(c, generator=g)


def _reference_bn(weight: torch.Tensor, bias: torch.Tensor) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(weight.numel())
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn


def _set(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)


@pytest.mark.parametrize("cls", PURE)
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
def test_matches_batchnorm_then_leaky_relu(cls, activation):
    """ABN = BN(w) + act; InPlaceABN = BN(|w| + eps) + act (inplace-abn 1.1 forward_cpu)."""
    c = 4
    w, b = _weights(c)
    layer = cls(c)
    layer.activation = activation
    _set(layer, w, b)
    scale = w if cls is ABN else w.abs() + layer.eps
    ref = _reference_bn(scale, b)

    x = torch.randn(3, c, 5, 6) * 2 + 0.7
    grad_out = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = layer(x1)
    y2 = ref(x2)
    if activation == "leaky_relu":
        y2 = F.leaky_relu(y2, 0.01)
    (y1 * grad_out).sum().backward()
    (y2 * grad_out).sum().backward()

    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
    # d scale / d w is 1 for ABN and sign(w) for InPlaceABN
    sign = torch.ones(c) if cls is ABN else torch.where(w < 0, -1.0, 1.0)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad * sign)
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    assert layer.num_batches_tracked.item() == 1

    layer.eval()
    ref.eval()
    expected = ref(x)
    if activation == "leaky_relu":
        expected = F.leaky_relu(expected, 0.01)
    torch.testing.assert_close(layer(x), expected)


def test_leaky_slope_and_identity_by_hand():
    """One channel, two values: x_hat = -1, +1 in training mode (biased variance)."""
    layer = InPlaceABN(1)
    _set(layer, torch.tensor([-2.0]), torch.tensor([0.5]))
    x = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)  # mean 2, var 1
    s = 2.0 + 1e-5
    x_hat = torch.tensor([-1.0, 1.0]) / (1 + 1e-5) ** 0.5
    pre = x_hat * s + 0.5
    expected = torch.where(pre > 0, pre, 0.01 * pre)
    torch.testing.assert_close(layer(x).flatten(), expected)
    layer.activation = "identity"
    torch.testing.assert_close(layer(x).flatten(), pre)


def test_inplace_abn_weight_gradient_at_zero_weight_is_positive_sign():
    """inplace-abn multiplies dweight by -1 only where weight < 0, so w = 0 gets +dL/dscale."""
    layer = InPlaceABN(1)
    layer.activation = "identity"
    _set(layer, torch.tensor([0.0]), torch.tensor([0.0]))
    x = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    (layer(x).flatten() * torch.tensor([0.0, 1.0])).sum().backward()
    # L = x_hat_2 * (|w| + eps), dL/dscale = x_hat_2 = 1 / sqrt(1 + eps)
    torch.testing.assert_close(layer.weight.grad, torch.tensor([1 / (1 + 1e-5) ** 0.5]))


@pytest.mark.parametrize("name", ["iabn_sync", "iabn", "abn", "bn", "std"])
def test_factory_layers_have_inplace_abn_state_dict_keys(name):
    layer = make_norm_act(name)(8)
    assert set(layer.state_dict()) == KEYS
    assert layer.activation == "leaky_relu" and layer.activation_param == 0.01
    assert layer.weight.shape == (8,)


def test_factory_names_and_unknown_name():
    assert isinstance(make_norm_act("std")(2), BatchNormAct)
    assert type(make_norm_act("iabn")(2)).__name__ == "InPlaceABN"
    with pytest.raises(UnknownNormError, match="unknown --norm_act 'gn'"):
        make_norm_act("gn")


@pytest.mark.parametrize("cls", PURE + [BatchNormAct])
def test_loads_checkpoint_without_num_batches_tracked(cls):
    """The released ImageNet file predates num_batches_tracked; a strict load must accept it."""
    src = cls(3)
    with torch.no_grad():
        src.running_mean.fill_(0.25)
    state = {k: v for k, v in src.state_dict().items() if k != "num_batches_tracked"}
    dst = cls(3)
    dst.load_state_dict(state, strict=True)
    assert torch.equal(dst.running_mean, torch.full((3,), 0.25))


def test_freeze_norm_layers_keeps_statistics_and_parameters():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), InPlaceABN(3), nn.Conv2d(3, 3, 1), BatchNormAct(3))
    freeze_norm_layers(net)
    for layer in (net[1], net[3]):
        assert not layer.training
        assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert net.training and net[0].training and net[0].weight.requires_grad
    before = [net[1].running_mean.clone(), net[3].running_var.clone()]
    net(torch.randn(2, 2, 3, 3) * 5 + 3)
    assert torch.equal(net[1].running_mean, before[0]) and torch.equal(net[3].running_var, before[1])


def test_sync_layer_falls_back_to_local_statistics_without_distributed():
    w, b = _weights(3)
    sync, local = InPlaceABNSync(3), InPlaceABN(3)
    _set(sync, w, b)
    _set(local, w, b)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(sync(x), local(x))


def test_sync_layer_deepcopy_shares_the_group():
    marker = object()  # stands in for a process group, which cannot be copied
    layer = InPlaceABNSync(2, group=marker)
    clone = copy.deepcopy(layer)
    assert clone.group is marker
    assert clone.weight is not layer.weight


# --- two gloo processes vs one process ------------------------------------------------------------
C = 3


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, C, 5, 3, generator=g) * 3 + 1  # 4 samples, split 2 + 2 over the ranks
    grad_out = torch.randn(4, C, 5, 3, generator=g)
    w, b = _weights(C)
    return x, grad_out, w, b


def _run_layer(layer: InPlaceABNSync, x: torch.Tensor, grad_out: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * grad_out).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
            "mean": layer.running_mean.clone(), "var": layer.running_var.clone()}


def _sync_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    x, grad_out, w, b = _inputs()
    layer = InPlaceABNSync(C, group=dist.group.WORLD)
    _set(layer, w, b)
    part = slice(2 * rank, 2 * rank + 2)
    result = _run_layer(layer, x[part], grad_out[part])
    torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_sync_two_gloo_processes_equal_one_process_on_all_samples(tmp_path):
    x, grad_out, w, b = _inputs()
    # one process on all 4 samples, with torch's BatchNorm2d: scale |w| + eps, then leaky ReLU
    ref = _reference_bn(w.abs() + 1e-5, b)
    xr = x.clone().requires_grad_()
    y = F.leaky_relu(ref(xr), 0.01)
    (y * grad_out).sum().backward()
    expected = {"y": y.detach(), "dx": xr.grad, "dw": ref.weight.grad * torch.where(w < 0, -1.0, 1.0),
                "db": ref.bias.grad, "mean": ref.running_mean, "var": ref.running_var}

    run_on_gloo(_sync_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), expected["y"])
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), expected["dx"])
    # each rank holds the gradient of its own loss; DDP sums (averages) them
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], expected["dw"])
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], expected["db"])
    for r in ranks:
        torch.testing.assert_close(r["mean"], expected["mean"])
        torch.testing.assert_close(r["var"], expected["var"])


# --- inplace-abn's compiled layers (the `inplace_abn` fixture: skipped where it is not installed) ---
def test_environment_chooses_the_implementation(monkeypatch):
    """CSSBENCH_INPLACE_ABN=0 keeps the pure layers; =1 requires the package (one-line error)."""
    monkeypatch.setenv("CSSBENCH_INPLACE_ABN", "0")
    assert type(make_norm_act("iabn")(2)) is InPlaceABN and type(make_norm_act("abn")(2)) is ABN
    monkeypatch.setenv("CSSBENCH_INPLACE_ABN", "1")
    monkeypatch.setitem(__import__("sys").modules, "inplace_abn", None)  # as if not installed
    with pytest.raises(ConfigError, match="CSSBENCH_INPLACE_ABN=1 asks for inplace-abn"):
        make_norm_act("iabn")


def _pure_and_package(inplace_abn, name: str, c: int):
    layer = make_norm_act(name)(c)
    assert isinstance(layer, {"iabn": inplace_abn.InPlaceABN, "abn": inplace_abn.ABN}[name])
    pure = {"iabn": InPlaceABN, "abn": ABN}[name](c)
    w, b = _weights(c)
    _set(layer, w, b)
    _set(pure, w, b)
    return layer, pure


def _forward_backward(layer, x, grad_out, autocast_dtype=None):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = layer(x.clone())  # the in-place layer overwrites its input, which must not be a leaf
    (y.float() * grad_out.float()).sum().backward()
    return y, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("name", ["iabn", "abn"])
def test_inplace_abn_package_computes_what_the_pure_layers_do(inplace_abn, name):
    """fp32, training and eval mode: the compiled layer and ours agree (the basis of swapping them)."""
    c = 4
    layer, pure = _pure_and_package(inplace_abn, name, c)
    x = torch.randn(3, c, 5, 6) * 2 + 0.7
    grad_out = torch.randn_like(x)
    for got, expected in zip(_forward_backward(layer, x, grad_out), _forward_backward(pure, x, grad_out)):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(layer.running_mean, pure.running_mean)
    torch.testing.assert_close(layer.running_var, pure.running_var)
    layer.eval()
    pure.eval()
    torch.testing.assert_close(layer(x.clone()), pure(x))


def test_single_process_iabn_sync_on_the_package_needs_no_process_group(inplace_abn):
    """Without a process group (one process) iabn_sync is the package's InPlaceABN: its sync layer
    would ask torch.distributed for the world size of a group that does not exist."""
    layer = make_norm_act("iabn_sync")(3)
    assert isinstance(layer, inplace_abn.InPlaceABN)
    layer(torch.randn(2, 3, 4, 4) + 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["iabn", "abn"])
def test_inplace_abn_package_runs_under_cpu_autocast(inplace_abn, name, dtype):
    """A bf16 / fp16 input, as a convolution under autocast hands it on: the compiled CPU kernel
    takes neither with fp32 weights, so the layer normalises in fp32 and returns the input's type.
    Reference: the pure fp32 layer on the same (rounded) input."""
    c = 4
    layer, pure = _pure_and_package(inplace_abn, name, c)
    x = (torch.randn(3, c, 5, 6) * 2 + 0.7).to(dtype)
    grad_out = torch.randn(x.shape).to(dtype)
    y, dx, dw, db = _forward_backward(layer, x, grad_out, dtype)
    y_ref, dx_ref, dw_ref, db_ref = _forward_backward(pure, x.float(), grad_out.float())
    assert y.dtype == dtype and dx.dtype == dtype
    assert layer.weight.dtype == layer.running_mean.dtype == torch.float32
    # iabn computes in fp32 (results rounded once); abn is plain F.batch_norm in the input's type
    tol, grad_tol = ({}, dict(rtol=1e-4, atol=1e-4)) if name == "iabn" else (dict(atol=1e-3, rtol=1e-2),
                                                                            dict(atol=1e-2, rtol=2e-2))
    torch.testing.assert_close(y, y_ref.to(dtype), **tol)
    torch.testing.assert_close(dx, dx_ref.to(dtype), **tol)
    torch.testing.assert_close(dw, dw_ref, **grad_tol)
    torch.testing.assert_close(db, db_ref, **grad_tol)
    torch.testing.assert_close(layer.running_var, pure.running_var)
    layer.eval()
    with torch.autocast("cpu", dtype=dtype):
        torch.testing.assert_close(layer(x.clone()), pure.eval()(x.float()).to(dtype))
