"""The Trainer: epochs, mixed precision, DDP, logging, checkpoints and evaluation.

It knows no method: a :class:`methods.base.Method` supplies the loss terms and hooks, so the loop
below reads the same for FT, MiB, PLOP or DKD.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from dataset.transforms import device_batch
from methods.base import Method, StepContext
from metrics import ConfusionMatrix
from modules.fuse import inference_copy
from utils.distributed import all_reduce_sum
from utils.errors import ConfigError, NaNLossError
from utils.scheduler import poly_lr


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIN_LOSS_SCALE = 1.0  # below it fp16 loses gradient range: the run stops instead of silently not learning


def default_amp_dtype(device: torch.device) -> str:
    """bf16 where the device computes it natively (any CPU, CUDA compute capability >= 8.0): it
    has fp32's range, so no loss scaling; fp16 with loss scaling otherwise."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return "fp16"
    return "bf16"


@dataclass
class Precision:
    """Autocast settings: ``--amp`` turns autocast on, ``--amp_dtype`` (default: the device's,
    see :func:`default_amp_dtype`) picks bf16 or fp16; fp16 trains with a loss-scaling
    GradScaler, on CUDA and on the CPU alike."""

    device: torch.device
    enabled: bool
    dtype_name: Optional[str] = None

    def __post_init__(self):
        self.dtype_name = self.dtype_name or default_amp_dtype(self.device)
        if self.enabled and self.dtype_name == "bf16" and self.device.type == "cuda" \
                and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(self.device)
            raise ConfigError(f"{name} computes no bf16; train with --amp_dtype fp16 (loss-scaled) or without --amp")

    @property
    def dtype(self) -> torch.dtype:
        return AMP_DTYPES[self.dtype_name]

    @property
    def loss_scaling(self) -> bool:
        return self.enabled and self.dtype == torch.float16

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.enabled)

    def inference_copy(self, model: nn.Module, channels_last: bool = False) -> nn.Module:
        """A frozen copy of ``model`` for forward passes only (teacher, evaluation): norms folded
        into the convolutions; on a CPU stored channels-last (oneDNN's faster layout: 1.3x in
        fp32, 1.4x in bf16 for ResNet-101 inference, measured) and, under autocast, in the
        autocast type so that no weight is cast on any call."""
        cpu = self.device.type == "cpu"
        dtype = self.dtype if self.enabled and cpu else None
        return inference_copy(model, dtype, channels_last or cpu)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.loss_scaling)


def nesterov_sgd(param_groups, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """Fused Nesterov SGD (one pass over all parameters) with its momentum buffers made up front.

    Zero buffers give exactly SGD's first step (buffer = gradient when dampening is 0).  Left to
    the fused step, they start as ``torch.empty_like`` and a first step that the fp16 loss scaler
    skips never writes them, so the next step read garbage (NaN on this CPU; torch 2.13's fused
    SGD, CPU and CUDA alike).
    """
    optimizer = torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay,
                                fused=True)
    if momentum:
        for group in optimizer.param_groups:
            for param in group["params"]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return optimizer


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def move_batch(batch, device: torch.device, channels_last: bool) -> dict:
    images, labels = device_batch(batch[0], batch[1], device, channels_last)
    return {"image": images, "label": labels}


