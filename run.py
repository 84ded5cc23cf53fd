"""Train and test the steps of a class-incremental segmentation benchmark.

    python run.py --dataset shapes --task 15-1 --overlap --method MiB --step all
    torchrun --nproc_per_node=2 run.py ... --step 1
    python run.py ... --test --step 5

Per requested step: data -> student (+ frozen teacher from step t-1) -> method -> Trainer.fit
-> atomic step checkpoint -> reload it -> test on all seen classes -> one JSON line of results.
"""
from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, Sampler

from argparser import parse_args, per_step, run_dir
from dataset import build_datasets, class_names
from dataset import memory
from dataset.errors import DataError
from dataset.incremental import IncrementalSegmentation
from dataset.transforms import eval_transform
from dataset.tasks import Task, TaskError
from methods.base import MethodStateError
from metrics import incremental_scores
from metrics.report import class_table, confusion_figure, summary_header, summary_row
from segmentation_module import PretrainedWeightsError, make_model
from train import Timer, Trainer, evaluate, unwrap
from utils import checkpoint
from utils.distributed import DistInfo, barrier, cleanup, init_distributed
from utils.errors import CheckpointError, UserError
from utils.logger import Logger
from utils.malloc import keep_freed_memory

USER_ERRORS = (UserError, TaskError, DataError, PretrainedWeightsError, MethodStateError)


# --- data ---------------------------------------------------------------------------------------
class ShardSampler(Sampler):
    """Evaluation sharding without padding, so no image is counted twice across ranks."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _loader_kwargs(opts, info: DistInfo) -> dict:
    workers = opts.num_workers
    return dict(num_workers=workers, pin_memory=info.device.type == "cuda",
                persistent_workers=workers > 0)


def train_loader(dataset, opts, info: DistInfo) -> DataLoader:
    if len(dataset) < opts.batch_size * info.world_size:
        raise DataError(f"the training set of this step has {len(dataset)} images, fewer than one batch "
                        f"({opts.batch_size} x {info.world_size} processes); lower --batch_size")
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=opts.random_seed, drop_last=True)
    return DataLoader(dataset, batch_size=opts.batch_size, sampler=sampler, drop_last=True,
                      **_loader_kwargs(opts, info))


def eval_loader(dataset, opts, info: DistInfo) -> DataLoader:
    sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    return DataLoader(dataset, batch_size=opts.val_batch_size, sampler=sampler, **_loader_kwargs(opts, info))


# --- checkpoints --------------------------------------------------------------------------------
def task_record(task: Task) -> dict:
    return {"dataset": task.dataset, "task": task.name, "step": task.step,
            "classes": task.all_steps[: task.step + 1]}


def check_checkpoint(ckpt: dict, task: Task, path) -> None:
    """Refuse a checkpoint trained on other classes (it would load silently and mislead).

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


def no_pretrained(opts):
    opts = copy.copy(opts)
    opts.no_pretrained = True
    return opts


def build_model(opts, task: Task, info: DistInfo, pretrained: bool):
    group = torch.distributed.group.WORLD if info.enabled else None
    model = make_model(opts if pretrained else no_pretrained(opts), task.classes_per_step, bn_group=group)
    model = model.to(info.device)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def exemplar_memory(opts, info: DistInfo, task: Task, teacher, directory: Path, train_ds):
    """DKD-M (recent_methods.md §5.4): add a class-balanced memory of earlier images to the step.

    Candidates are the step t-1 training images (classes found with the teacher) plus the step
    t-1 memory; the chosen list is saved as JSON in the run directory, so a rerun reuses it.
    Memory labels go through the current step's table: old classes read as background.
    """
    path = memory.memory_path(directory, task.step)
    if not path.is_file():
        prev = build_datasets(opts, task.at(task.step - 1))[0]
        prev = IncrementalSegmentation(prev.source, prev.indices, eval_transform(opts.crop_size, True), prev.lut,
                                       prev.presence)
        presence = memory.candidate_presence(teacher, prev, info.device, opts.val_batch_size)
        previous = memory.load_memory(memory.memory_path(directory, task.step - 1)) if task.step > 1 else None
        seed = opts.random_seed + task.step
        indices, rows = memory.build_memory((prev.indices, presence), previous,
                                            [c for c in task.old_classes if c], opts.mem_size, seed)
        if info.is_main:
            memory.save_memory(path, task.step, indices, rows, seed)
        barrier()
    indices, rows = memory.load_memory(path)
    return ConcatDataset([train_ds, memory.memory_dataset(train_ds, indices, rows)])


