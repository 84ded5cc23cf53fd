"""EWC, RW and PI: parameter-importance regularisers, as MiB's ``utils/regularizer.py`` (§4.5-§4.7).

All three penalise ``importance * sum_params sum Omega_hat * (theta - theta_teacher)^2`` over the
parameters the step t-1 model (the teacher) has -- the new classifier is free -- where
``Omega_hat`` comes from statistics gathered while training step t-1 and stored in its
checkpoint, min-max normalised per tensor (``--reg_no_normalize`` keeps them raw).  Each
regulariser also gathers the statistics of the current step, at step 0 too.

One backward instead of two.  The reference back-propagates the task loss, updates its
statistics from that gradient, then back-propagates the penalty.  Our Trainer back-propagates
the sum once, so :meth:`Regularizer.update` subtracts the analytic penalty gradient
``2 * importance * Omega_hat * (theta - theta_teacher)`` from ``p.grad`` before reading it: the
statistics see the task-loss gradient only, and the optimizer sees the sum, as in the reference.

Distributed training.  The reference updates the statistics on rank 0 only (rank 0 writes the
checkpoint).  Here every rank updates them from its ``p.grad``, which after DDP's backward is
the all-reduced gradient -- the same tensor rank 0 has -- so every rank holds the reference's
statistics and nothing needs to be communicated.

AMP.  When a GradScaler finds inf/nan gradients it skips the optimizer step; the update is
skipped too (the reference would write inf into its Fisher).  The check stays on the device:
no ``.item()`` or host synchronisation per iteration, and every statistic lives on the
parameters' device (the reference parks RW's and PI's parameter snapshots on the CPU).

Deviation: at step > 0 missing step t-1 statistics raise :class:`MethodStateError`, where the
reference silently trains without a penalty.  Importances: MiB's presets use 500 for EWC and
PI, PLOP's 100 (RW: 100 in both).
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from .base import MethodStateError

NORMALIZE_EPS = 1e-8   # utils/regularizer.py: normalize_fn
RW_EPS = 1e-8          # RW score denominator
PI_EPS = 1e-20         # PI score denominator

TensorDict = dict[str, Tensor]


def min_max_normalize(x: Tensor) -> Tensor:
    """Per-tensor ``(x - min) / (max - min + 1e-8)`` of the reference's ``normalize_fn`` (§4.5)."""
    return (x - x.min()) / (x.max() - x.min() + NORMALIZE_EPS)


def _all_finite(grads: list[Tensor]) -> Tensor:
    """0-dim bool on the gradients' device: no inf/nan anywhere (no host sync)."""
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


