"""How much of PLOP's POD distance at the start of a step is batch norm, not forgetting.

At step t the teacher (the step t-1 model) runs with its running statistics, the student (the
same weights at the first iteration) in training mode with the statistics of its batch, as in
the reference.  So POD starts above zero even though nothing has been forgotten yet.  This
script measures that gap per distilled layer and batch size, on the training images of step
t-1 (where the running statistics were gathered) and of step t (what POD sees):

    d_l = || Phi(f(train-mode map)) - Phi(f(eval-mode map)) ||_2 / || Phi(f(eval-mode map)) ||_2

(Phi the Local POD embedding, f the ``--pod_prepro`` transform), averaged over images and
batches.  On step t-1's images it is batch noise and shrinks with the batch size; on step t's
it also holds the shift between the two steps' image statistics, which no batch size removes.
Below each table: how far those images' channel means sit from the first norm layer's running
means, in running standard deviations (the shift at its source), and per block the largest
eval-mode input variance over running variance (near 1 where the running statistics describe
the teacher's eval-mode maps; far above it POD starts far from zero); then, for every step's images,
that shift at the first norm layer and averaged over each block's norm layers (what the content
does deeper down, where the student's training-mode norms replace the running statistics).

    python scripts/pod_gap.py --dataset shapes --task 15-1 --overlap --step 1 \\
        $(cat scripts/demo_flags.txt) --logdir runs --name PLOP --batch_sizes 4 16 64
    python scripts/pod_gap.py ... --ckpt path/to/step-0.pth   # any step t-1 checkpoint
    python scripts/pod_gap.py ... --per_class                  # and the shift of each class's images

Takes run.py's flags (dataset, task, model, ``--step t``); the checkpoint defaults to the
run's ``step-{t-1}.pth``.
"""
from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import run  # noqa: E402  (run.py's model builder and its user errors)
from argparser import parse_args, run_dir  # noqa: E402
from dataset import build_datasets  # noqa: E402
from dataset.incremental import DataOptions, IncrementalSegmentation, indexed_split  # noqa: E402
from dataset.presence import select_images  # noqa: E402
from dataset.tasks import Task  # noqa: E402
from dataset.transforms import device_batch, train_transform  # noqa: E402
from methods.pod import PREPRO, distilled_layers, local_pod_embedding, pod_distance, pod_loss  # noqa: E402
from modules.norm_drift import norm_shifts, variance_ratios  # noqa: E402
from utils import checkpoint  # noqa: E402
from utils.distributed import DistInfo, resolve_device  # noqa: E402
from utils.errors import ConfigError  # noqa: E402
from utils.modes import eval_mode  # noqa: E402
from utils.seeding import seed_everything  # noqa: E402
from utils.cli import ToolParser, script_main  # noqa: E402

LAYERS = ["stage 1", "stage 2", "stage 3", "stage 4", "head"]


@torch.no_grad()
def norm_mode_gap(model: nn.Module, images: torch.Tensor, scales=(1, 2, 4), prepro: str = "pow",
                  train_copy: Optional[nn.Module] = None) -> list[float]:
    """Per layer, the mean over ``images`` of the relative POD distance between ``model`` with
    batch statistics (training mode) and with running statistics (eval mode).  ``model`` is not
    modified: the training-mode pass runs on ``train_copy`` (a copy of ``model``, made here if
    not given; its moved running statistics do not matter to training-mode outputs, so one copy
    serves every batch).  The five feature layers only: at identical weights the logits' gap is
    theirs through the classifier."""
    train_copy = copy.deepcopy(model) if train_copy is None else train_copy
    with eval_mode(model):
        teacher = distilled_layers(model(images), with_logits=False)
    student = distilled_layers(train_copy.train()(images), with_logits=False)
    gaps = []
    for a, b in zip(teacher, student, strict=True):
        size = local_pod_embedding(PREPRO[prepro](a), scales).norm(dim=1).clamp_min(1e-12)
        gaps.append((pod_distance(a, b, scales, prepro) / size).mean().item())
    return gaps


@torch.no_grad()
def first_iteration_pod(method, teacher: nn.Module, student: nn.Module, images: torch.Tensor,
                        train_copy: nn.Module) -> dict[str, list[float]]:
    """Per distilled layer, ``method``'s POD term on ``images`` at the step's first iteration, in
    the loss's units (its factors, schedule and 1/L): the student (the step's starting weights,
    new classifier initialised) in training mode, as the reference trains it, and in eval mode,
    where only that initialisation moves its maps (the logits' new channels are summed into
    background).  ``teacher`` and ``student`` run in eval mode; the training-mode pass runs on
    ``train_copy``, a copy of ``student`` whose moving running statistics do not matter to it."""
    teacher_maps = distilled_layers(teacher(images), method.pod_logits)
    terms = {}
    for mode, model in (("training", train_copy.train()), ("eval", student.eval())):
        maps = distilled_layers(model(images), method.pod_logits, method.n_old, method.pod_new_logits)
        terms[mode] = [pod_loss(teacher_maps, maps, [f if i == layer else 0.0 for i, f in enumerate(method.pod_factors)],
                                method.spp_scales, method.pod_prepro, method.schedule).item()
                       for layer in range(len(maps))]
    return terms


