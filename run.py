"""Train and test the steps of a class-incremental segmentation benchmark.

    python run.py --dataset shapes --task 15-1 --overlap --method MiB --step all
    torchrun --nproc_per_node=2 run.py ... --step 1
    python run.py ... --test --step 5

Per requested step: data -> student (+ frozen teacher from step t-1) -> method -> Trainer.fit
-> atomic step checkpoint -> reload it -> test on all seen classes -> one JSON line of results.
"""
from __future__ import annotations

import copy
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from argparser import parse_args, per_step, run_dir
from dataset import build_datasets, channel_names
from dataset.loaders import eval_loader, train_loader
from dataset.memory import with_memory
from dataset.tasks import Task
from metrics import incremental_scores
from metrics.report import class_table, confusion_figure, record_result, summary_header, summary_row
from segmentation_module import make_model
from train import Timer, Trainer, evaluate
from utils import checkpoint
from utils.cli import one_line
from utils.distributed import (DistInfo, barrier, cleanup, ending_on_failure, init_distributed, report_failure,
                               share_cpus)
from utils.errors import CheckpointError, UserError
from utils.logger import Logger
from utils.malloc import keep_freed_memory
from utils.seeding import derive_seed, seed_everything
from utils.step_checkpoint import (check_checkpoint, check_reusable, epoch_checkpoint, load_weights,
                                   previous_checkpoint, previous_checkpoint_path, resume, step_checkpoint)


def build_model(opts, task: Task, info: DistInfo, pretrained: bool):
    group = torch.distributed.group.WORLD if info.enabled else None
    if not pretrained:
        opts = copy.copy(opts)
        opts.no_pretrained = True
    model = make_model(opts, task.classes_per_step, bn_group=group).to(info.device)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_step_model(opts, task: Task, path: Path, info: DistInfo):
    """The model saved in a step checkpoint, the checkpoint checked against ``opts`` and ``task``."""
    state = checkpoint.load(path)
    check_checkpoint(state, task, opts, path)
    model = build_model(opts, task, info, pretrained=False)
    load_weights(model, state["model"], path)
    return model


def starting_models(opts, task: Task, method, prev: dict | None, prev_path: Path | None, info: DistInfo):
    """(student, teacher) at the first iteration of step ``task.step``: at step 0 the pretrained
    network and no teacher; later the step t-1 weights with the method's new classifier, and a
    frozen eval-mode copy of the step t-1 model from the checkpoint ``prev`` read at ``prev_path``."""
    if prev is None:
        return build_model(opts, task, info, pretrained=task.step == 0), None
    model = build_model(opts, task, info, pretrained=False)
    load_weights(model, prev["model"], prev_path, allowed_missing=f"cls.{task.step}.")
    method.init_new_classifier(model)
    teacher = build_model(opts, task.at(task.step - 1), info, pretrained=False)
    load_weights(teacher, prev["model"], prev_path)
    teacher.eval().requires_grad_(False)
    return model, teacher


# --- one step -----------------------------------------------------------------------------------
def train_one_step(opts, info: DistInfo, task: Task, index: int, directory: Path, logger: Logger) -> None:
    """Train step ``task.step`` (resuming its epoch checkpoint if there is one) and save it.

    Every global random stream is reseeded from (seed, step, epoch, rank) before each phase, and
    the augmentation of a sample depends on (seed, step, epoch, index) only (utils/seeding.py),
    so a resumed step computes exactly what the uninterrupted one would have.
    """
    step = task.step
    prev = prev_path = None
    if step > 0:
        prev_path, prev = previous_checkpoint(opts, step, index, directory)
        check_checkpoint(prev, task.at(step - 1), opts, prev_path)

    train_ds, val_ds, _ = build_datasets(opts, task)
    val = eval_loader(val_ds, opts, info)

    method = opts.method_cls(opts, task)
    method.load_state_dict(prev.get("method_state") if prev else None)
    model, teacher = starting_models(opts, task, method, prev, prev_path, info)
    if prev is not None:
        if getattr(opts, "mem_size", 0):
            train_ds = with_memory(opts, task, teacher, directory, train_ds, info.device, info.is_main)
    loader = train_loader(train_ds, opts, info, seed=derive_seed(opts.random_seed, step))

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
    ctx = trainer.context(loader, task, log=logger.info)
    seed_everything(derive_seed(opts.random_seed, step, -1, info.rank))
    method.before_step(ctx)  # on the step's starting weights, resumed or not

    partial = directory / f"step-{step}.last.pth"
    teacher_digest = prev.get(checkpoint.DIGEST_KEY) if prev else None
    start_epoch = 0
    if partial.is_file() and not opts.overwrite:
        start_epoch = resume(partial, model, trainer, method, task, opts, info.world_size, teacher_digest)
        logger.info(f"step {step}: resuming from {partial} at epoch {start_epoch}")

    logger.info(f"step {step}: {len(train_ds)} training images, classes {task.new_classes}, "
                f"{epochs} epochs at lr {lr}, method {opts.method}")
    for epoch in range(start_epoch, epochs):
        seed_everything(derive_seed(opts.random_seed, step, epoch, info.rank))
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
                checkpoint.save_atomic(epoch_checkpoint(model, trainer, method, epoch, task, opts, info.world_size,
                                                        teacher_digest), partial)

    seed_everything(derive_seed(opts.random_seed, step, epochs, info.rank))
    method.after_step(ctx)
    if info.is_main:
        checkpoint.save_atomic(step_checkpoint(model, trainer, method, epochs, task, opts, teacher_digest),
                               directory / f"step-{step}.pth")
        partial.unlink(missing_ok=True)
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
    model = load_step_model(opts, task, path, info)
    _, _, test_ds = build_datasets(opts, task)
    method = opts.method_cls(opts, task)
    matrix = evaluate(model, eval_loader(test_ds, opts, info), task.n_seen, method.predict, info.device,
                      channels_last=opts.channels_last)
    scores = matrix.scores()
    later = [c for s in task.all_steps[1: task.step + 1] for c in s]
    result = {
        "dataset": opts.dataset, "task": opts.task, "overlap": opts.overlap, "method": opts.method,
        "name": opts.name, "step": task.step,
        **incremental_scores(scores["class_iou"], task.channels(task.base_classes), task.channels(later)),
        "class_iou": list(scores["class_iou"]),  # per output channel; NaN (absent class) is written as null
        "overall_acc": scores["overall_acc"], "seconds": seconds_before + timer(),
        "checkpoint": str(path),
    }
    if info.is_main:
        names = channel_names(task, opts.shapes_version)
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
        record_result(results_file(opts), result)
    return result


