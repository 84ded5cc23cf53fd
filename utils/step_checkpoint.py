"""The checkpoints of a step: what they record, what must match before one is used, resuming.

``step-<t>.pth`` is a finished step (the teacher of step t+1); ``step-<t>.last.pth`` is the
state after the last validated epoch of an unfinished one.  Both record the task (classes
learned so far) and the architecture, which must match the model they are loaded into; the
epoch checkpoint also records the flags of the run and the method's in-step statistics, so that
a resumed step continues exactly as the interrupted one would have (README, "Reliability").
"""
from __future__ import annotations

from pathlib import Path

from dataset.tasks import Task
from utils import checkpoint
from utils.errors import CheckpointError

# Options that change the network's function (parameter shapes are checked by the load itself).
# --norm_act is not one: every variant computes BN + leaky ReLU with the same state-dict keys.
ARCHITECTURE = ("backbone", "width", "output_stride", "head", "pooling")

# Options that do not change a step's weights: a resume, or a rerun that reuses a finished step,
# may alter them.  With per-sample augmentation seeds (dataset/loaders.py) the number of workers is
# one of them; so is every evaluation setting (the validation set's size, crops and batch), as a
# reused step is tested anew under the rerun's.
RESUME_NEUTRAL = frozenset({
    "name", "logdir", "results_file", "test", "overwrite", "step", "step_ckpt", "ckpt", "no_progress",
    "log_interval", "val_interval", "sample_num", "num_workers", "device", "local_rank", "data_root",
    "cache_dir", "opt_level", "method_cls", "crop_val", "val_batch_size", "shapes_val_size",
})
PER_STEP = ("epochs", "lr")  # per-step flags: only the value of the resumed step matters


def task_record(task: Task) -> dict:
    return {"dataset": task.dataset, "task": task.name, "step": task.step,
            "classes": task.all_steps[: task.step + 1]}


def architecture_record(opts) -> dict:
    return {k: getattr(opts, k, None) for k in ARCHITECTURE}


def options_record(opts) -> dict:
    """The options that determine a step's weights (saved in its checkpoints): a resumed run,
    or one with other workers or log settings, writes the same bytes."""
    return {k: v for k, v in vars(opts).items() if k not in RESUME_NEUTRAL}


def check_checkpoint(ckpt: dict, task: Task, opts, path) -> None:
    """Refuse a checkpoint trained on other classes or with another architecture (it would load
    silently, or compute another function, and mislead).

    Only the dataset and the classes learned so far must agree, so a step-0 model serves every
    task that shares its base classes (15-5 and 15-1, say), as in the references.
    """
    expected = task_record(task)
    found = ckpt.get("task") or {}
    if found.get("dataset") != expected["dataset"] or found.get("classes") != expected["classes"]:
        def describe(r):
            return f"{r.get('dataset')} {r.get('task')} step {r.get('step')}" if r else "an unknown setting"
        raise CheckpointError(
            f"checkpoint {path} holds {describe(found)}, but {describe(expected)} (same classes) is needed; "
            "pass the right --step_ckpt/--ckpt or use another --name")
    saved = ckpt.get("architecture") or {}
    for key, value in architecture_record(opts).items():
        if key in saved and saved[key] != value:
            raise CheckpointError(f"checkpoint {path} was trained with --{key} {saved[key]}, this run uses "
                                  f"--{key} {value}; use the same --backbone/--width/--output_stride/--head/"
                                  "--pooling as when it was trained")


def load_weights(model, state: dict, path, strict: bool = True, allowed_missing: str = "") -> None:
    state = checkpoint.strip_module_prefix(state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: another backbone / width / class split
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {path} does not fit this model ({first}); use the same "
                              "--backbone/--width/--output_stride/--norm_act as when it was trained") from None
    bad = [k for k in missing if not (allowed_missing and k.startswith(allowed_missing))] + list(unexpected)
    if strict and bad:
        raise CheckpointError(f"checkpoint {path} does not fit this model (keys {bad[:3]}...); use the same "
                              "--backbone/--width/--output_stride/--norm_act as when it was trained")


def previous_checkpoint(opts, step: int, index: int, directory: Path) -> tuple[Path, dict]:
    """The step t-1 checkpoint, the teacher of step t, loaded."""
    path = previous_checkpoint_path(opts, step, index, directory)
    return path, checkpoint.load(path)


