"""Run methods on the synthetic 15-1 (or 15-5) benchmark and print the table beside VOC's.

    python scripts/leaderboard.py                        # every method; the ranked nine over 3 seeds
    python scripts/leaderboard.py --methods FT MiB PLOP --seeds 42
    python scripts/leaderboard.py --methods MyMethod     # any registered method (README, "Write a method")
    python scripts/leaderboard.py --variant "PLOP+UNKD=PLOP --unkd --loss_kd 10"   # a method with more flags
    python scripts/leaderboard.py --draws 0 1 2          # on three draws of the images, then over them
    python scripts/leaderboard.py --task 15-1_b          # on one of PLOP's random class orders of 15-1
    python scripts/leaderboard.py --task 15-1_b 15-1_c   # on each of them, then over them
    python scripts/leaderboard.py --disjoint             # the disjoint protocol, beside VOC's disjoint rows
    python scripts/leaderboard.py --task 15-5            # one step of five classes, beside VOC's 15-5 rows
    python scripts/leaderboard.py --joint                # and the joint-training bound (all classes at once)

Each method runs through ``run.py`` exactly as a user would, with the demo's flags
(``scripts/demo_flags.txt``).  Step 0 runs once per recipe: methods whose step 0 is plain
cross-entropy training (their extra terms act at step > 0 only) start from FT's step-0
checkpoint, the others train their own (LwF-MC's BCE, EWC/RW/PI statistics, SDR's step-0 terms,
REMINDER's prototypes, DKD's sigmoid head).  The later steps (1-5 of 15-1, 1 of 15-5) then run
once per seed (``--random_seed``) from that checkpoint.  The table gives mean ± sd over seeds, the
published VOC numbers of each method on the same task and protocol (overlapped, or disjoint with
``--disjoint``: an increment's images hold no future class), and the Spearman rank correlation of
the all-class mIoU between the two.
A ``--variant`` row runs its method with more flags at the later steps, from that method's step-0 run
(an ablation, or a fix behind a flag, beside the preset), or from another's with ``--step0 OTHER``
among its flags (``--variant "LwF-MC-FT0=LwF-MC --step0 FT"``).  Runs go ``--jobs`` at a time (a
seed as soon as its step-0 run is done), each with its share of the CPUs, its log in
``OUT/logs/NAME.log`` and its results in ``OUT/results/NAME.jsonl`` (merged into
``OUT/results.jsonl``).  Reruns reuse finished steps.  ``--draws`` repeats the table on other
draws of the synthetic images (``--shapes_seed``), each in its own folders (the draw of ``--flags``
in the plain table's LOGDIR, so its runs are reused), and pools them: the
seeds measure the training's noise, the draws the data's, which moves PLOP - MiB far more.
Several ``--task`` orders are pooled the same way (each order's files under ``OUT/TASK``).
``--joint`` adds the row every paper's table ends with: FT trained once on all classes with step
0's schedule (``--task offline``, one run per seed and draw, shared by every table), scored with
the table's split into old and new classes, beside VOC's *Joint*; it is never ranked.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from argparser import HELP_HINT, parse_args, run_dir as run_folder  # noqa: E402
from dataset.tasks import Task, TaskError, canonical_task, layout  # noqa: E402
from utils.errors import ConfigError  # noqa: E402
from metrics.plots import plot_class_iou_heatmap, plot_miou_per_step  # noqa: E402
from metrics.ranking import (DISJOINT, JOINT, OVERLAPPED, RANKED, Protocol, canonical, markdown,  # noqa: E402
                             pooled_markdown, ranking_spread, seed_name, summarise)
from metrics.report import load_results, write_csv  # noqa: E402
from utils.distributed import available_cpus  # noqa: E402
from utils.cli import ToolParser, script_main  # noqa: E402

METHODS = ["FT", "LwF", "LwF-MC", "ILT", "EWC", "RW", "PI", "MiB", "PLOP", "SDR", "REMINDER", "LGKD", "LSKD",
           "DKD", "DKD-M"]
SEEDS = [42, 1, 2]
# Step 0 of these equals FT's step 0 (same loss, same data, same seed).
SHARES_FT_STEP0 = {"LwF", "ILT", "MiB", "PLOP", "LGKD", "LSKD"}
# Weight-space regularisers: the reference's importance at its lr after step 0 (PLOP's repo: 100
# for EWC and PI, lowered from MiB's 500; RW 100 in both, at lr 0.001 on VOC 15-1).  The penalty's
# step is lr x importance x curvature, so the importance is scaled by REFERENCE_LR / the shared
# schedule's lr to keep the reference's product (0.1): at lr 0.01 an importance of 100 puts it past
# Nesterov SGD's stability bound and the weights diverge (measured: EWC and RW reach inf at step 1).
REG_IMPORTANCE = {"EWC": 100.0, "RW": 100.0, "PI": 100.0}
REFERENCE_LR = 0.001
# DKD trains head and classifiers at 10x the base lr (recent_methods.md §5.3); its reference uses a
# 10x lower base lr than MiB/PLOP, so it gets the demo's lrs divided by 10.
LR_DIVISOR = {"DKD": 10, "DKD-M": 10}

METHODS = [canonical(m) for m in METHODS]
SHARES_FT_STEP0 = {canonical(m) for m in SHARES_FT_STEP0}
REG_IMPORTANCE = {canonical(m): v for m, v in REG_IMPORTANCE.items()}
LR_DIVISOR = {canonical(m): v for m, v in LR_DIVISOR.items()}


DEMO_FLAGS = ROOT / "scripts" / "demo_flags.txt"


def demo_flags(path: Path = DEMO_FLAGS) -> list[str]:
    """The shared settings every method runs with (dataset version, network, schedule)."""
    return Path(path).read_text().split()


def _flag_values(flags: list[str], name: str) -> list[str]:
    start = flags.index(name) + 1
    end = next((i for i in range(start, len(flags)) if flags[i].startswith("--")), len(flags))
    return flags[start:end]


def method_flags(method: str, base: list[str]) -> list[str]:
    flags = []
    if method in REG_IMPORTANCE:
        incremental_lr = float(_flag_values(base, "--lr")[-1])
        flags += ["--reg_importance", f"{REG_IMPORTANCE[method] * REFERENCE_LR / incremental_lr:g}"]
    if method in LR_DIVISOR:
        flags += ["--lr", *(f"{float(v) / LR_DIVISOR[method]:g}" for v in _flag_values(base, "--lr"))]
    return flags


def step0_recipe(method: str) -> str:
    """The run whose step-0 checkpoint ``method`` starts from."""
    return "FT" if method in SHARES_FT_STEP0 else method


def run_dir(logdir: Path, name: str, task: str = "15-1", protocol: Protocol = OVERLAPPED) -> Path:
    """Where run.py keeps the run (``argparser.run_dir``, which names the protocol)."""
    return run_folder(SimpleNamespace(logdir=logdir, dataset="shapes", task=task, overlap=protocol.overlap, name=name))


@dataclass(frozen=True)
class Variant:
    """A row that runs a registered method with more flags at steps 1..N, from that method's
    step-0 run: ``--variant "NAME=METHOD FLAG ..."`` (an ablation, or a fix behind a flag).
    ``--step0 OTHER`` among the flags starts it from OTHER's step-0 run instead."""

    name: str
    method: str
    flags: tuple[str, ...]
    step0_of: Optional[str] = None

    @property
    def recipe(self) -> str:
        """The step-0 run this row starts from."""
        return step0_recipe(self.step0_of or self.method)