def print_first_iteration_pod(opts, task: Task, path: Path, batches: int, device) -> None:
    """:func:`first_iteration_pod` of the run's method, averaged over ``batches`` batches of the
    run's ``--batch_size`` of step t's training images; nothing for a method without POD."""
    method = opts.method_cls(opts, task)
    if getattr(method, "pod", None) is None:
        return
    state = checkpoint.load(path)
    method.load_state_dict(state.get("method_state"))
    student, teacher = run.starting_models(opts, task, method, state, path, DistInfo(device=device))
    images = build_datasets(opts, task)[0]
    train_copy = copy.deepcopy(student)
    per_batch = [first_iteration_pod(method, teacher, student, device_batch(x, y, device)[0], train_copy)
                 for x, y in random_batches(images, opts.batch_size, batches)]
    names = LAYERS + ["logits"] * method.pod_logits
    print(f"\n{opts.method}'s POD term at step {task.step}'s first iteration, per distilled layer (its factors, "
          f"schedule {method.schedule:.3f} and 1/{len(names)}; mean of {batches} batches of {opts.batch_size} "
          f"images): the student in training mode (the reference) and in eval mode (its new classifier alone)")
    print("student  | " + " | ".join(f"{name:>7}" for name in names) + " |   total")
    for mode in ("training", "eval"):
        means = [statistics.mean(column) for column in zip(*(terms[mode] for terms in per_batch))]
        print(f"{mode:8s} | " + " | ".join(cell(m) for m in means + [sum(means)]))


def first_norm_shift(model: nn.Module, images: torch.Tensor) -> float:
    """How far ``images`` move the first norm layer's input from its running statistics (the
    shift at its source, before any weight has seen the content)."""
    return norm_shifts(model, images)[0][1]


def by_block(values: list[tuple[str, float]], reduce=statistics.mean) -> dict[str, float]:
    """``reduce`` (default: the mean) of the per-layer values of each block of the network:
    ``body.mod1`` ... and ``head`` (a name's first two parts in the body, its first elsewhere),
    in forward order."""
    blocks: dict[str, list[float]] = {}
    for name, value in values:
        parts = name.split(".")
        blocks.setdefault(".".join(parts[:2]) if parts[0] == "body" else parts[0], []).append(value)
    return {block: reduce(block_values) for block, block_values in blocks.items()}


def main(argv=None) -> None:
    parser = ToolParser(description=__doc__, allow_abbrev=False)  # run.py's flags pass through whole
    parser.add_argument("--ckpt", default=None, help="step t-1 checkpoint (default: the run's step-{t-1}.pth)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--batches", type=int, default=4, help="batches averaged per batch size")
    parser.add_argument("--per_class", action="store_true",
                        help="also the first norm layer shift of each class's training images: how far a "
                             "single-class step may sit from step 0 whatever the class order")
    args, run_argv = parser.parse_known_args(argv)
    opts = parse_args(run_argv, tool_reads=frozenset({"spp_scales", "pod_prepro"}))
    if len(opts.step) != 1 or opts.step[0] < 1:
        raise ConfigError(f"pod_gap.py needs one incremental step, got --step {' '.join(map(str, opts.step))}; "
                          "pass --step t with t >= 1 (the teacher is step t-1)")
    step = opts.step[0]
    seed_everything(opts.random_seed)  # crops, flips and the batches drawn: one seed, one table
    device = resolve_device(opts.device, 0)

    task = Task(opts.dataset, opts.task, step)
    path = Path(args.ckpt) if args.ckpt else run_dir(opts) / f"step-{step - 1}.pth"
    model = run.load_step_model(opts, task.at(step - 1), path, DistInfo(device=device))
    train_copy = copy.deepcopy(model)

    print(f"{path}: POD distance between training-mode and eval-mode maps of the same weights, relative to "
          f"the eval-mode embedding (mean of {args.batches} batches)")
    for data_step in (step - 1, step):
        images = build_datasets(opts, task.at(data_step))[0]
        print(f"\non the training images of step {data_step}" + (" (where the running statistics were "
              "gathered)" if data_step < step else " (what POD sees)"))
        print("batch | " + " | ".join(f"{name:>7}" for name in LAYERS))
        for batch_size in args.batch_sizes:
            print(f"{batch_size:5d} | " + gap_row(model, train_copy, images, batch_size, args.batches, opts, device))
        batch = next(iter(torch.utils.data.DataLoader(images, batch_size=max(args.batch_sizes), shuffle=True)))
        x = device_batch(batch[0], batch[1], device)[0]
        print(f"first norm layer: channel means {first_norm_shift(model, x):.3f} running standard deviations "
              f"from the running means (mean over channels, {len(batch[0])} images)")
        ratios = " ".join(f"{block} {r:.3g}" for block, r in by_block(variance_ratios(model, x), max).items())
        print(f"eval-mode input variance over running variance, largest channel per block: {ratios}")
    print(f"\nnorm layer shift of every step's training images under {path.name} ({max(args.batch_sizes)} "
          f"images each): the first norm layer, then the mean over each block's norm layers")
    for data_step in range(task.num_steps):
        images = build_datasets(opts, task.at(data_step))[0]
        batch = next(iter(torch.utils.data.DataLoader(images, batch_size=max(args.batch_sizes), shuffle=True)))
        shifts = norm_shifts(model, device_batch(batch[0], batch[1], device)[0])
        blocks = " ".join(f"{block} {shift:.3f}" for block, shift in by_block(shifts).items())
        print(f"step {data_step}: {shifts[0][1]:.3f} | {blocks}")
    print_first_iteration_pod(opts, task, path, args.batches, device)
    if args.per_class:
        print_class_shifts(model, opts, task, max(args.batch_sizes), device)


