"""First run on a new GPU machine: does everything work, how fast is it, how long will VOC take?

    bash scripts/gpu_check.sh                       # one GPU, at most ~8 minutes
    bash scripts/gpu_check.sh --device cpu          # the same checks at small sizes, in minutes
    bash scripts/gpu_check.sh --json out.json       # where the figures go (default gpu_check.json)

Checks, in order: the environment (GPU, driver, torch, CUDA, inplace-abn); a one-process
process group (nccl on a GPU, gloo on a CPU) with a DDP training step on synchronised norms; the
shapes demo end to end through ``torchrun``; the training step of FT, MiB and PLOP (15-1 step 1,
with the teacher) at crop 512, batch 12, DeepLabV3-ResNet-101 OS16 in bf16 and fp16 (images/s,
peak allocated memory, TFLOP/s from the step's FLOP count and its share of the GPU's dense bf16
peak); evaluation images/s; the data pipeline's images/s per worker process at crop 512 and the
workers the measured step needs; and the projected wall time of VOC 15-1 overlapped at the paper
schedule.  The measurements are scripts/bench_speed.py's functions.  Exit status 1 when the DDP
step or the demo failed (the table says which), 2 for ``--device cuda`` without a visible GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dataset.tasks import VOC_TRAIN_IMAGES  # noqa: E402
from utils.malloc import keep_freed_memory  # noqa: E402
from utils.cli import ToolParser, script_main  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "scripts" / "bench_speed.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# What runs where: the real configuration on a GPU, a small one that shows the script works on a CPU.
SIZES = {
    "cuda": dict(crop=512, batch_size=12, backbone="resnet101", width=1.0, iters=10, warmup=3,
                 pipeline_images=200, demo=[]),
    "cpu": dict(crop=64, batch_size=2, backbone="resnet18", width=0.25, iters=2, warmup=1, pipeline_images=8,
                demo=["--shapes_train_size", "80", "--shapes_val_size", "48", "--epochs", "1", "--batch_size", "4",
                      "--sample_num", "0", "--num_workers", "0", "--width", "0.125", "--crop_size", "48",
                      "--shapes_image_size", "48", "--no_pretrained"]),  # no pool weights ship at width 0.125
}
METHODS = ("FT", "MiB", "PLOP")
PRECISIONS = ("bf16", "fp16")

# VOC 15-1 overlapped at the paper schedule: training images per step (MiB's shipped caches),
# 30 epochs each, the 1449 validation images tested after each step.
VOC_15_1_OV_IMAGES = VOC_TRAIN_IMAGES["15-1", True]
VOC_EPOCHS = 30
VOC_VAL_IMAGES = 1449

# Dense bf16 tensor-core peak in TFLOP/s from the vendors' datasheets (without sparsity), matched
# against torch.cuda.get_device_name in this order; None: the GPU has no bf16 tensor cores.
BF16_PEAK_TFLOPS = (
    ("GH200", 989), ("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H800", 989),
    ("B200", 2250), ("B100", 1750), ("A100", 312), ("A800", 312), ("A10G", 70), ("A10", 125),
    ("L40S", 362), ("L40", 181), ("L4", 121), ("RTX 6000 Ada", 364), ("RTX A6000", 155),
    ("RTX 4090", 165), ("RTX 3090", 71), ("V100", None), ("T4", None),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None


def environment(device: torch.device) -> dict:
    try:
        import inplace_abn

        abn = f"{getattr(inplace_abn, '__version__', '?')}, " + (
            "CUDA kernels" if hasattr(inplace_abn._backend, "reduce_statistics") else "CPU kernels only")
    except ImportError:
        abn = "not installed (pure-PyTorch layers)"
    env = {"torch": torch.__version__, "python": platform.python_version(), "inplace_abn": abn,
           "cpu": cpu_name(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), driver=nvidia_driver(),
                   bf16_peak_tflops=bf16_peak_tflops(props.name))
    return env


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def ddp_probe(device: torch.device) -> dict:
    """A one-process group on this device's backend and one DDP training step of a small model with
    synchronised norm layers (iabn_sync): process-group start-up, DDP's gradient all-reduce and the
    norms' statistics all-reduce all run, as in a multi-GPU job."""
    import torch.distributed as dist

    from argparser import parse_args
    from dataset.tasks import Task
    from methods import get_method_class
    from segmentation_module import make_model
    from train import Trainer, move_batch

    backend = "nccl" if device.type == "cuda" else "gloo"
    start = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        opts = parse_args(["--dataset", "shapes", "--task", "15-1", "--backbone", "resnet18", "--width", "0.25",
                           "--norm_act", "iabn_sync", "--no_pretrained"])
        task = Task("shapes", "15-1", 0)
        model = make_model(opts, task.classes_per_step, bn_group=dist.group.WORLD).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        trainer = Trainer(ddp, None, get_method_class("FT")(opts, task), opts, device, lr=0.01, iters_per_epoch=1,
                          epochs=1)
        loss = float(trainer.train_step(move_batch(bench.synthetic_batch(2, 64, 16), device, False))["loss"])
        value = torch.ones(1, device=device)
        dist.all_reduce(value)
        result = {"backend": backend, "ok": math.isfinite(loss) and float(value) == 1.0,
                  "seconds": round(time.perf_counter() - start, 1)}
        # Dropping the DDP reducer destroys the process group, whose destructor joins gloo's worker
        # threads while holding the GIL; a worker still releasing a finished work's tensors needs
        # the GIL, so the two deadlocked (seen once in CI).  Let the workers go idle first.
        dist.barrier()
        time.sleep(0.2)
        del trainer, ddp
        return result
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo(device: torch.device, extra: list[str], workdir: Path) -> dict:
    """The shapes demo (scripts/demo.sh's flags) through torchrun, one process, end to end."""
    flags = (ROOT / "scripts" / "demo_flags.txt").read_text().split()
    logdir = workdir / "demo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "run.py"), "--dataset", "shapes", "--task", "15-1", "--overlap", "--method", "FT",
           "--step", "all", "--device", device.type, "--no_progress", "--name", "gpu-check",
           "--logdir", str(logdir), *flags, *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    seconds = time.perf_counter() - start
    results_file = logdir / "shapes" / "15-1-ov" / "gpu-check" / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    row = {"ok": proc.returncode == 0 and len(results) == 6, "seconds": round(seconds, 1),
           "steps": len(results)}
    if results:
        row.update(miou_step0=round(100 * results[0]["miou_all"], 2), miou_old_last=round(100 * results[-1]["miou_old"], 2))
    if not row["ok"]:
        lines = (proc.stderr + proc.stdout).strip().splitlines()
        row["error"] = next((l for l in lines if l.startswith("error:")), lines[-1] if lines else "no output")
    return row