class Trainer:
    def __init__(self, model: nn.Module, teacher: Optional[nn.Module], method: Method, opts,
                 device: torch.device, lr: float, iters_per_epoch: int, epochs: int,
                 logger=None, is_main: bool = True):
        self.model = model
        self.teacher = teacher  # exact step t-1 weights: regularisers anchor to them (EWC)
        self.run_teacher = teacher is not None and method.needs_teacher
        self.method = method
        self.opts = opts
        self.device = device
        self.precision = Precision(device, opts.amp, opts.amp_dtype)
        self.teacher_forward = self._teacher_forward(teacher) if self.run_teacher else teacher
        self.optimizer = nesterov_sgd(method.param_groups(unwrap(model), lr), lr, opts.momentum, opts.weight_decay)
        self.scheduler = poly_lr(self.optimizer, epochs * iters_per_epoch, opts.lr_power)
        self.scaler = self.precision.scaler()
        self.logger = logger
        self.is_main = is_main
        self.iteration = 0

    def _teacher_forward(self, teacher: nn.Module) -> nn.Module:
        """What runs the teacher's forward passes: a frozen copy with the norms folded into the
        convolutions (faster), except under ``--fix_bn``.  There the student's norms also use
        running statistics, so at the first iteration it computes the teacher's function exactly,
        as the reference's identical modules do: distillation distances start at exactly 0, with
        a zero gradient.  Folding's rounding would start them at ~1e-4 with a unit-norm gradient
        in a noise direction (PLOP on the demo: 44.3 instead of 74.0 old mIoU after step 1)."""
        if self.opts.fix_bn:
            return teacher
        return self.precision.inference_copy(teacher, self.opts.channels_last)

    # --- one iteration --------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward, loss terms, backward, optimizer and scheduler step; returns detached terms."""
        with self.precision.autocast():
            out = self.model(batch["image"])
            teacher_out = None
            if self.run_teacher:
                with torch.no_grad():
                    teacher_out = self.teacher_forward(batch["image"])
        terms = self.method.loss(batch, out, teacher_out)
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        self.method.after_backward(unwrap(self.model))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        detached = {k: v.detach() for k, v in terms.items()}
        detached["loss"] = loss.detach()
        return detached

    # --- one epoch ------------------------------------------------------------------------------
    def train_epoch(self, loader, epoch: int, progress: Optional[Callable] = None) -> dict[str, float]:
        self.model.train()
        if self.opts.fix_bn:
            unwrap(self.model).freeze_bn()
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=self.device)
        check_every = 1 if self.device.type == "cpu" else self.opts.log_interval
        bar = progress(loader) if progress else loader
        for i, batch in enumerate(bar):
            terms = self.train_step(move_batch(batch, self.device, self.opts.channels_last))
            # Means over the steps that were applied: a step the fp16 scaler skipped has a
            # non-finite loss and changed nothing (no host sync here).
            applied = torch.isfinite(terms["loss"])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + torch.where(applied, v, 0)
            count += applied
            if (i + 1) % check_every == 0 or i + 1 == len(loader):
                # One host sync per interval: catch divergence and feed the logs.
                self._check_divergence(float(terms["loss"]), f"at epoch {epoch} iteration {i} "
                                                             f"(global {self.iteration})")
                if self.is_main and (i + 1) % self.opts.log_interval == 0:
                    self._log_iteration(terms, bar)
        means = {k: v / count for k, v in sums.items()}  # NaN if the scaler skipped every step
        for v in means.values():
            all_reduce_sum(v)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return {k: float(v) / world for k, v in means.items()}

    def _check_divergence(self, loss_value: float, where: str) -> None:
        """Stop a diverged run; let the loss scaler handle fp16 overflow.

        Without loss scaling a non-finite loss has already reached the weights: stop.  Under fp16
        the scaler skips every step whose gradients are not finite (a non-finite loss gives such
        gradients), so the weights are untouched and training goes on with a halved scale; only
        when overflow keeps halving the scale below ``MIN_LOSS_SCALE`` does fp16 no longer fit
        the run, and it stops there.
        """
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            if scale < MIN_LOSS_SCALE:
                raise NaNLossError(
                    f"fp16 overflowed step after step until {where}: the loss scale fell to {scale:g}; the last good "
                    "checkpoint is kept; train with --amp_dtype bf16 (or without --amp), or lower --lr")
            return
        if not math.isfinite(loss_value):
            raise NaNLossError(f"the loss became {loss_value} {where}; the last good checkpoint is kept; "
                               "lower --lr or check the data")

    def _log_iteration(self, terms: dict, bar) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        values = {k: float(v) for k, v in terms.items()}
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
        if self.logger is not None:
            for k, v in values.items():
                self.logger.scalar(f"train/{k}", v, self.iteration)
            self.logger.scalar("train/lr", lr, self.iteration)
            if self.scaler.is_enabled():
                self.logger.scalar("train/loss_scale", self.scaler.get_scale(), self.iteration)

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]

    def context(self, train_loader, task, all_reduce=all_reduce_sum, log=print) -> StepContext:
        return StepContext(model=unwrap(self.model), teacher=self.teacher_forward, previous_model=self.teacher,
                           train_loader=train_loader,
                           device=self.device, task=task, opts=self.opts,
                           autocast=self.precision.autocast, all_reduce=all_reduce, log=log)


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, predict: Callable, device: torch.device,
             precision: Optional[Precision] = None, channels_last: bool = False) -> ConfusionMatrix:
    """Confusion matrix over a loader, summed over ranks.

    Runs a frozen inference copy with the norms folded into the convolutions (modules.fuse);
    ``model`` itself is left as it was.
    """
    precision = precision or Precision(device, False)
    model = precision.inference_copy(unwrap(model), channels_last)
    matrix = ConfusionMatrix(num_classes, device)
    autocast = precision.autocast()
    for batch in loader:
        batch = move_batch(batch, device, channels_last)
        with autocast:
            logits = model(batch["image"])["logits"]
        matrix.update(predict(logits.float()), batch["label"])
    return matrix.all_reduce()


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