def class_images(opts, classes: range) -> dict[int, IncrementalSegmentation]:
    """Per class, the training images holding it (what a step adding only that class trains on,
    overlap protocol), under the training transform, labels unmapped."""
    options = DataOptions.from_opts(opts)
    source, presence = indexed_split(options, "train")
    transform, identity = train_transform(options.crop_size), np.arange(256, dtype=np.uint8)
    return {cls: IncrementalSegmentation(source, indices, transform, identity, presence[indices])
            for cls in classes for indices in [select_images(presence, [cls], [], overlap=True)]}


def print_class_shifts(model: nn.Module, opts, task: Task, images_per_class: int, device, line: float = 0.1) -> None:
    """The first norm layer shift of each class's images, largest first, and how many classes
    stay within ``line``: under a random class order every class is equally likely to be any
    step's, so this is what a single-class increment may show whatever the order."""
    num_classes = task.num_classes
    shifts = {}
    for cls, images in class_images(opts, range(1, num_classes)).items():
        if len(images):
            batch = next(iter(torch.utils.data.DataLoader(images, batch_size=images_per_class, shuffle=True)))
            shifts[cls] = (first_norm_shift(model, device_batch(batch[0], batch[1], device)[0]), len(batch[0]))
    step_of = {c: s for s, classes in enumerate(task.all_steps) for c in classes}
    print(f"\nfirst norm layer shift of each class's training images (up to {images_per_class} each; "
          f"classes without a training image: {sorted(set(range(1, num_classes)) - set(shifts)) or 'none'})")
    for cls, (shift, count) in sorted(shifts.items(), key=lambda item: -item[1][0]):
        print(f"class {cls:3d} (step {step_of.get(cls, '-')}): {shift:.3f}  ({count} images)")
    within = sum(shift <= line for shift, _ in shifts.values())
    print(f"classes within {line} running standard deviations: {within} of {len(shifts)}")


def random_batches(dataset, batch_size: int, batches: int) -> torch.utils.data.DataLoader:
    """``batches`` full batches of ``dataset``, drawn through as many shuffled passes as they need."""
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=batches * batch_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def gap_row(model, train_copy, dataset, batch_size: int, batches: int, opts, device) -> str:
    if len(dataset) < batch_size:
        return f"(the training set holds fewer than {batch_size} images)"
    per_batch = [norm_mode_gap(model, device_batch(images, labels, device)[0], opts.spp_scales, opts.pod_prepro,
                               train_copy) for images, labels in random_batches(dataset, batch_size, batches)]
    return " | ".join(cell(statistics.mean(column)) for column in zip(*per_batch))


def cell(value: float) -> str:
    """A table cell of 7 characters, three decimals; a value that would print as 0.000 but is not 0
    in e-notation, so that a small difference is not read as none."""
    return f"{value:7.3f}" if value == 0 or abs(value) >= 5e-4 else f"{value:7.1e}"


if __name__ == "__main__":
    script_main(main)
