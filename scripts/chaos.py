"""Fault injection: kill a run at random moments, resume it each time, and check that it ends
exactly where an uninterrupted run ends.

    python scripts/chaos.py                      # 1 process, MiB steps 0-1, 3 kills
    python scripts/chaos.py --nproc 2 --kills 2  # 2 gloo ranks under torchrun --max-restarts 1
    python scripts/chaos.py --method RW          # any method
    python scripts/chaos.py --method PLOP --crop_size 64 --shapes_image_size 64   # more run.py flags

A reference run goes first.  Then the same command is launched again and again in a fresh
folder, each launch with one fault drawn from ``--seed``:

* ``save``: SIGKILL inside the n-th checkpoint write of the process, after the temp file is
  written and before the rename (``CSSBENCH_KILL_IN_SAVE``, utils/checkpoint.py); under torchrun
  the restarted ranks resume within the same launch;
* ``time``: SIGKILL of the whole process group after a random delay (startup, training,
  validation, a save, the test: wherever it lands);
* ``rank`` (``--nproc`` > 1): SIGKILL of one training process after a random delay, which
  ``torchrun --max-restarts 1`` answers by restarting the ranks in the same launch;

then, unless the last faulty launch recovered by itself, without a fault until it exits 0.  Single-process launches also alternate
``--num_workers`` between 0 and 1, which must not matter.  Checked at the end: every step
checkpoint is byte-identical to the reference's, results.jsonl holds the same lines (the
``seconds`` field excepted, a wall-clock time), and no epoch checkpoint or temp file is left.
Exit 0 when all holds; tests/test_chaos.py runs both cases.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from argparser import parse_args  # noqa: E402
from utils.checkpoint import KILL_IN_SAVE_ENV  # noqa: E402
from utils.cli import ToolParser, script_main  # noqa: E402
from utils.errors import ConfigError  # noqa: E402

FLAGS = ["--dataset", "shapes", "--task", "15-5", "--overlap", "--name", "chaos", "--step", "0", "1",
         "--backbone", "resnet18", "--width", "0.125", "--norm_act", "abn", "--no_pretrained",
         "--crop_size", "32", "--shapes_image_size", "32", "--shapes_train_size", "48", "--shapes_val_size", "12",
         "--batch_size", "4", "--epochs", "2", "3", "--lr", "0.01", "0.001", "--sample_num", "0",
         "--no_progress", "--logdir", "runs"]
RUN_DIR = Path("runs/shapes/15-5-ov/chaos")


def command(nproc: int, workers: int, method: str = "MiB", extra=()) -> list[str]:
    flags = FLAGS + ["--method", method, *extra, "--num_workers", str(workers)]
    if nproc == 1:
        return [sys.executable, str(ROOT / "run.py"), *flags]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "--max-restarts=1", "--monitor-interval=0.2"]
    return [*torchrun, str(ROOT / "run.py"), *flags]


def environment(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    env.pop(KILL_IN_SAVE_ENV, None)
    env.update(extra)
    return env


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process started under ``pid`` (torchrun puts its ranks in sessions of their own)."""
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def kill_tree(pid: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(cwd: Path, nproc: int, workers: int, fault: tuple | None, log, method: str = "MiB", extra=()) -> int:
    """One launch with at most one fault; returns its exit code (negative: killed by a signal)."""
    env = environment(**({KILL_IN_SAVE_ENV: str(fault[1])} if fault and fault[0] == "save" else {}))
    with open(cwd / "launches.log", "a") as out:
        proc = subprocess.Popen(command(nproc, workers, method, extra), cwd=cwd, env=env, stdout=out, stderr=out,
                                start_new_session=True)
        if fault and fault[0] in ("time", "rank"):
            try:
                proc.wait(timeout=fault[1])
            except subprocess.TimeoutExpired:
                if fault[0] == "time":
                    kill_tree(proc.pid)
                else:
                    ranks = children(proc.pid)
                    if ranks:
                        os.kill(random.Random(fault[1]).choice(ranks), signal.SIGKILL)
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            code = proc.wait()
    log(f"  launch with {workers} workers, fault {fault}: exit {code}")
    return code


def results(folder: Path) -> list[dict]:
    lines = (folder / RUN_DIR / "results.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in lines]


def compare(reference: Path, chaos: Path) -> list[str]:
    """Differences between the two run folders (empty: bit-identical)."""
    problems = []
    ref_ckpts = sorted(p.name for p in (reference / RUN_DIR).glob("step-*.pth"))
    got_ckpts = sorted(p.name for p in (chaos / RUN_DIR).glob("step-*.pth"))
    if ref_ckpts != got_ckpts:
        problems.append(f"checkpoints {got_ckpts} instead of {ref_ckpts}")
    for name in ref_ckpts:
        if name in got_ckpts and (reference / RUN_DIR / name).read_bytes() != (chaos / RUN_DIR / name).read_bytes():
            problems.append(f"{name} differs from the uninterrupted run's")
    if results(reference) != results(chaos):
        problems.append("results.jsonl differs from the uninterrupted run's")
    leftovers = [p.name for p in (chaos / RUN_DIR).iterdir() if p.name.endswith((".tmp", ".last.pth"))]
    if leftovers:
        problems.append(f"left behind: {leftovers}")
    return problems


def chaos(workdir: Path, nproc: int = 1, kills: int = 3, seed: int = 0, log=print, kinds=None,
          method: str = "MiB", extra=()) -> list[str]:
    """Reference run, then ``kills`` faulty launches and resumes; returns the problems found.

    ``kinds``: the faults, in this order first, then drawn at random (default: save, time, and
    rank when ``nproc`` > 1); ``extra``: more run.py flags."""
    rng = random.Random(seed)
    reference, chaotic = workdir / "reference", workdir / "chaos"
    reference.mkdir(parents=True)
    chaotic.mkdir(parents=True)
    start = time.perf_counter()
    code = launch(reference, nproc, 0, None, log, method, extra)
    duration = time.perf_counter() - start
    if code != 0:
        return [f"the reference run failed (exit {code}); see {reference / 'launches.log'}"]
    kinds = list(kinds or ["save", "time"] + (["rank"] if nproc > 1 else []))
    for i in range(kills):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        fault = (kind, rng.randint(1, 2)) if kind == "save" else (kind, round(rng.uniform(0.4, 0.8) * duration, 2))
        workers = rng.randint(0, 1) if nproc == 1 else 0
        code = launch(chaotic, nproc, workers, fault, log, method, extra)
        if code == 0:
            break
    for _ in range(3 if code != 0 else 0):  # resumes without faults
        code = launch(chaotic, nproc, 0, None, log, method, extra)
        if code == 0:
            break
    if code != 0:
        return [f"the resumed run failed (exit {code}); see {chaotic / 'launches.log'}"]
    return compare(reference, chaotic)


def main(argv=None) -> int:
    p = ToolParser(description=__doc__, allow_abbrev=False)  # run.py's flags pass through whole
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun on gloo when > 1)")
    p.add_argument("--method", default="MiB", help="any --method (its preset applies)")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="draws the faults")
    p.add_argument("--kinds", nargs="+", choices=["save", "time", "rank"], default=None,
                   help="faults to inject first, in order (then random ones)")
    p.add_argument("--workdir", default=None, help="default: a new temporary folder")
    args, extra = p.parse_known_args(argv)
    try:  # a flag run.py refuses stops here, not in the reference run
        parse_args([*FLAGS, "--method", args.method, *extra])
    except ConfigError as exc:
        p.error(str(exc))
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    print(f"chaos in {workdir}: {args.method}, {args.nproc} process(es), {args.kills} kills, seed {args.seed}")
    problems = chaos(workdir, args.nproc, args.kills, args.seed, kinds=args.kinds, method=args.method,
                     extra=extra)
    for problem in problems:
        print(f"FAIL: {problem}")
    print("OK: bit-identical to the uninterrupted run" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    script_main(main)