def training_steps(args, device: torch.device, peak: float | None) -> list[dict]:
    rows = []
    flops = {}
    for precision in PRECISIONS:
        for method in METHODS:
            bench.reset_peak_memory()
            r = bench.bench_train(args, method, args.crop, True, device, precision, count_flops=method not in flops)
            flops.setdefault(method, r.get("step_flop"))
            tflops = flops[method] / r["train_step_s"] / 1e12
            row = {"method": method, "precision": precision, "step_s": r["train_step_s"],
                   "img_s": r["train_img_s"], "peak_mem_gb": peak_memory_gb(device),
                   "tflop_per_step": flops[method] / 1e12, "tflop_s": tflops,
                   "share_of_bf16_peak": tflops / peak if peak else None}
            rows.append(row)
            print(f"  train {method:4s} {precision}: {row['img_s']:7.2f} img/s, {row['tflop_s']:7.3f} TFLOP/s",
                  flush=True)
    return rows


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return bench.peak_memory_mb()["rss_mb"] / 1024


def projection(train_rows: list[dict], eval_img_s: dict, per_worker_img_s: float) -> list[dict]:
    """Wall time of VOC 15-1 overlapped at the paper schedule from the measured rates: step 0 at
    FT's step (every method's step 0 is plain cross-entropy), later steps at the method's own,
    plus testing 1449 images after each step; per-epoch validation is left out (--val_interval)."""
    rate = {(r["method"], r["precision"]): r["img_s"] for r in train_rows}
    rows = []
    for precision in PRECISIONS:
        for method in ("MiB", "PLOP"):
            train_s = VOC_EPOCHS * (VOC_15_1_OV_IMAGES[0] / rate["FT", precision]
                                    + sum(VOC_15_1_OV_IMAGES[1:]) / rate[method, precision])
            test_s = len(VOC_15_1_OV_IMAGES) * VOC_VAL_IMAGES / eval_img_s[precision]
            busiest = max(rate[m, precision] for m in METHODS)
            rows.append({"method": method, "precision": precision, "train_min": train_s / 60,
                         "test_min": test_s / 60, "total_min": (train_s + test_s) / 60,
                         "workers_to_feed": math.ceil(busiest / per_worker_img_s)})
    return rows


