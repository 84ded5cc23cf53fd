"""Activated batch normalisation (the ABN family of mapillary/inplace_abn), in pure PyTorch.

The reference networks (MiB, PLOP; reference/mib_plop.md §3.1) normalise with ``inplace-abn``'s
``ABN`` / ``InPlaceABN`` / ``InPlaceABNSync``: batch norm fused with a leaky ReLU (slope 0.01).
The classes here have the same parameters, buffers, state-dict keys (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``) and weight parameterisation as
inplace-abn 1.1, so checkpoints move between the two implementations unchanged; when the package
is installed :func:`make_norm_act` uses it instead.

What inplace-abn 1.1 computes (``inplace_abn/abn.py``, ``src/inplace_abn_cpu.cpp``):

* ``ABN``:        y = act(BN(x; weight, bias)), plain ``F.batch_norm`` then the activation.
* ``InPlaceABN``: y = act(x_hat * (|weight| + eps) + bias), x_hat = (x - mu) / sqrt(var + eps);
  the weight gradient is multiplied by sign(weight), with sign(0) = +1.
* ``InPlaceABNSync``: as InPlaceABN with mu / var over all replicas of a process group.
* Running statistics: ``r <- (1 - m) r + m s`` with the unbiased batch variance, m = 0.1.
"""
from __future__ import annotations

import copy
import functools
import os
import sys
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from utils.errors import ConfigError

LEAKY_SLOPE = 0.01
NORM_ACT_NAMES = ("iabn_sync", "iabn", "abn", "bn", "std")  # "std" is the reference's name of "bn"


class UnknownNormError(ConfigError):
    """A ``--norm_act`` value that names no normalisation layer."""


def activate(x: Tensor, activation: str, param: float, inplace: bool) -> Tensor:
    """The activations inplace-abn's ABN accepts, by name (``activation_param`` = slope / alpha)."""
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope=param, inplace=inplace)
    if activation == "identity":
        return x
    if activation == "relu":
        return F.relu(x, inplace=inplace)
    if activation == "elu":
        return F.elu(x, alpha=param, inplace=inplace)
    raise ValueError(f"unknown activation '{activation}'; use leaky_relu, identity, relu or elu")


class ABN(nn.Module):
    """Batch norm + activation with inplace-abn 1.1 ``ABN``'s parameters and semantics.

    ``activation`` may be changed after construction (the residual blocks set "identity" on the
    norm that precedes the residual sum, §3.1).
    """

    _version = 2  # state-dict version 2 has num_batches_tracked, as in inplace-abn 1.1

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        activation: str = "leaky_relu",
        activation_param: float = LEAKY_SLOPE,
    ):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.activation = activation
        self.activation_param = activation_param
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def scale(self) -> Tensor:
        """Multiplier of the normalised input: the raw weight for ABN."""
        return self.weight

    def normalise(self, x: Tensor) -> Tensor:
        """BN with batch statistics in training (updating the running ones), running ones in eval."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.scale(), self.bias,
            self.training, self.momentum, self.eps,
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        # In-place activation on BN's fresh output is safe: BN's backward does not read it.
        return activate(self.normalise(x), self.activation, self.activation_param, inplace=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args):
        # As inplace-abn 1.1: checkpoints older than version 2 (e.g. the ImageNet ResNet-101
        # of mapillary/inplace_abn) have no num_batches_tracked; it defaults to 0.
        key = prefix + "num_batches_tracked"
        if local_metadata.get("version", None) is None or local_metadata["version"] < 2:
            state_dict.setdefault(key, torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"activation={self.activation}[{self.activation_param}]"
        )


class InPlaceABN(ABN):
    """inplace-abn's ``InPlaceABN`` without the in-place trick: the scale is |weight| + eps.

    The invertibility that makes the package's in-place backward possible needs a non-zero
    scale, hence |w| + eps (``forward_cpu`` in ``src/inplace_abn_cpu.cpp``).  Its weight
    gradient is sign(w) * dL/dscale with sign(0) = +1; multiplying by a detached sign
    reproduces that, where ``abs`` would give 0 at w = 0.
    """

    def scale(self) -> Tensor:
        sign = torch.where(self.weight < 0, -1.0, 1.0).to(self.weight.dtype)
        return self.weight * sign + self.eps


class InPlaceABNSync(InPlaceABN):
    """``InPlaceABNSync``: batch statistics over all replicas of ``group`` (default: WORLD).

    Differentiable: the per-replica sums go through ``torch.distributed.nn.functional.all_reduce``,
    whose backward all-reduces the gradients, so each replica's input gradient includes the
    other replicas' losses through the shared mean / variance, exactly as in inplace-abn's
    ``_reduce_backward``.  Works with gloo (CPU) and NCCL.  Outside a distributed run, or with
    one replica, or in eval mode, it is :class:`InPlaceABN`.
    """

    def __init__(self, num_features: int, *args: Any, group: Optional[Any] = None, **kwargs: Any):
        super().__init__(num_features, *args, **kwargs)
        self.group = group

    def __deepcopy__(self, memo: dict) -> "InPlaceABNSync":
        # Process groups cannot be copied (or pickled): a copy, e.g. a teacher, shares the group.
        memo.setdefault(id(self.group), self.group)
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__dict__, memo))
        return clone

    def world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def normalise(self, x: Tensor) -> Tensor:
        if not self.training or self.world_size() == 1:
            return super().normalise(x)
        mean, var = self._global_stats(x)
        inv_std = torch.rsqrt(var + self.eps)
        scale = self.scale() * inv_std
        shift = self.bias - mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x * scale.view(shape) + shift.view(shape)).to(x.dtype)

    def _global_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and biased variance over every replica's (N, H, W); updates the running stats.

        Each replica sends n_r * m_r and M2_r + n_r * m_r^2 (M2_r = sum of squared deviations
        from its own mean m_r) and n_r; summed they give N * mu and sum x^2, so
        var = sum x^2 / N - mu^2.  Centring locally and combining in float64 avoids the
        cancellation of a plain E[x^2] - E[x]^2 in float32 (Chan et al.'s parallel variance).
        """
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = xf.numel() // xf.shape[1]
        local_mean = xf.mean(dims)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        m2 = (xf - local_mean.view(shape)).square().sum(dims)
        local_mean, m2 = local_mean.double(), m2.double()
        n = torch.full((1,), float(count), dtype=torch.float64, device=x.device)
        local = torch.cat([count * local_mean, m2 + count * local_mean.square(), n])
        sums = differentiable_all_reduce(local, self.group)
        c = self.num_features
        total = sums[2 * c]
        mean = sums[:c] / total
        var = (sums[c : 2 * c] / total - mean.square()).clamp_min(0)
        with torch.no_grad():
            unbiased = var * (total / (total - 1))
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.to(self.running_var.dtype))
        return mean.float(), var.float()