class Regularizer:
    """Shared life cycle: load step t-1 statistics, start on the student, update, penalise, save.

    Subclasses define ``name``, ``required`` (the statistics a checkpoint must carry),
    ``_importance_from`` (Omega_hat of the penalty), ``_start_statistics`` / ``_update_statistics``
    and ``_saved_statistics``.
    """

    name: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    in_step: ClassVar[tuple[str, ...]]  # attributes updated during a step (saved in epoch checkpoints)

    def __init__(self, importance: float, alpha: float = 0.9, iterations: int = 10, normalize: bool = True):
        self.importance = float(importance)
        self.alpha = float(alpha)           # EMA factor of the online Fisher (EWC, RW)
        self.iterations = int(iterations)   # RW: iterations between path-score updates
        self.normalize = normalize
        self.previous: Optional[dict[str, TensorDict]] = None  # raw step t-1 statistics, by kind and name
        self.params: dict[str, nn.Parameter] = {}    # trainable student parameters
        self.anchor: TensorDict = {}                 # theta_teacher of the trainable parameters it has
        self.omega: TensorDict = {}                  # Omega_hat of the penalised parameters
        self.started = False
        self._penalty_pending = False  # a penalty with a gradient was built since the last update

    # --- across steps ---------------------------------------------------------------------
    def load_previous(self, state: Optional[dict]) -> None:
        """Take the statistics the step t-1 regulariser saved; missing ones are a user error."""
        if state is None or state.get("name") != self.name or any(k not in state for k in self.required):
            found = "none" if state is None else f"'{state.get('name')}'"
            raise MethodStateError(
                f"the previous step's checkpoint has no {self.name} statistics (found {found}); train the "
                f"previous step with the same --method / --regularizer {self.name}"
            )
        self.previous = {k: state[k] for k in self.required}

    def start(self, model: nn.Module, teacher: Optional[nn.Module]) -> None:
        """Snapshot the teacher's parameters and build the penalty (``before_step``)."""
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.anchor, self.omega = {}, {}
        if teacher is not None:
            if self.previous is None:
                raise MethodStateError(
                    f"{self.name} at step > 0 needs the previous step's statistics; train the previous "
                    f"step with the same --method / --regularizer {self.name}"
                )
            for n, t in teacher.named_parameters():
                if n in self.params:
                    self.anchor[n] = t.detach().to(self.params[n].device, torch.float32, copy=True)
            if not self.anchor:  # e.g. a torch.compile'd student: names gain "_orig_mod."
                raise RuntimeError(f"{self.name}: no trainable student parameter has a teacher parameter's name; "
                                   "pass the plain (not compiled, not DDP-wrapped) modules")
            importance = self._importance_from(self.previous)
            self.omega = {n: importance[n].to(a.device, torch.float32) for n, a in self.anchor.items() if n in importance}
        self._start_statistics()
        self.started = True

    def state_dict(self) -> dict:
        """Statistics of this step, on the CPU, for the step checkpoint."""
        return {"name": self.name, **{k: {n: v.detach().cpu() for n, v in d.items()}
                                      for k, d in self._saved_statistics().items()}}

    def in_step_state(self) -> dict:
        """The running statistics (``in_step``: attribute names), copied to the CPU."""
        return {k: _to(getattr(self, k), "cpu", copy=True) for k in self.in_step}

    def load_in_step_state(self, state: dict) -> None:
        device = next(iter(self.params.values())).device if self.params else "cpu"
        for k in self.in_step:
            setattr(self, k, _to(state[k], device, copy=True))

    # --- every iteration ------------------------------------------------------------------
    def penalty(self) -> Optional[Tensor]:
        """``importance * sum Omega_hat (theta - theta_teacher)^2``; None when nothing is penalised."""
        if not self.omega or self.importance == 0:
            return None
        total = sum((self.omega[n] * (self.params[n] - self.anchor[n]).pow(2)).sum() for n in self.omega)
        self._penalty_pending = total.requires_grad
        return self.importance * total

    @torch.no_grad()
    def update(self, penalty_in_grad: Optional[bool] = None) -> None:
        """After backward: statistics from the task-loss gradient.

        ``penalty_in_grad``: ``p.grad`` also holds the gradient of this iteration's
        :meth:`penalty`, which is then subtracted (parameters are unchanged since the forward).
        By default: whether :meth:`penalty` built a differentiable penalty since the last update,
        which is the Trainer's order (loss, one backward, ``after_backward``).
        """
        if penalty_in_grad is None:
            penalty_in_grad = self._penalty_pending
        self._penalty_pending = False
        grads = {}
        for n, p in self.params.items():
            if p.grad is None:
                continue
            g = p.grad.float()
            if penalty_in_grad and n in self.omega:
                g = g - 2 * self.importance * self.omega[n] * (p.detach() - self.anchor[n])
            grads[n] = g
        if grads:
            self._update_statistics(grads, _all_finite(list(grads.values())))

    # --- per regulariser ------------------------------------------------------------------
    def _importance_from(self, previous: dict[str, TensorDict]) -> TensorDict:
        raise NotImplementedError

    def _start_statistics(self) -> None:
        raise NotImplementedError

    def _update_statistics(self, grads: TensorDict, finite: Tensor) -> None:
        raise NotImplementedError

    def _saved_statistics(self) -> dict[str, TensorDict]:
        raise NotImplementedError

    def _norm(self, x: Tensor) -> Tensor:
        return min_max_normalize(x) if self.normalize else x

    def _continued_fisher(self) -> TensorDict:
        """Online Fisher continued from step t-1's (raw) one; ones for parameters new at step t."""
        old = (self.previous or {}).get("fisher", {})
        return {
            n: old[n].to(p.device, torch.float32, copy=True) if n in old else torch.ones_like(p, dtype=torch.float32)
            for n, p in self.params.items()
        }

    def _take_snapshot(self, snapshot: Optional[TensorDict]) -> TensorDict:
        """Copy of all trainable parameters, reusing ``snapshot``'s storage after the first call."""
        if snapshot is None:
            return {n: p.detach().float().clone() for n, p in self.params.items()}
        for n, p in self.params.items():
            snapshot[n].copy_(p.detach())
        return snapshot

    def _ema_fisher(self, fisher: TensorDict, grads: TensorDict, finite: Tensor) -> None:
        """Online Fisher (EWC §4.5): ``F <- alpha * g^2 + (1 - alpha) * F`` every iteration."""
        for n, g in grads.items():
            new = self.alpha * g.pow(2) + (1 - self.alpha) * fisher[n]
            fisher[n].copy_(torch.where(finite, new, fisher[n]))


class EWC(Regularizer):
    """Elastic Weight Consolidation, online variant (Kirkpatrick et al., PNAS 2017; §4.5).

    Omega_hat = norm(F^{t-1}).  Presets: importance 500 in the MiB repo, 100 in PLOP's.
    """

    name = "ewc"
    required = ("fisher",)
    in_step = ("fisher",)

    def _importance_from(self, previous):
        return {n: self._norm(f.float()) for n, f in previous["fisher"].items()}

    def _start_statistics(self):
        self.fisher = self._continued_fisher()

    def _update_statistics(self, grads, finite):
        self._ema_fisher(self.fisher, grads, finite)

    def _saved_statistics(self):
        return {"fisher": self.fisher}


