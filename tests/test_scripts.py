"""The benchmark scripts: syntax, and the run.py launches each makes, recorded by a fake torchrun.

Every recorded command line must parse with run.py's own parser (a misspelt flag fails here),
and the launches must be one per step of the task, in order, with the script's method, task
and protocol.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import methods
from argparser import build_parser, parse_args, run_dir
from dataset.tasks import Task

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*/*.sh"))
BENCHMARKS = [p for p in SCRIPTS if p.parent.name in ("voc", "ade")]
# Every option spelling run.py knows; argparse would also accept unambiguous prefixes, scripts may not.
OPTIONS = {s for action in build_parser()._actions for s in action.option_strings}
FAKE_TORCHRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$CALLS/$(printf '%03d' "$(ls "$CALLS" | wc -l)")"
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake(tmp_path):
    """Environment with a recording torchrun first on PATH; returns (env, calls folder)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    torchrun = bin_dir / "torchrun"
    torchrun.write_text(FAKE_TORCHRUN)
    torchrun.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CALLS=str(calls),
               DATA_ROOT=str(tmp_path / "data"), LOGDIR=str(tmp_path / "runs"), REPORT="0")
    env.pop("NAME", None)
    env.pop("GPUS", None)
    return env, calls


def run_script(script, env, *args):
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def recorded(calls: Path) -> list[list[str]]:
    return [f.read_text().splitlines() for f in sorted(calls.iterdir())]


def split_launch(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, run.py arguments) of one recorded torchrun command line."""
    (i,) = [k for k, a in enumerate(argv) if a.endswith("run.py")]
    assert Path(argv[i]).resolve() == ROOT / "run.py"
    return argv[:i], argv[i + 1:]


def test_every_script_is_valid_bash():
    assert SCRIPTS
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_every_method_has_the_two_standard_settings():
    names = {p.relative_to(ROOT / "scripts").as_posix() for p in BENCHMARKS}
    for method in methods.method_names():
        assert f"voc/{method.lower()}_15-1.sh" in names, method
        assert f"ade/{method.lower()}_100-10.sh" in names, method


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_script_launches_each_step_once(script, fake):
    env, calls = fake
    env["GPUS"] = "2"
    proc = run_script(script, env, "--num_workers", "3")
    assert proc.returncode == 0, proc.stderr
    method_file, task = script.stem.rsplit("_", 1)
    dataset = script.parent.name
    launches = [split_launch(argv) for argv in recorded(calls)]
    assert len(launches) == Task(dataset, task, 0).num_steps
    for step, (torchrun_opts, args) in enumerate(launches):
        assert torchrun_opts == ["--nproc_per_node=2"]
        assert [a for a in args if a.startswith("--") and a not in OPTIONS] == []
        opts = parse_args(args)
        assert opts.step == [step]
        assert opts.method_cls is methods.get_method_class(method_file)
        assert (opts.dataset, opts.task, opts.overlap) == (dataset, task, True)
        assert opts.data_root == env["DATA_ROOT"] and opts.num_workers == 3
        assert run_dir(opts) == Path(env["LOGDIR"]) / dataset / f"{task}-ov" / opts.method
        assert (opts.crop_size, opts.amp) == (512, True)
        # Launches differ only in the step and, for some methods, the batch of step 0.
        assert without_step_and_batch(args) == without_step_and_batch(launches[0][1])


def without_step_and_batch(args: list[str]) -> list[str]:
    flags = ("--step", "--batch_size")
    return [a for i, a in enumerate(args) if a not in flags and (i == 0 or args[i - 1] not in flags)]


def test_per_gpu_batch_is_the_total_over_gpus(fake):
    env, calls = fake
    script = ROOT / "scripts" / "voc" / "lgkd_15-1.sh"  # 2 GPUs x 8, then x 12 in the reference
    assert run_script(script, env).returncode == 0
    one_gpu = [parse_args(split_launch(a)[1]).batch_size for a in recorded(calls)]
    for f in calls.iterdir():
        f.unlink()
    env["GPUS"] = "4"
    assert run_script(script, env).returncode == 0
    four_gpus = [parse_args(split_launch(a)[1]).batch_size for a in recorded(calls)]
    assert one_gpu == [16] + [24] * 5
    assert four_gpus == [4] + [6] * 5


def test_script_flags_and_name(fake):
    env, calls = fake
    env["NAME"] = "mib-kd100"
    assert run_script(ROOT / "scripts" / "voc" / "mib_15-1.sh", env, "--loss_kd", "50").returncode == 0
    first = parse_args(split_launch(recorded(calls)[0])[1])
    assert first.name == "mib-kd100"
    assert first.loss_kd == 50  # the caller's flags come last and win
    assert first.lr == [0.01, 0.001] and first.epochs == [30]


def test_missing_data_root_or_bad_gpus_stop_before_any_launch(fake):
    env, calls = fake
    script = ROOT / "scripts" / "voc" / "lgkd_15-1.sh"  # total batch 16, then 24: GPUS=16 fits step 0 only
    bad = (({"DATA_ROOT": ""}, "DATA_ROOT"), ({"GPUS": "0"}, "GPUS"), ({"GPUS": "5"}, "divisible"),
           ({"GPUS": "16"}, "divisible"))
    for change, message in bad:
        proc = run_script(script, dict(env, **change))
        assert proc.returncode != 0 and message in proc.stderr
    proc = run_script(script, env, "--step", "3")
    assert proc.returncode != 0 and "--step" in proc.stderr
    assert recorded(calls) == []


def test_a_failing_step_stops_the_script(fake):
    env, calls = fake
    proc = run_script(ROOT / "scripts" / "voc" / "plop_15-1.sh", dict(env, FAKE_RC="1"))
    assert proc.returncode != 0
    assert len(recorded(calls)) == 1


def test_report_reads_the_run_directory(fake):
    """The table at the end reads <run dir>/results.jsonl, the file run.py writes."""
    env, calls = fake
    script = ROOT / "scripts" / "voc" / "ft_15-1.sh"
    assert run_script(script, env).returncode == 0
    opts = parse_args(split_launch(recorded(calls)[-1])[1])
    results = run_dir(opts) / "results.jsonl"
    results.parent.mkdir(parents=True)
    row = {"dataset": "voc", "task": "15-1", "overlap": True, "method": "FT", "name": "FT", "step": 5,
           "miou_all": 0.25, "miou_old": 0.125, "miou_new": 0.5, "hiou": 0.2}
    results.write_text(json.dumps(row) + "\n")
    proc = run_script(script, dict(env, REPORT="1", PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    assert "| voc 15-1 ov (step 5) | FT | FT | 12.50 | 50.00 | 25.00 | 20.00 | 25.00 |" in proc.stdout