def differentiable_all_reduce(tensor: Tensor, group: Optional[Any]) -> Tensor:
    """Sum over the replicas of ``group``; the backward pass sums the gradients the same way.

    torch >= 2.13 registers autograd for the functional collective, which also works under
    ``torch.compile``; older versions have ``torch.distributed.nn.functional.all_reduce``,
    which torch 2.13 deprecates.
    """
    from torch.distributed import _functional_collectives as funcol

    if hasattr(funcol, "all_reduce_backward"):
        return funcol.all_reduce(tensor, "sum", group if group is not None else dist.group.WORLD)
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, group=group if group is not None else dist.group.WORLD)


class BatchNormAct(nn.BatchNorm2d):
    """``--norm_act bn``: torch's BatchNorm2d followed by the activation (leaky ReLU by default).

    The reference's ``std`` used a bare BatchNorm2d, which has no activation and so silently
    removes every non-linearity from the residual blocks (§3.1); this is the working version.
    Do not pass it through ``nn.SyncBatchNorm.convert_sync_batchnorm`` (the activation would be
    lost); synchronised statistics are ``iabn_sync``.
    """

    def __init__(self, num_features: int, activation: str = "leaky_relu", activation_param: float = LEAKY_SLOPE):
        super().__init__(num_features)
        self.activation = activation
        self.activation_param = activation_param

    def forward(self, x: Tensor) -> Tensor:
        return activate(super().forward(x), self.activation, self.activation_param, inplace=True)


INPLACE_ABN_ENV = "CSSBENCH_INPLACE_ABN"


def _inplace_abn_package():
    """The installed ``inplace_abn`` module, or None (it is an optional acceleration).

    ``CSSBENCH_INPLACE_ABN=0`` keeps the pure-PyTorch layers although it is installed (the test
    suite does, so that it tests the same code on every machine), ``=1`` requires it.
    """
    choice = os.environ.get(INPLACE_ABN_ENV, "")
    if choice == "0":
        return None
    try:
        import inplace_abn
    except ImportError:
        if choice == "1":
            raise ConfigError(f"{INPLACE_ABN_ENV}=1 asks for inplace-abn, which is not importable; install it "
                              f"(README, Model) or unset {INPLACE_ABN_ENV}") from None
        return None
    return inplace_abn