class RW(Regularizer):
    """Riemannian Walk (Chaudhry et al., ECCV 2018; §4.6): online Fisher plus a path score.

    Every ``iterations`` iterations, with theta_prev the parameters ``iterations`` iterations
    earlier and F the Fisher *before* this iteration's EMA update,
    ``S <- S + g * (theta_prev - theta) / (0.5 * F * (theta - theta_prev)^2 + 1e-8)``.
    Saved score: ``max(S, 0)``, averaged as ``0.5 * (S + S^{t-1})`` where a raw step t-1 score
    exists.  Omega_hat = norm(F^{t-1}) + norm(S^{t-1}).  Preset importance 100 (both repos).
    The reference keeps theta_prev on the CPU; here it stays on the parameters' device.
    """

    name = "rw"
    required = ("fisher", "score")
    in_step = ("fisher", "score", "snapshot", "count")

    def _importance_from(self, previous):
        importance = {n: self._norm(f.float()) for n, f in previous["fisher"].items()}
        for n, s in previous["score"].items():
            if n in importance:
                importance[n] = importance[n] + self._norm(s.float())
        return importance

    def _start_statistics(self):
        self.fisher = self._continued_fisher()
        self.score = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.snapshot: Optional[TensorDict] = None
        self.count = 0

    def _update_statistics(self, grads, finite):
        if self.count % self.iterations == 0:
            if self.snapshot is not None:
                for n, g in grads.items():
                    step = self.snapshot[n] - self.params[n].detach()
                    increment = g * step / (0.5 * self.fisher[n] * step.pow(2) + RW_EPS)
                    self.score[n].add_(torch.where(finite, increment, torch.zeros_like(increment)))
            self.snapshot = self._take_snapshot(self.snapshot)
        self.count += 1
        self._ema_fisher(self.fisher, grads, finite)

    def _saved_statistics(self):
        old = (self.previous or {}).get("score", {})
        score = {}
        for n, s in self.score.items():
            positive = torch.where(s >= 0, s, torch.zeros_like(s))
            score[n] = 0.5 * (positive + old[n].to(s.device, torch.float32)) if n in old else positive
        return {"fisher": self.fisher, "score": score}


class PI(Regularizer):
    """Path Integral / Synaptic Intelligence (Zenke et al., ICML 2017; §4.7).

    Every iteration after the first, with theta_prev the parameters at the previous iteration
    (the reference pairs the *current* gradient with the last update):
    ``delta <- delta + g * (theta_prev - theta)``.  Saved score:
    ``Omega = max(0, delta / ((theta_end - theta_start)^2 + 1e-20)) + Omega^{t-1}`` with
    theta_start the teacher's value, or the value at the start of the step for parameters the
    teacher lacks.  Omega_hat = norm(Omega^{t-1}).  Presets: importance 500 in the MiB repo,
    100 in PLOP's.
    """

    name = "pi"
    required = ("score",)
    in_step = ("delta", "start_point", "snapshot")

    def _importance_from(self, previous):
        return {n: self._norm(s.float()) for n, s in previous["score"].items()}

    def _start_statistics(self):
        self.delta = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.start_point = {
            n: self.anchor[n] if n in self.anchor else p.detach().float().clone() for n, p in self.params.items()
        }
        self.snapshot: Optional[TensorDict] = None

    def _update_statistics(self, grads, finite):
        if self.snapshot is not None:
            for n, g in grads.items():
                increment = g * (self.snapshot[n] - self.params[n].detach())
                self.delta[n].add_(torch.where(finite, increment, torch.zeros_like(increment)))
        self.snapshot = self._take_snapshot(self.snapshot)

    def _saved_statistics(self):
        old = (self.previous or {}).get("score", {})
        score = {}
        for n, d in self.delta.items():
            theta = self.params[n].detach().float()
            s = d / ((theta - self.start_point[n]).pow(2) + PI_EPS)
            s = torch.where(s > 0, s, torch.zeros_like(s))
            score[n] = s + old[n].to(s.device, torch.float32) if n in old else s
        return {"score": score}


def _to(value, device, copy: bool = False):
    """``value`` (a tensor, a dict of tensors, or anything else) on ``device``."""
    if isinstance(value, Tensor):
        return value.detach().to(device, copy=copy)
    if isinstance(value, dict):
        return {k: _to(v, device, copy) for k, v in value.items()}
    return value


REGULARIZERS: dict[str, type[Regularizer]] = {cls.name: cls for cls in (EWC, RW, PI)}


def make_regularizer(name: str, importance: float, alpha: float, iterations: int, normalize: bool) -> Regularizer:
    """The regulariser of ``--regularizer name``."""
    return REGULARIZERS[name](importance, alpha=alpha, iterations=iterations, normalize=normalize)