def is_method(name: str) -> bool:
    try:
        canonical(name)
    except KeyError:
        return False
    return True


def parse_variant(text: str) -> Variant:
    name, sep, spec = text.partition("=")
    words = shlex.split(spec)
    if not sep or not name.strip() or not words:
        raise argparse.ArgumentTypeError(f"a variant is NAME=METHOD [FLAG ...], got {text!r}")
    if not re.fullmatch(r"[\w+.-]+", name.strip()):
        raise argparse.ArgumentTypeError(f"variant name {name.strip()!r} names run folders: use letters, digits "
                                         "and + . - _ only")
    flags, step0_of = words[1:], None
    if "--step0" in flags:
        at = flags.index("--step0")
        if at + 1 == len(flags):
            raise argparse.ArgumentTypeError("--step0 in a variant names the method whose step-0 run it starts "
                                             "from, e.g. --step0 FT")
        step0_of, flags = flags[at + 1], flags[:at] + flags[at + 2:]
    try:
        method = canonical(words[0])
        step0_of = canonical(step0_of) if step0_of is not None else None
    except KeyError as exc:
        raise argparse.ArgumentTypeError(exc.args[0]) from None
    try:  # refused flags stop the table before any run, not each of its seeds
        parse_args(["--dataset", "shapes", "--method", method, *flags])
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"variant {name.strip()}: {exc}") from None
    return Variant(name.strip(), method, tuple(flags), step0_of)