def kernel_takes(x: Tensor) -> bool:
    """Whether inplace-abn's compiled kernels take ``x`` with fp32 weights and statistics: fp32
    anywhere, fp16 only on CUDA (its ``include/dispatch.h``; the CPU kernels need input and
    weight of one type, and no kernel has bf16)."""
    return x.dtype == torch.float32 or (x.dtype == torch.float16 and x.is_cuda)


class _AutocastSafe:
    """Mixin for inplace-abn's kernel-backed layers: under autocast, an input the kernels do not
    take (bf16 anywhere, fp16 on a CPU) is normalised in fp32, with the fp32 weights and
    statistics the package requires, and handed on in its own type."""

    def forward(self, x: Tensor) -> Tensor:
        if kernel_takes(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


@functools.cache
def package_layers(package) -> dict[str, type]:
    """inplace-abn's layers by ``--norm_act`` name, the kernel-backed ones autocast-safe.  ``abn``
    is the package's plain ``F.batch_norm`` layer, which autocast already serves."""
    def safe(cls: type) -> type:
        return type(cls.__name__, (_AutocastSafe, cls), {"__module__": __name__, "__doc__": cls.__doc__})

    return {"abn": package.ABN, "iabn": safe(package.InPlaceABN), "iabn_sync": safe(package.InPlaceABNSync)}


def make_norm_act(name: str, group: Optional[Any] = None) -> Callable[[int], nn.Module]:
    """Factory ``num_features -> norm layer`` for ``--norm_act`` (reference/mib_plop.md §3.1, §7).

    ``group`` is the process group ``iabn_sync`` synchronises over; it is passed explicitly
    because inplace-abn >= 1.1 does not synchronise without it (mapillary/inplace_abn#219).
    """
    if name == "std":
        name = "bn"
    if name not in NORM_ACT_NAMES:
        raise UnknownNormError(f"unknown --norm_act '{name}'; choose one of {', '.join(NORM_ACT_NAMES)}")
    act = dict(activation="leaky_relu", activation_param=LEAKY_SLOPE)
    if name == "bn":
        return partial(BatchNormAct, **act)
    package = _inplace_abn_package()
    layers = package_layers(package) if package is not None else {}
    if name == "iabn_sync" and package is not None and group is None:
        name = "iabn"  # one process: nothing to synchronise, and the package's layer would need a process group
    if name == "iabn_sync":
        # The package reduces statistics across replicas only in its CUDA kernels; CPU (gloo)
        # runs keep the pure layer.
        usable = package is not None and torch.cuda.is_available() and hasattr(package._backend, "reduce_statistics")
        cls = layers["iabn_sync"] if usable else InPlaceABNSync
        return partial(cls, **act, **({} if group is None else {"group": group}))
    return partial(layers.get(name, {"iabn": InPlaceABN, "abn": ABN}[name]), **act)


def is_norm_layer(module: nn.Module) -> bool:
    """True for every normalisation layer this project can build (any ``--norm_act``)."""
    if isinstance(module, (ABN, nn.modules.batchnorm._BatchNorm)):
        return True
    package = sys.modules.get("inplace_abn")  # its layers exist only once it is imported
    return package is not None and isinstance(module, package.ABN)


def norm_affine(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(m, s) with eval-mode ``norm(x) = m * x + s`` per channel (before any activation), in fp32.

    The multiplier of the normalised input is the weight for ABN / BatchNorm and |weight| + eps
    for the in-place variants (ours and inplace-abn's); a norm without affine parameters uses 1, 0.
    """
    package = sys.modules.get("inplace_abn")
    if isinstance(module, ABN):
        weight = module.scale()
    elif package is not None and isinstance(module, package.InPlaceABN):
        weight = module.weight.abs() + module.eps
    else:
        weight = module.weight
    var = module.running_var.float()
    weight = torch.ones_like(var) if weight is None else weight.detach().float()
    bias = torch.zeros_like(var) if module.bias is None else module.bias.detach().float()
    mult = weight * torch.rsqrt(var + module.eps)
    return mult, bias - module.running_mean.float() * mult


def freeze_norm_layers(model: nn.Module) -> None:
    """``--fix_bn``: norm layers in eval mode (running statistics) with frozen affine parameters.

    As MiB/PLOP's ``fix_bn``.  A later ``model.train()`` puts them back in training mode unless
    the caller re-applies this (``IncrementalSegmentationModule.freeze_bn`` does).
    """
    for module in model.modules():
        if is_norm_layer(module):
            module.eval()
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