# --- one step -----------------------------------------------------------------------------------
def previous_checkpoint(opts, step: int, index: int, directory: Path):
    path = Path(opts.step_ckpt) if (opts.step_ckpt and index == 0) else directory / f"step-{step - 1}.pth"
    if not path.is_file():
        raise CheckpointError(f"step {step} needs the step {step - 1} checkpoint {path}, which does not exist; "
                              f"train step {step - 1} first (--step {step - 1}) or pass --step_ckpt")
    return path, checkpoint.load(path)


def train_one_step(opts, info: DistInfo, task: Task, index: int, directory: Path, logger: Logger) -> None:
    step = task.step
    prev = prev_path = None
    if step > 0:
        prev_path, prev = previous_checkpoint(opts, step, index, directory)
        check_checkpoint(prev, task.at(step - 1), prev_path)

    train_ds, val_ds, _ = build_datasets(opts, task)
    val = eval_loader(val_ds, opts, info)

    method = opts.method_cls(opts, task)
    method.load_state_dict(prev.get("method_state") if prev else None)
    model = build_model(opts, task, info, pretrained=step == 0)
    teacher = None
    if prev is not None:
        load_weights(model, prev["model"], prev_path, allowed_missing=f"cls.{step}.")
        method.init_new_classifier(model)
        teacher = build_model(opts, task.at(step - 1), info, pretrained=False)
        load_weights(teacher, prev["model"], prev_path)
        teacher.eval().requires_grad_(False)
        if getattr(opts, "mem_size", 0):
            train_ds = exemplar_memory(opts, info, task, teacher, directory, train_ds)
    loader = train_loader(train_ds, opts, info)

    student = model
    if info.enabled:
        ids = [info.device.index] if info.device.type == "cuda" else None
        student = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if opts.compile:
        student = torch.compile(student)

    epochs = per_step(opts.epochs, step)
    lr = per_step(opts.lr, step)
    trainer = Trainer(student, teacher, method, opts, info.device, lr, len(loader), epochs,
                      logger=logger, is_main=info.is_main)
    partial = directory / f"step-{step}.last.pth"
    start_epoch = 0
    if partial.is_file():
        state = checkpoint.load(partial)
        check_checkpoint(state, task, partial)
        load_weights(model, state["model"], partial)
        trainer.load_state_dict(state["trainer"])
        start_epoch = state["epoch"] + 1
        logger.info(f"step {step}: resuming from {partial} at epoch {start_epoch}")

    ctx = trainer.context(loader, task, log=logger.info)
    method.before_step(ctx)
    logger.info(f"step {step}: {len(train_ds)} training images, classes {task.new_classes}, "
                f"{epochs} epochs at lr {lr}, method {opts.method}")
    for epoch in range(start_epoch, epochs):
        progress = _progress_bar(opts, info, step, epoch, epochs)
        stats = trainer.train_epoch(loader, epoch, progress)
        method.after_epoch(ctx, epoch)
        logger.info(f"step {step} epoch {epoch + 1}/{epochs}: " +
                    ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
        for k, v in stats.items():
            logger.scalar(f"epoch/{k}/step{step}", v, epoch)
        last = epoch + 1 == epochs
        if (epoch + 1) % opts.val_interval == 0 or last:
            matrix = evaluate(student, val, task.n_seen, method.predict, info.device, trainer.precision,
                              opts.channels_last)
            miou = matrix.scores()["miou"]
            logger.info(f"step {step} epoch {epoch + 1}: validation mIoU {100 * miou:.2f}")
            logger.scalar(f"val/miou/step{step}", miou, epoch)
            if not last and info.is_main:
                checkpoint.save_atomic({"model": unwrap(model).state_dict(), "trainer": trainer.state_dict(),
                                        "epoch": epoch, "task": task_record(task)}, partial)

    method.after_step(ctx)
    if info.is_main:
        checkpoint.save_atomic({
            "model": unwrap(model).state_dict(), "trainer": trainer.state_dict(), "epoch": epochs - 1,
            "method": opts.method, "method_state": method.state_dict(), "task": task_record(task),
            "opts": {k: v for k, v in vars(opts).items() if k != "method_cls"},
        }, directory / f"step-{step}.pth")
        if partial.exists():
            partial.unlink()
    barrier()


def _progress_bar(opts, info: DistInfo, step: int, epoch: int, epochs: int):
    if not info.is_main or opts.no_progress:
        return None
    from tqdm import tqdm

    return lambda loader: tqdm(loader, desc=f"step {step} epoch {epoch + 1}/{epochs}", leave=False,
                               dynamic_ncols=True, file=sys.stdout)


@torch.no_grad()
def save_samples(model, dataset, predict, count: int, device, path: Path):
    """image | ground truth | prediction for the first test images, with the VOC palette."""
    from dataset.transforms import device_batch
    from dataset.voc import voc_palette
    from metrics.plots import prediction_grid

    images, labels = zip(*(dataset[i] for i in range(min(count, len(dataset)))))
    batch, _ = device_batch(torch.stack(images), torch.stack(labels), device)
    predictions = predict(model(batch)["logits"].float()).cpu()
    rgb = [image.permute(1, 2, 0).numpy() / 255.0 for image in images]
    return prediction_grid(rgb, [l.numpy() for l in labels], list(predictions.numpy()), path, voc_palette())


def test_one_step(opts, info: DistInfo, task: Task, path: Path, logger: Logger, seconds_before: float) -> dict:
    """Reload a saved step checkpoint and evaluate it on every class seen so far (fp32)."""
    timer = Timer()
    ckpt = checkpoint.load(path)
    check_checkpoint(ckpt, task, path)
    _, _, test_ds = build_datasets(opts, task)
    model = build_model(opts, task, info, pretrained=False)
    load_weights(model, ckpt["model"], path)
    method = opts.method_cls(opts, task)
    matrix = evaluate(model, eval_loader(test_ds, opts, info), task.n_seen, method.predict, info.device,
                      channels_last=opts.channels_last)
    scores = matrix.scores()
    later = [c for s in task.all_steps[1: task.step + 1] for c in s]
    result = {
        "dataset": opts.dataset, "task": opts.task, "overlap": opts.overlap, "method": opts.method,
        "name": opts.name, "step": task.step, **incremental_scores(scores["class_iou"], task.base_classes, later),
        "class_iou": [None if v != v else v for v in scores["class_iou"]],
        "overall_acc": scores["overall_acc"], "seconds": seconds_before + timer(),
        "checkpoint": str(path),
    }
    if info.is_main:
        names = class_names(opts.dataset)
        logger.info(class_table(scores["class_iou"], names))
        logger.info(summary_header() + "\n" + summary_row(result))
        logger.scalar("test/miou_all", result["miou_all"], task.step)
        logger.scalar("test/miou_old", result["miou_old"], task.step)
        if later:
            logger.scalar("test/miou_new", result["miou_new"], task.step)
        logger.text(f"test/class_iou/step{task.step}", class_table(scores["class_iou"], names).replace("\n", "  \n"))
        logger.figure(f"test/confusion/step{task.step}", confusion_figure(matrix.mat, names), task.step)
        if opts.sample_num > 0:
            grid = save_samples(model, test_ds, method.predict, opts.sample_num, info.device,
                                run_dir(opts) / f"samples-step{task.step}.png")
            logger.figure(f"test/samples/step{task.step}", grid, task.step)
        results_file = Path(opts.results_file) if opts.results_file else run_dir(opts) / "results.jsonl"
        results_file.parent.mkdir(parents=True, exist_ok=True)
        with open(results_file, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


def run(opts, info: DistInfo) -> list[dict]:
    directory = run_dir(opts)
    logger = Logger(directory, info.is_main)
    results = []
    try:
        for index, step in enumerate(opts.step):
            seed_everything(opts.random_seed + step)
            task = Task(opts.dataset, opts.task, step)
            path = directory / f"step-{step}.pth"
            timer = Timer()
            if opts.test:
                path = Path(opts.ckpt) if opts.ckpt else path
                if not path.is_file():
                    raise CheckpointError(f"--test needs the checkpoint {path}, which does not exist; train "
                                          f"step {step} first or pass --ckpt PATH")
            elif path.is_file() and not opts.overwrite:
                logger.info(f"step {step}: {path} exists, reusing it (pass --overwrite to retrain)")
            else:
                train_one_step(opts, info, task, index, directory, logger)
            results.append(test_one_step(opts, info, task, path, logger, timer()))
        if len(results) > 1:
            logger.info("\n" + summary_header() + "\n" + "\n".join(summary_row(r) for r in results))
    finally:
        logger.close()
    return results


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def one_line(exc: Exception) -> str:
    """The message of an error, also when a DataLoader worker wrapped it in its traceback."""
    message = str(exc).strip()
    if "Original Traceback" in message:
        last = message.splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message


def main(argv=None) -> int:
    try:
        opts = parse_args(argv)
        info = init_distributed(opts.device)
        try:
            run(opts, info)
        finally:
            cleanup()
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last epoch checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    keep_freed_memory()  # before the first large allocation; see utils/malloc.py
    sys.exit(main())