@dataclass
class Job:
    """One ``run.py`` call: a step-0 run (``after`` None) or a seed's steps 1..N of a table row,
    which starts when the step-0 run named ``after`` has finished."""

    method: str
    name: str
    steps: list[str]
    extra: list[str] = field(default_factory=list)
    after: Optional[str] = None
    row: Optional[str] = None


def table_rows(chosen: list[str], variants: Sequence[Variant] = ()) -> dict[str, Variant]:
    """The table's rows by name: each chosen method with its preset, then each variant."""
    return {m: Variant(m, m, ()) for m in chosen} | {v.name: v for v in variants}


def joint_jobs(seeds: Sequence[int]) -> list[Job]:
    """The joint bound's runs: FT on every class at step 0's schedule, one per seed.  Overlapped
    whatever the table's protocol (with no future class the two select the same images), so one
    run folder per draw serves every table."""
    return [Job("FT", seed_name(JOINT, seed), ["0"], ["--task", "offline", "--overlap", "--random_seed", str(seed)],
                row=JOINT) for seed in seeds]


def plan(chosen: list[str], seeds_of: dict[str, list[int]], logdir: Path, last_step: int = 5,
         variants: Sequence[Variant] = (), task: str = "15-1", protocol: Protocol = OVERLAPPED) -> list[Job]:
    """Every run of the table: one step-0 run per recipe, then each row's seeds from it (and the
    joint bound's runs, when ``seeds_of`` has a ``JOINT`` row)."""
    rows = table_rows(chosen, variants)
    jobs = [Job(recipe, recipe, ["0"]) for recipe in dict.fromkeys(v.recipe for v in rows.values())]
    for row, v in rows.items():
        step0 = run_dir(logdir, v.recipe, task, protocol) / "step-0.pth"
        jobs += [Job(v.method, seed_name(row, seed), [str(s) for s in range(1, last_step + 1)],
                     [*v.flags, "--step_ckpt", str(step0), "--random_seed", str(seed)], after=v.recipe, row=row)
                 for seed in seeds_of.get(row, [])]
    return jobs + joint_jobs(seeds_of.get(JOINT, []))  # last: the rows' runs wait on their step 0, these on nothing


def runs_of(row: str, jobs: list[Job]) -> list[Job]:
    """The jobs a row rests on: its own seeds and the step-0 run they start from."""
    own = [j for j in jobs if j.row == row]
    return own + [j for j in jobs if j.after is None and j.name in {o.after for o in own}]


# run.py flags that command() sets for each job: passed through, they would override every row's.
PER_JOB_FLAGS = ("--method", "--name", "--results_file", "--step", "--random_seed", "--step_ckpt",
                 "--dataset")


def command(job: Job, logdir: Path, results: Path, extra: list[str], base: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "--dataset", "shapes",  # base holds --task and the protocol
            "--method", job.method, "--name", job.name, "--logdir", str(logdir), "--results_file", str(results),
            "--device", "cpu", "--no_progress", *base, *method_flags(job.method, base), "--step", *job.steps,
            *job.extra, *extra]