def results_file(opts) -> Path:
    return Path(opts.results_file) if opts.results_file else run_dir(opts) / "results.jsonl"


def run(opts, info: DistInfo) -> list[dict]:
    directory = run_dir(opts)
    if info.is_main:
        if opts.results_file:  # before any training, not when the first step is tested
            checkpoint.require_writable(opts.results_file, "--results_file")
        # what a write killed half-way left behind (utils/checkpoint.py)
        checkpoint.remove_stale_temp_files(directory)
        checkpoint.remove_stale_temp_files(results_file(opts).parent, results_file(opts).name + ".*.tmp")
    logger = Logger(directory, info.is_main)
    results = []
    try:
        for index, step in enumerate(opts.step):
            seed_everything(derive_seed(opts.random_seed, step))
            task = Task(opts.dataset, opts.task, step)
            path = directory / f"step-{step}.pth"
            timer = Timer()
            if opts.test:
                path = Path(opts.ckpt) if opts.ckpt else path
                if not path.is_file():
                    raise CheckpointError(f"--test needs the checkpoint {path}, which does not exist; train "
                                          f"step {step} first or pass --ckpt PATH")
            elif path.is_file() and not opts.overwrite:
                # records only (tensors memory-mapped, not read): test_one_step loads the step, verified
                teacher = (checkpoint.read_record(previous_checkpoint_path(opts, step, index, directory))
                           if step > 0 else {})
                check_reusable(checkpoint.read_record(path), opts, teacher.get(checkpoint.DIGEST_KEY), path)
                logger.info(f"step {step}: {path} exists, reusing it (pass --overwrite to retrain)")
                if info.is_main:  # left by a kill between the step's final save and its cleanup
                    (directory / f"step-{step}.last.pth").unlink(missing_ok=True)
            else:
                train_one_step(opts, info, task, index, directory, logger)
            results.append(test_one_step(opts, info, task, path, logger, timer()))
        if len(results) > 1:
            logger.info("\n" + summary_header() + "\n" + "\n".join(summary_row(r) for r in results))
    finally:
        logger.close()
    return results


def exit_on_signals() -> None:
    """SIGINT and SIGTERM end the process at once with one line on how to resume, exit 130/143.

    A thread waits for them (they are blocked in every other thread), so they act even while the
    main thread is inside C++ -- a collective, a kernel, a checkpoint write -- where a Python
    handler would run only when it returns.  Stopping anywhere is safe because every file a run
    writes is published by an atomic rename: the last epoch checkpoint stays as it was, and a
    temp file left by an unfinished write is removed on the next start.
    """
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)

    def wait():
        signum = signal.sigwait(signals)
        while ending_on_failure():  # the launcher ending the other ranks of a failed run: they end on their own
            signum = signal.sigwait(signals)
        sys.stderr.write(f"interrupted by {signal.Signals(signum).name}; the last epoch checkpoint is kept: "
                         "rerun the same command to resume\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    threading.Thread(target=wait, name="signals", daemon=True).start()


def main(argv=None, own_process: bool = False) -> int:
    """Exit codes: 0 done, 2 a problem the one printed line names (130/143: exit_on_signals).
    ``own_process`` (the command line) also sizes torch's CPU thread pool, which is per process."""
    failed = True
    try:
        opts = parse_args(argv)
        info = init_distributed(opts.device)
        if own_process:
            share_cpus(info.device)
        run(opts, info)
        failed = False
    except UserError as exc:  # every problem the user can fix (utils/errors.py)
        return fail(f"error: {one_line(exc)}")
    except OSError as exc:  # the run directory: read-only, full, no permission
        where = f" {exc.filename}" if exc.filename else ""
        return fail(f"error: cannot write{where} ({exc.strerror or exc}); make --logdir writable or free disk "
                    "space, then rerun the same command")
    except KeyboardInterrupt:  # main() called without exit_on_signals (from Python)
        return fail("interrupted; the last epoch checkpoint is kept: rerun the same command to resume", 130)
    finally:  # a rank that failed does not wait for the others in a barrier: they end with it
        cleanup(failed)
    return 0


def fail(line: str, code: int = 2) -> int:
    """Under torchrun every rank ends with this one (utils/distributed.py), and only the first
    rank to fail prints its line: one line, however many ranks hit the same problem."""
    if report_failure():
        print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    keep_freed_memory()  # before the first large allocation; see utils/malloc.py
    exit_on_signals()  # before any thread starts, so that all of them inherit the blocked signals
    sys.exit(main(own_process=True))