def print_table(report: dict) -> None:
    env = report["environment"]
    print("\n== environment")
    for key, value in env.items():
        print(f"  {key:18s} {value}")
    print("\n== distributed and demo")
    print(f"  process group {report['ddp']['backend']}, DDP step: {'ok' if report['ddp']['ok'] else 'FAILED'}")
    d = report["demo"]
    print(f"  torchrun demo: {'ok' if d['ok'] else 'FAILED'} in {d['seconds']} s, {d['steps']} steps"
          + (f", mIoU step 0 {d['miou_step0']}, old after the last {d['miou_old_last']}" if d.get("steps") else "")
          + (f"  {d['error']}" if not d["ok"] else ""))
    print(f"\n== training step ({report['config']})")
    print("  method precision    img/s  step s  peak GB  GFLOP/step  TFLOP/s  share of bf16 peak")
    for r in report["train"]:
        share = f"{100 * r['share_of_bf16_peak']:.1f} %" if r["share_of_bf16_peak"] else "-"
        print(f"  {r['method']:6s} {r['precision']:9s} {r['img_s']:7.2f} {r['step_s']:7.3f} {r['peak_mem_gb']:8.2f}"
              f" {1000 * r['tflop_per_step']:11.1f} {r['tflop_s']:8.3f}  {share}")
    print("\n== evaluation and data")
    for precision, value in report["eval_img_s"].items():
        print(f"  evaluation {precision}: {value:.1f} img/s")
    print(f"  data pipeline: {report['pipeline_img_s_per_worker']:.1f} img/s per worker process at crop "
          f"{report['crop']} ({report['environment']['cpu_count']} CPUs here)")
    print("\n== projected VOC 15-1 overlapped, paper schedule (30 epochs per step, test after each step)")
    for r in report["projection"]:
        print(f"  {r['method']:5s} {r['precision']}: {r['total_min']:7.1f} min (training {r['train_min']:.1f}, "
              f"testing {r['test_min']:.1f}); {r['workers_to_feed']} data workers to feed the step")


def main(argv=None) -> int:
    p = ToolParser(description=__doc__)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="gpu_check.json", help="where the figures are written")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device is visible to torch; run on a GPU machine or pass --device cpu", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    keep_freed_memory()
    size = SIZES[device.type]
    bench_args = argparse.Namespace(norm_act="iabn_sync", output_stride=16, channels_last=False, **size)
    config = f"crop {size['crop']}, batch {size['batch_size']}, {size['backbone']} x{size['width']} OS16"
    env = environment(device)
    print(f"gpu_check on {env.get('gpu', env['cpu'])}: {config}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device.type,
                  "config": config, "crop": size["crop"], "environment": env}
        report["ddp"] = ddp_probe(device)
        print(f"  DDP probe: {report['ddp']}", flush=True)
        report["demo"] = demo(device, size["demo"], workdir)
        print(f"  demo: {report['demo']}", flush=True)
        report["train"] = training_steps(bench_args, device, env.get("bf16_peak_tflops"))
        report["eval_img_s"] = {precision: bench.bench_eval(bench_args, "FT", size["crop"], True, device, precision,
                                                             batch_size=size["batch_size"])
                                for precision in PRECISIONS}
        voc = bench.voc_folder(size["pipeline_images"])
        try:
            report["pipeline_img_s_per_worker"] = bench.bench_pipeline(size["crop"], voc, 0, passes=2)
        finally:
            shutil.rmtree(voc, ignore_errors=True)
        report["projection"] = projection(report["train"], report["eval_img_s"], report["pipeline_img_s_per_worker"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(report)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\nwritten to {args.json}")
    return 0 if report["ddp"]["ok"] and report["demo"]["ok"] else 1


if __name__ == "__main__":
    script_main(main)