def execute(jobs: list[Job], workers: int, launch: Callable[[Job, int], subprocess.Popen]) -> dict[str, float]:
    """Run ``jobs`` ``workers`` at a time, each started once its step-0 run has succeeded.

    Returns the minutes of every finished job; a failed job, and every job waiting on it, is left
    out (and said so on one line)."""
    pending, running, minutes, failed = list(jobs), {}, {}, set()
    try:
        while pending or running:
            for job in [j for j in pending if j.after in failed]:
                pending.remove(job)
                failed.add(job.name)
                print(f"{job.name}: not run, its step-0 run {job.after} failed", flush=True)
            ready = [j for j in pending if j.after is None or j.after in minutes]
            while ready and len(running) < workers:
                job = ready.pop(0)
                pending.remove(job)
                running[job.name] = (job, launch(job, workers), time.perf_counter())
                print(f"{job.name}: started (steps {' '.join(job.steps)})", flush=True)
            if not running:
                break
            time.sleep(0.2)
            for name, (job, proc, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode == 0:
                    minutes[name] = (time.perf_counter() - start) / 60
                    print(f"{name}: done in {minutes[name]:.1f} min", flush=True)
                else:
                    failed.add(name)
                    print(f"{name}: run.py stopped with exit code {proc.returncode} ({last_line(proc)})", flush=True)
    finally:  # interrupted: the runs still going stop too (rerunning resumes them)
        for _, proc, _ in running.values():
            proc.terminate()
    return minutes


def last_line(proc: subprocess.Popen) -> str:
    """The last line a job's log holds (run.py's one-line error), or where the log is."""
    log = getattr(proc, "log", None)
    if log is None or not Path(log).is_file():
        return "its error is above"
    lines = [l for l in Path(log).read_text(errors="replace").splitlines() if l.strip()]
    return f"{lines[-1].strip() if lines else 'no output'}; log: {log}"


def launcher(logdir: Path, out: Path, extra: list[str], base: list[str]) -> Callable[[Job, int], subprocess.Popen]:
    """Start one job: its own results file (concurrent runs never rewrite one file), its output in
    ``out/logs``, and an equal share of the CPUs as intra-op threads."""
    def launch(job: Job, workers: int) -> subprocess.Popen:
        log = out / "logs" / f"{job.name}.log"
        for folder in ("logs", "results"):
            (out / folder).mkdir(parents=True, exist_ok=True)
        threads = str(max(1, available_cpus() // workers))
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        with open(log, "w") as f:
            proc = subprocess.Popen(command(job, logdir, out / "results" / f"{job.name}.jsonl", extra, base),
                                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        proc.log = log
        return proc
    return launch


def main(argv=None):
    p = ToolParser(description=__doc__, allow_abbrev=False)  # run.py's flags pass through whole (LSKD's --dis is one)
    p.add_argument("--methods", nargs="+", default=None,
                   help="any registered method (run.py --method); default: all of them, or none with --variant")
    p.add_argument("--variant", action="append", type=parse_variant, default=[], metavar='"NAME=METHOD FLAG ..."',
                   help="a row running METHOD with more flags after step 0 from METHOD's step-0 run (or, with "
                        "--step0 OTHER among the flags, OTHER's), over every seed (repeatable), e.g. "
                        "--variant \"PLOP+UNKD=PLOP --unkd --loss_kd 10\"")
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS,
                   help="seeds of the steps after step 0 for the ranked and any non-standard method; the others run the first")
    p.add_argument("--last_step", type=int, default=None,
                   help="stop after this step (a quick look at a new method); the table reads its scores "
                        "(default: the task's last, 5 on 15-1, 1 on 15-5)")
    p.add_argument("--flags", type=Path, default=DEMO_FLAGS,
                   help="file of the settings shared by every method (default: the demo's)")
    p.add_argument("--jobs", type=int, default=min(2, available_cpus()),
                   help="runs at a time, the CPUs shared equally between them (default: 2, or 1 on one CPU; "
                        "two one-thread runs do nearly twice the work of one two-thread run on 2 cores)")
    p.add_argument("--draws", type=int, nargs="+", default=None, metavar="D",
                   help="draws of the synthetic set's images (--shapes_seed D): the table on each, its runs "
                        "under LOGDIR/draw-D (the draw of --flags: LOGDIR, reusing the plain table's runs) and "
                        "its files under OUT/draw-D, then one over them (mean ± sd of the draws' means); "
                        "default: the one draw of --flags")
    p.add_argument("--task", nargs="+", default=["15-1"],
                   help="15-1, or PLOP's random class orders of it (15-1_b ... 15-1_w, alias 15-5s_b ...), "
                        "beside VOC's 15-1 rows; or 15-5, beside VOC's 15-5 rows; with several orders, the "
                        "table on each (its files under OUT/TASK), then one over them, as with --draws")
    p.add_argument("--joint", action="store_true",
                   help="add the joint-training bound: FT on every class at once with step 0's schedule "
                        "(--task offline), over the seeds, beside VOC's Joint row; never ranked")
    p.add_argument("--disjoint", action="store_true",
                   help="the disjoint protocol (an increment's images hold no future class), beside VOC's "
                        "disjoint rows; its runs in the -dj folders of LOGDIR (default: overlapped)")
    p.add_argument("--logdir", default="runs/leaderboard")
    p.add_argument("--out", default="results/leaderboard",
                   help="folder for results.jsonl, table.md, table.csv, the plots and each run's log")
    args, args.extra = p.parse_known_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    for flag in PER_JOB_FLAGS:
        if any(arg == flag or arg.startswith(flag + "=") for arg in args.extra):
            p.error(f"{flag} is set for each run by the leaderboard; choose rows with --methods or --variant, "
                    "and give the runs' other flags in --flags")
    if not args.flags.is_file():
        p.error(f"--flags {args.flags} is not a file; give a file of run.py flags, e.g. scripts/demo_flags.txt")
    try:
        chosen = [canonical(m) for m in (args.methods if args.methods is not None else [] if args.variant else METHODS)]
    except KeyError as exc:
        p.error(exc.args[0])
    for variant in args.variant:
        if is_method(variant.name) or variant.name == JOINT:
            p.error(f"variant name {variant.name} is a method's name or {JOINT}'s; give the variant another one")
    seeds_of = {m: (args.seeds if m in RANKED or m not in METHODS else args.seeds[:1]) for m in chosen}
    seeds_of |= {v.name: args.seeds for v in args.variant}
    seeds_of |= {JOINT: args.seeds} if args.joint else {}
    try:
        tasks = list(dict.fromkeys(canonical_task("shapes", t) for t in args.task))
    except TaskError as exc:
        p.error(str(exc))
    layouts = {layout(task) for task in tasks}
    if not layouts <= {"15-1", "15-5"} or len(layouts) > 1:
        p.error(f"--task {' '.join(tasks)}: the leaderboard runs 15-1 or its class orders (15-1_b ... 15-1_w), "
                "or 15-5, one of the two per table")
    last = Task("shapes", tasks[0], 0).num_steps - 1
    args.last_step = last if args.last_step is None else args.last_step
    if not 1 <= args.last_step <= last:
        p.error(f"--last_step {args.last_step}: {tasks[0]} has steps 1 to {last} after step 0")
    out, logdir, flags = Path(args.out), Path(args.logdir), demo_flags(args.flags)
    runs = ([(m, ()) for m in chosen] + [(v.method, v.flags) for v in args.variant]
            + [(step0_recipe(m), ()) for m in chosen] + [(v.recipe, ()) for v in args.variant]
            + [(job.method, ()) for job in joint_jobs(seeds_of.get(JOINT, [])[:1])])
    for method, row_flags in dict.fromkeys(runs):  # every run gets the extra flags: one refusal stops all now
        try:
            parse_args(["--dataset", "shapes", "--method", method, *flags, *row_flags, *args.extra])
        except ConfigError as exc:
            given = f"--flags {args.flags}" + (f" and {' '.join(args.extra)}" if args.extra else "")
            p.error(f"{method}'s runs refuse {given}: {str(exc).removesuffix(HELP_HINT)} (these flags go to "
                    "every run; give one method's own flags with --variant)")
    args.protocol = (DISJOINT if args.disjoint else OVERLAPPED).on(layouts.pop())
    own = parse_args(["--dataset", "shapes", *flags]).shapes_seed  # the draw the plain table runs on
    draws = args.draws or [own]
    start = time.perf_counter()
    tables = {}
    for task, draw in itertools.product(tasks, draws):
        # Each table is named by what varies: its order, its draw, or both ("15-1_b draw 1"); its
        # files go to OUT/15-1_b/draw-1.  The draw of --flags runs in LOGDIR (the plain table's
        # runs); each order has its own run folders there already (``run_dir``).
        parts = ([task] if len(tasks) > 1 else []) + ([f"draw {draw}"] if args.draws else [])
        label = " ".join(parts)
        base = flags + ["--task", task, *args.protocol.flags] + (["--shapes_seed", str(draw)] if args.draws else [])
        heading = (label + (f" (--shapes_seed {draw})" if args.draws else "")) if parts else None
        tables[label] = one_table(chosen, seeds_of, args, task, logdir if draw == own else logdir / f"draw-{draw}",
                                  out.joinpath(*(part.replace(" ", "-") for part in parts)), base, heading)
    if len(tasks) > 1 or args.draws:
        noun = "table" if len(tasks) > 1 and args.draws else "order" if len(tasks) > 1 else "draw"
        text = pooled_markdown(tables, noun, args.protocol)
        (out / "table.md").write_text(text + "\n")
        print(f"\nover {', '.join(tables)}: mean ± sd of the {noun}s' means\n{text}")
    print(f"total {(time.perf_counter() - start) / 60:.1f} min wall clock, {args.jobs} at a time")


def one_table(chosen: list[str], seeds_of: dict[str, list[int]], args, task: str, logdir: Path, out: Path,
              base: list[str], heading: Optional[str] = None) -> tuple[list[dict], list[str]]:
    """Run (or reuse) every job of one table, write its files under ``out`` and print it; returns
    the table and the methods that did not finish."""
    out.mkdir(parents=True, exist_ok=True)
    if heading:
        print(f"\n{heading}")
    jobs = plan(chosen, seeds_of, logdir, args.last_step, args.variant, task, args.protocol)
    minutes = execute(jobs, args.jobs, launcher(logdir, out, args.extra, base))
    failed = [m for m in seeds_of if any(j.name not in minutes for j in runs_of(m, jobs))]
    seeds_of = {m: s for m, s in seeds_of.items() if m not in failed}
    if not seeds_of:
        sys.exit("leaderboard: every method failed; nothing to tabulate")
    files = [out / "results" / f"{j.name}.jsonl" for j in jobs]
    rows = load_results([f for f in files if f.is_file()])
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the joint bound's one step is left out of the plots (its class IoU is by id, on another task)
    first = [r for m in seeds_of if m != JOINT for r in rows if r["name"] == seed_name(m, seeds_of[m][0])]
    plot_miou_per_step(first, out / "miou_per_step.png")
    plot_class_iou_heatmap(first, out / "class_iou.png")
    recipes = {name: row.recipe for name, row in table_rows(chosen, args.variant).items()}
    table = summarise(rows, seeds_of, recipes, args.protocol, task)
    text = markdown(table, ranking_spread(rows, seeds_of, recipes, args.protocol), args.protocol)
    text += "".join(f"\n{m}: did not finish (left out)" for m in failed)
    (out / "table.md").write_text(text + "\n")
    if table:
        write_csv(table, out / "table.csv")
    print(text)
    per_row = {}
    for j in jobs:
        per_row[j.row or j.name] = per_row.get(j.row or j.name, 0) + minutes.get(j.name, 0)
    print("run minutes per row (step-0 runs apart): " + ", ".join(f"{m} {v:.1f}" for m, v in per_row.items()))
    return table, failed


if __name__ == "__main__":
    script_main(main)