def previous_checkpoint_path(opts, step: int, index: int, directory: Path) -> Path:
    """The step t-1 checkpoint's file: ``--step_ckpt`` for the first requested step, else the run
    directory's."""
    path = Path(opts.step_ckpt) if (opts.step_ckpt and index == 0) else directory / f"step-{step - 1}.pth"
    if not path.is_file():
        raise CheckpointError(f"step {step} needs the step {step - 1} checkpoint {path}, which does not exist; "
                              f"train step {step - 1} first (--step {step - 1}) or pass --step_ckpt")
    return path


def refuse_changed_flags(state: dict, opts, path, done: str, fix: str) -> None:
    """Raise when one of this run's flags would train the checkpoint's step otherwise than its
    recorded flags did (``done``: what happened to ``path`` under them)."""
    step = state["task"]["step"]
    saved, now = state.get("opts") or {}, options_record(opts)
    for key in sorted(set(saved) & set(now) - RESUME_NEUTRAL):
        before, after = saved[key], now[key]
        if key in PER_STEP:
            before, after = (v[min(step, len(v) - 1)] for v in (before, after))  # argparser.per_step
        if before != after:
            raise CheckpointError(f"{path} was {done} with --{key} {_flag(before)}, this run passes "
                                  f"--{key} {_flag(after)}; {fix}")


def check_resumable(state: dict, opts, world_size: int, teacher_digest, path) -> None:
    """Refuse to resume a step under other flags, another number of processes or another
    teacher: the remaining epochs would not be the ones the interrupted run had left."""
    step = state["task"]["step"]
    fix = f"rerun with the flags of the interrupted run, or pass --overwrite to restart step {step}"
    refuse_changed_flags(state, opts, path, "interrupted", fix)
    if state.get("world_size", world_size) != world_size:
        raise CheckpointError(f"{path} was interrupted with {state['world_size']} processes, this run has "
                              f"{world_size}; {fix}")
    if state.get("teacher_digest") != teacher_digest:
        raise CheckpointError(f"the step {step - 1} checkpoint changed since {path} was written; {fix}")


def check_reusable(state: dict, opts, teacher_digest, path) -> None:
    """Refuse to reuse a finished step that this run's flags or teacher would train differently:
    its scores would be reported under a command that did not produce them.  (Checkpoints
    written before the teacher's digest was recorded are checked on their flags only.)"""
    step = state["task"]["step"]
    fix = f"pass --overwrite to retrain step {step}, or another --name to keep both"
    refuse_changed_flags(state, opts, path, "trained", fix)
    if "teacher_digest" in state and state["teacher_digest"] != teacher_digest:
        raise CheckpointError(f"the step {step - 1} checkpoint changed since {path} was trained from it; {fix}")


def _flag(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def epoch_checkpoint(model, trainer, method, epoch: int, task: Task, opts, world_size: int,
                     teacher_digest) -> dict:
    """Everything the remaining epochs of a step depend on; global random streams are not in it
    because every epoch reseeds them (utils/seeding.py)."""
    return {"model": model.state_dict(), "trainer": trainer.state_dict(), "epoch": epoch,
            "task": task_record(task), "architecture": architecture_record(opts), "opts": options_record(opts),
            "world_size": world_size, "teacher_digest": teacher_digest, "method_in_step": method.in_step_state()}


def step_checkpoint(model, trainer, method, epochs: int, task: Task, opts, teacher_digest) -> dict:
    """A finished step: the teacher of the next one, with the method's state for it, and the
    digest of its own teacher's file (``check_reusable``)."""
    return {"model": model.state_dict(), "trainer": trainer.state_dict(), "epoch": epochs - 1,
            "method": opts.method, "method_state": method.state_dict(), "task": task_record(task),
            "architecture": architecture_record(opts), "opts": options_record(opts),
            "teacher_digest": teacher_digest}


def resume(path: Path, model, trainer, method, task: Task, opts, world_size: int, teacher_digest) -> int:
    """Load the epoch checkpoint ``path`` into the model, the trainer and the method (after its
    ``before_step``); returns the epoch to continue with."""
    state = checkpoint.load(path)
    check_checkpoint(state, task, opts, path)
    check_resumable(state, opts, world_size, teacher_digest, path)
    load_weights(model, state["model"], path)
    trainer.load_state_dict(state["trainer"])
    method.load_in_step_state(state["method_in_step"])
    return state["epoch"] + 1
