"""scripts/leaderboard.py: the runs it plans and starts, its flags, and the README's example
method put on the leaderboard from a copy of the repository, as a user would.  Its tables are
tested in test_ranking.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metrics.ranking import PUBLISHED, RANKED, canonical
from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[1]


def _leaderboard():
    return load_script("scripts/leaderboard.py")


def test_shared_settings_come_from_the_flags_file(tmp_path):
    """--flags replaces the demo's settings for every method; DKD's lr divisor reads that file's lrs."""
    lb = _leaderboard()
    flags = tmp_path / "flags.txt"
    flags.write_text("--shapes_version 2 --epochs 8 10 --lr 0.1 0.01\n")
    base = lb.demo_flags(flags)
    assert base == ["--shapes_version", "2", "--epochs", "8", "10", "--lr", "0.1", "0.01"]
    assert lb.method_flags("DKD", base) == ["--lr", "0.01", "0.001"]
    assert lb.method_flags("MiB", base) == []
    # regularisers keep the reference's lr x importance (0.001 x 100) at the shared lr after step 0
    assert lb.method_flags("EWC", base) == ["--reg_importance", "10"]
    assert lb.method_flags("RW", lb.demo_flags(flags)[:-1] + ["0.002"]) == ["--reg_importance", "50"]
    assert lb.demo_flags() == (ROOT / "scripts" / "demo_flags.txt").read_text().split()
    # tables are keyed by the registry's spelling: LwF (registered as LWF) shares FT's step 0, has a VOC row
    assert lb.step0_recipe(canonical("LwF")) == "FT" and PUBLISHED[canonical("LwF")][2] == 1.8
    assert canonical("LwF") in RANKED


_FAKE_RUN = """
import json, sys, time
results, name, method, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
time.sleep(0.3)
if name in ("SDR", "PLOP-seed42"):
    print("error: the loss became NaN at step 1; lower --lr"); sys.exit(2)
with open(results, "a") as f:
    for step in map(int, steps):
        f.write(json.dumps({"dataset": "shapes", "task": "15-1", "overlap": True, "method": method, "name": name,
                            "step": step,
                            "miou_all": 0.4, "miou_old": 0.5, "miou_new": 0.1, "hiou": 0.2,
                            "class_iou": [0.5] * (16 + step)}) + "\\n")
"""


def test_runs_go_in_parallel_after_their_step0_and_a_failure_costs_only_its_rows(tmp_path, monkeypatch, capsys):
    """Two at a time: every seed starts after its recipe's step 0; a failed step 0 (SDR's) skips its
    seeds, a failed seed (PLOP's, which shares FT's step 0) costs PLOP's row, not MiB's."""
    lb = _leaderboard()
    out = tmp_path / "out"
    monkeypatch.setattr(lb, "command", lambda job, logdir, results, extra, base: [
        sys.executable, "-c", _FAKE_RUN, str(results), job.name, job.method, *job.steps])
    lb.main(["--methods", "FT", "MiB", "PLOP", "SDR", "--seeds", "42", "1", "--jobs", "2",
             "--logdir", str(tmp_path / "runs"), "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    started = [line.split(":")[0] for line in printed if line.endswith(")") and ": started" in line]
    done = [line.split(":")[0] for line in printed if ": done in" in line]
    assert started[:2] == ["FT", "SDR"]  # the step-0 runs first
    for name in started[2:]:  # a seed only after its step 0 finished
        assert name.startswith(("FT-", "MiB-", "PLOP-"))
        assert printed.index(next(l for l in printed if l.startswith("FT: done"))) < printed.index(
            next(l for l in printed if l.startswith(f"{name}: started")))
    assert set(done) == {"FT", "FT-seed42", "FT-seed1", "MiB-seed42", "MiB-seed1", "PLOP-seed1"}
    assert "SDR-seed42: not run, its step-0 run SDR failed" in printed
    assert any(l.startswith("PLOP-seed42: run.py stopped with exit code 2 (error: the loss became NaN") for l in printed)
    table = (out / "table.md").read_text()
    assert "| MiB | 2 |" in table and "| FT | 2 |" in table and "| PLOP |" not in table and "| SDR |" not in table
    assert "PLOP: did not finish (left out)" in table and "SDR: did not finish (left out)" in table
    merged = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert {r["name"] for r in merged} == set(done) and len(merged) == 1 + 5 * 5
    assert (out / "logs" / "PLOP-seed42.log").read_text().startswith("error: the loss became NaN")


def test_readme_shows_the_example_method_file_verbatim():
    example = (ROOT / "docs" / "example_method.py").read_text()
    assert example.strip() in (ROOT / "README.md").read_text()


def test_example_method_on_the_leaderboard(tmp_path):
    """The README's walk-through: drop the file into methods/, run one command, read the table."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "runs", "results", ".cache", "__pycache__",
                                                              "*.pth"))
    shutil.copy(ROOT / "docs" / "example_method.py", repo / "methods" / "pkd.py")
    tiny = ["--backbone", "resnet18", "--width", "0.125", "--no_pretrained", "--crop_size", "32",
            "--shapes_image_size", "32", "--shapes_train_size", "160", "--shapes_val_size", "40",
            "--batch_size", "8", "--epochs", "1", "--num_workers", "0", "--sample_num", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "scripts/leaderboard.py", "--methods", "PKD", "--seeds", "42",
                           "--last_step", "1", "--logdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                           *tiny], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| PKD | 1 |" in table
    log = (tmp_path / "runs" / "shapes" / "15-1-ov" / "PKD-seed42" / "log.txt").read_text()
    assert "pkd" in log and "unkd" in log  # the new term trained beside MiB's
    # Its flag belongs to it (and to subclasses): another method given it stops with one line.
    for method in ("MiB", "PLOP"):
        proc = subprocess.run([sys.executable, "run.py", "--dataset", "shapes", "--method", method, "--pkd_factor",
                               "1", "--logdir", str(tmp_path / "refused")], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 2 and proc.stderr.strip() == (
            f"error: --pkd_factor is read by PKD, not by --method {method}; drop it, or pick one of those methods")
    assert not (tmp_path / "refused").exists()


def _record_jobs(lb, monkeypatch) -> list:
    """Replace run.py by _FAKE_RUN; the returned list fills with the jobs launched."""
    calls = []

    def fake_command(job, logdir, results, extra, base):
        calls.append(job)
        return [sys.executable, "-c", _FAKE_RUN, str(results), job.name, job.method, *job.steps]

    monkeypatch.setattr(lb, "command", fake_command)
    return calls


def test_a_variant_is_its_own_row_from_its_methods_step0(tmp_path, monkeypatch, capsys):
    """--variant "NAME=METHOD FLAGS": steps 1-5 with the flags, step 0 shared with the method."""
    lb = _leaderboard()
    out = tmp_path / "out"
    calls = _record_jobs(lb, monkeypatch)
    lb.main(["--variant", "PLOP+UNKD=PLOP --unkd --loss_kd 10", "--seeds", "42", "1", "--jobs", "2",
             "--logdir", str(tmp_path / "runs"), "--out", str(out)])
    assert [j.name for j in calls if j.after is None] == ["FT"]  # PLOP's step 0 is FT's; no other row runs
    seeds = [j for j in calls if j.after]
    assert [j.name for j in seeds] == ["PLOP+UNKD-seed42", "PLOP+UNKD-seed1"]
    assert all(j.method == "PLOP" and j.extra[:3] == ["--unkd", "--loss_kd", "10"] for j in seeds)
    assert "| PLOP+UNKD | 2 |" in (out / "table.md").read_text()
    with pytest.raises(SystemExit):
        lb.main(["--variant", "MiB=PLOP --unkd", "--out", str(out)])
    with pytest.raises(SystemExit):
        lb.main(["--variant", "NoMethod", "--out", str(out)])
    assert "a variant is NAME=METHOD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lb.main(["--variant", "w>=0=LSKD --nonnegative_loss_weights", "--out", str(out)])
    assert "names run folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lb.main(["--methods", "FT", "--flags", str(tmp_path / "missing.txt"), "--out", str(out)])
    assert "is not a file" in capsys.readouterr().err


def test_a_variant_can_start_from_another_methods_step0(tmp_path, monkeypatch, capsys):
    """--step0 OTHER in a variant: its seeds load OTHER's step-0 checkpoint (MiB's is FT's), only
    that step-0 run is made, and the flag itself does not reach run.py."""
    lb = _leaderboard()
    out = tmp_path / "out"
    calls = _record_jobs(lb, monkeypatch)
    lb.main(["--variant", "LwF-MC-FT0=LwF-MC --step0 MiB --loss_kd 2", "--seeds", "42", "--jobs", "1",
             "--logdir", str(tmp_path / "runs"), "--out", str(out)])
    assert [j.name for j in calls if j.after is None] == ["FT"]  # MiB's step 0 is FT's; LwF-MC's own is not run
    (seed,) = [j for j in calls if j.after]
    assert seed.method == "LWF-MC" and seed.after == "FT"
    assert seed.extra == ["--loss_kd", "2", "--step_ckpt", str(tmp_path / "runs" / "shapes" / "15-1-ov" / "FT"
                                                                  / "step-0.pth"), "--random_seed", "42"]
    assert "| LwF-MC-FT0 | 1 |" in (out / "table.md").read_text()
    for bad, message in (("X=LwF-MC --step0", "names the method"), ("X=LwF-MC --step0 Nope", "Nope")):
        with pytest.raises(SystemExit):
            lb.main(["--variant", bad, "--out", str(out)])
        assert message in capsys.readouterr().err


def test_a_variant_with_refused_flags_stops_before_any_run(tmp_path, monkeypatch, capsys):
    lb = _leaderboard()
    calls = _record_jobs(lb, monkeypatch)
    for bad, message in (("X=MiB --no_masks", "variant X: --no_masks is read by LSKD, not by --method MiB"),
                         ("X=FT --threshold 0.5", "--threshold is read by PLOP")):
        with pytest.raises(SystemExit):
            lb.main(["--variant", bad, "--logdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
        assert message in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "runs").exists()
    # PLOP reads both flags and its preset sets --pod_logits, which --pod_new_logits needs.
    assert lb.parse_variant("X=PLOP --pod_new_logits drop").flags == ("--pod_new_logits", "drop")



def test_run_flags_pass_through_whole_and_per_run_flags_are_refused(tmp_path, monkeypatch, capsys):
    """Flags the leaderboard does not know go to every run.py call unabbreviated (LSKD's --dis is
    not --disjoint), and one that a run would refuse stops the table before any run; a flag the
    leaderboard sets for each run (--method ...) is refused too, since it would override every row's."""
    lb = _leaderboard()
    calls = []
    monkeypatch.setattr(lb, "command", lambda job, logdir, results, extra, base: calls.append((extra, base)) or
                        [sys.executable, "-c", _FAKE_RUN, str(results), job.name, job.method, *job.steps])
    lb.main(["--methods", "FT", "--seeds", "42", "--jobs", "1", "--crop_size", "48",
             "--logdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert len(calls) == 2 and all(extra == ["--crop_size", "48"] and "--overlap" in base for extra, base in calls)
    calls.clear()
    # a flag that a run would refuse stops the table before any run, with one line: a bad value; an
    # LSKD flag that MiB's runs refuse; the same flag for LSKD alone, refused by FT's step 0, which
    # LSKD's row starts from (before, each run failed in turn)
    for args, refusal in ((["--methods", "FT", "--dis", "0.5"], "unknown distance '0.5'"),
                          (["--methods", "LSKD", "MiB", "--no_masks"], "MiB's runs refuse"),
                          (["--methods", "LSKD", "--no_masks"], "FT's runs refuse")):
        with pytest.raises(SystemExit):
            lb.main([*args, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert refusal in err and "--variant" in err and err.count("\n") == 1, err
    for args in (["--method", "MiB"], ["--random_seed=3"], ["--logdir", "runs", "--name", "x"]):
        with pytest.raises(SystemExit):
            lb.main(["--methods", "FT", *args, "--out", str(tmp_path / "out")])
        flag = args[0].split("=")[0] if args[0] != "--logdir" else "--name"
        assert f"{flag} is set for each run by the leaderboard" in capsys.readouterr().err
    assert calls == []

_FAKE_DRAW_RUN = """
import json, sys
results, name, draw, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
if name == "PLOP-seed1" and draw == 1:
    print("error: the loss became NaN at step 1; lower --lr"); sys.exit(2)
# all-class mIoU: method's base (FT 0.05, MiB 0.30, PLOP 0.50) + 0.1 x draw + 0.01 x (seed == 1)
base = {"FT": 0.05, "MiB": 0.30, "PLOP": 0.50}[name.split("-")[0]]
with open(results, "a") as f:
    for step in map(int, steps):
        f.write(json.dumps({"dataset": "shapes", "task": "15-1", "overlap": True, "method": name.split("-")[0],
                            "name": name, "step": step,
                            "miou_all": base + 0.1 * draw + 0.01 * name.endswith("seed1"), "miou_old": 0.5,
                            "miou_new": 0.1, "hiou": 0.2, "class_iou": [0.5] * (16 + step)}) + "\\n")
"""


def test_draws_run_one_table_per_draw_and_pool_their_means(tmp_path, monkeypatch, capsys):
    """--draws: each draw's runs get --shapes_seed D and their own folders, but the draw of --flags
    runs in the plain table's LOGDIR (its runs are reused); the pooled row is the mean and sd over
    draws of each draw's seed mean; a method failing on one draw leaves the pooled table."""
    lb = _leaderboard()
    out, logdir = tmp_path / "out", tmp_path / "runs"
    commands = []

    def fake(job, logdir, results, extra, base):
        commands.append((job.name, str(logdir), base[-2:]))
        return [sys.executable, "-c", _FAKE_DRAW_RUN, str(results), job.name, base[-1], *job.steps]

    monkeypatch.setattr(lb, "command", fake)
    lb.main(["--methods", "FT", "MiB", "PLOP", "--seeds", "42", "1", "--last_step", "1", "--draws", "0", "2", "1",
             "--logdir", str(logdir), "--out", str(out)])
    printed = capsys.readouterr().out
    for draw in (0, 1, 2):
        ran = [(name, folder) for name, folder, flags in commands if flags == ["--shapes_seed", str(draw)]]
        assert len(ran) == 7 and {folder for _, folder in ran} == {str(logdir if draw == 0 else logdir / f"draw-{draw}")}
        assert (out / f"draw-{draw}" / "table.md").is_file() and f"draw {draw} (--shapes_seed {draw})" in printed
    pooled = (out / "table.md").read_text()
    # MiB: draw means 0.305, 0.505, 0.405 (draws 0, 2, 1) -> 40.50 ± 10.00; FT 15.50 ± 10.00
    assert "| MiB | 3×2 | 50.00 ± 0.00 | 10.00 ± 0.00 | 40.50 ± 10.00 |" in pooled
    assert "| FT | 3×2 |" in pooled and "| PLOP |" not in pooled
    assert "PLOP: did not finish on draw 1 (left out)" in pooled
    # each draw's table ranks FT < MiB < PLOP as VOC does; the pooled one has FT and MiB only (< 3)
    assert "Spearman of each draw's table: draw 0 1.00, draw 2 1.00" in pooled
    assert "over draw 0, draw 2, draw 1: mean ± sd of the draws' means" in printed


def test_draws_reuse_the_plain_tables_runs_for_the_draw_of_the_flags_file(tmp_path, monkeypatch):
    """A flags file on draw 1: --draws 1 2 runs draw 1 in LOGDIR itself, where the plain table ran."""
    lb = _leaderboard()
    flags = tmp_path / "flags.txt"
    flags.write_text(lb.DEMO_FLAGS.read_text().strip() + " --shapes_seed 1\n")
    logdir, folders = tmp_path / "runs", {}

    def fake(job, logdir, results, extra, base):
        folders.setdefault(base[-1], set()).add(str(logdir))
        return [sys.executable, "-c", _FAKE_DRAW_RUN, str(results), job.name, base[-1], *job.steps]

    monkeypatch.setattr(lb, "command", fake)
    lb.main(["--methods", "FT", "MiB", "--seeds", "42", "--last_step", "1", "--draws", "1", "2", "--flags", str(flags),
             "--logdir", str(logdir), "--out", str(tmp_path / "out")])
    assert folders == {"1": {str(logdir)}, "2": {str(logdir / "draw-2")}}


def test_task_runs_one_of_plops_class_orders(tmp_path, monkeypatch, capsys):
    """--task 15-5s_b: every run gets --task 15-1_b and its own folder, steps 1-5 start from that
    order's step 0; a task that is not 15-1 is refused before any run."""
    lb = _leaderboard()
    logdir, calls = tmp_path / "runs", []

    def fake(job, logdir, results, extra, base):
        calls.append((job.name, base[base.index("--task") + 1], job.extra))
        return [sys.executable, "-c", _FAKE_DRAW_RUN, str(results), job.name, "0", *job.steps]

    monkeypatch.setattr(lb, "command", fake)
    lb.main(["--methods", "FT", "MiB", "--seeds", "42", "--last_step", "1", "--task", "15-5s_b",
             "--logdir", str(logdir), "--out", str(tmp_path / "out")])
    assert {task for _, task, _ in calls} == {"15-1_b"} and len(calls) == 3
    step0 = str(logdir / "shapes" / "15-1_b-ov" / "FT" / "step-0.pth")
    assert all(extra[extra.index("--step_ckpt") + 1] == step0 for name, _, extra in calls if name != "FT")
    assert "| MiB | 1 |" in (tmp_path / "out" / "table.md").read_text()
    with pytest.raises(SystemExit):
        lb.main(["--task", "10-1", "--logdir", str(logdir), "--out", str(tmp_path / "out")])
    assert "the leaderboard runs 15-1 or its class orders (15-1_b ... 15-1_w), or 15-5" in capsys.readouterr().err


def test_15_5_runs_its_one_step_beside_vocs_15_5_rows(tmp_path, monkeypatch, capsys):
    """--task 15-5: each seed runs step 1 only, from the 15-5 folder's step 0, and the table sets
    the published 15-5 rows beside it; more steps, or 15-1 and 15-5 in one table, are refused."""
    lb = _leaderboard()
    logdir, calls = tmp_path / "runs", []

    def fake(job, logdir, results, extra, base):
        calls.append((job.name, base[base.index("--task") + 1], job.steps, job.extra))
        fake_run = _FAKE_DRAW_RUN.replace('"task": "15-1"', '"task": "15-5"')
        return [sys.executable, "-c", fake_run, str(results), job.name, "0", *job.steps]

    monkeypatch.setattr(lb, "command", fake)
    out = tmp_path / "out"
    lb.main(["--methods", "FT", "MiB", "PLOP", "--seeds", "42", "1", "--task", "15-5", "--logdir", str(logdir),
             "--out", str(out)])
    assert {task for _, task, _, _ in calls} == {"15-5"} and len(calls) == 7  # FT's step 0, then 3 x 2 seeds
    assert all(steps == ["1"] for name, _, steps, _ in calls if name != "FT")
    step0 = str(logdir / "shapes" / "15-5-ov" / "FT" / "step-0.pth")
    assert all(extra[extra.index("--step_ckpt") + 1] == step0 for name, _, _, extra in calls if name != "FT")
    text = (out / "table.md").read_text()
    assert "| VOC 15-5 old / new / all |" in text
    assert "| 75.5 / 49.4 / 69.0 |" in text and "| 75.7 / 51.7 / 70.1 |" in text and "| 2.1 / 33.1 / 9.8 |" in text
    # all-mIoU FT 5.5 < MiB 30.5 < PLOP 50.5 (+1 for seed 1), as VOC 15-5's 9.8 < 69.0 < 70.1
    assert "over 3 methods (FT, MiB, PLOP): 1.00" in text
    for argv, message in ((["--last_step", "2"], "--last_step 2: 15-5 has steps 1 to 1 after step 0"),
                          (["--task", "15-1", "15-5"], "one of the two per table")):
        with pytest.raises(SystemExit):
            lb.main(["--task", "15-5", *argv, "--logdir", str(logdir), "--out", str(out)])
        assert message in capsys.readouterr().err


def test_several_orders_run_one_table_each_and_pool_their_means(tmp_path, monkeypatch, capsys):
    """--task 15-1_b 15-1_c: each order runs in its own folders of LOGDIR and writes its table
    under OUT/TASK; the pooled row is the mean and sd over orders of each order's seed mean, and
    each order's Spearman is listed."""
    lb = _leaderboard()
    out, logdir, calls = tmp_path / "out", tmp_path / "runs", []
    position = {"15-1_b": 0, "15-1_c": 2}  # the fake run's "draw" term: mIoU + 0.1 x position

    def fake(job, logdir, results, extra, base):
        task = base[base.index("--task") + 1]
        calls.append((job.name, task, str(logdir), job.extra))
        return [sys.executable, "-c", _FAKE_DRAW_RUN, str(results), job.name, str(position[task]), *job.steps]

    monkeypatch.setattr(lb, "command", fake)
    lb.main(["--methods", "FT", "MiB", "PLOP", "--seeds", "42", "1", "--last_step", "1",
             "--task", "15-5s_b", "15-1_c", "--logdir", str(logdir), "--out", str(out)])
    printed = capsys.readouterr().out
    for task in position:
        ran = [(name, extra) for name, t, folder, extra in calls if t == task and folder == str(logdir)]
        assert len(ran) == 7, task
        step0 = str(logdir / "shapes" / f"{task}-ov" / "FT" / "step-0.pth")
        assert all(extra[extra.index("--step_ckpt") + 1] == step0 for name, extra in ran if name != "FT")
        assert "| MiB | 2 |" in (out / task / "table.md").read_text()
    pooled = (out / "table.md").read_text()
    # MiB: order means 0.305 (b) and 0.505 (c) -> 40.50 ± 14.14; PLOP: 0.505 and 0.705 -> 60.50 ± 14.14
    assert "| method | orders × seeds |" in pooled
    assert "| MiB | 2×2 | 50.00 ± 0.00 | 10.00 ± 0.00 | 40.50 ± 14.14 |" in pooled
    assert "| PLOP | 2×2 | 50.00 ± 0.00 | 10.00 ± 0.00 | 60.50 ± 14.14 |" in pooled
    assert "Spearman of each order's table: 15-1_b 1.00, 15-1_c 1.00" in pooled
    assert "over 15-1_b, 15-1_c: mean ± sd of the orders' means" in printed


_FAKE_PROTOCOL_RUN = """
import json, sys
results, name, overlap, steps = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
base = {"MiB": 0.30, "PLOP": 0.40, "SDR": 0.50, "REMINDER": 0.60, "FT": 0.05}[name.split("-")[0]]
with open(results, "a") as f:
    for step in map(int, steps):
        for protocol, value in ((overlap, base), (not overlap, 0.99)):  # the other protocol's line is a decoy
            f.write(json.dumps({"dataset": "shapes", "task": "15-1", "overlap": protocol, "method": name.split("-")[0],
                                "name": name, "step": step, "miou_all": value, "miou_old": 0.5, "miou_new": 0.1, "hiou": 0.2,
                                "class_iou": [0.5] * (16 + step)}) + "\\n")
"""


def test_disjoint_runs_without_overlap_in_its_own_folders_beside_vocs_disjoint_rows(tmp_path, monkeypatch, capsys):
    """--disjoint: no --overlap reaches run.py, step 0 is the -dj folder's, only disjoint result lines
    count, and the table sets VOC's disjoint rows beside them.  SDR above PLOP is VOC's disjoint
    order (48.7 > 46.5) and the reverse of its overlapped one (39.5 < 54.6); REMINDER has no
    disjoint row, so it stays out of the correlation."""
    lb = _leaderboard()
    logdir, out, calls = tmp_path / "runs", tmp_path / "out", []

    def fake(job, logdir, results, extra, base):
        calls.append((job.name, base, job.extra))
        return [sys.executable, "-c", _FAKE_PROTOCOL_RUN, str(results), job.name, str(int("--overlap" in base)),
                *job.steps]

    monkeypatch.setattr(lb, "command", fake)
    names = ["MiB", "PLOP", "SDR", "REMINDER"]
    lb.main(["--methods", *names, "--seeds", "42", "--last_step", "1", "--disjoint",
             "--logdir", str(logdir), "--out", str(out)])
    assert calls and not any("--overlap" in base for _, base, _ in calls)
    step0 = str(logdir / "shapes" / "15-1-dj" / "FT" / "step-0.pth")
    assert all(extra[extra.index("--step_ckpt") + 1] == step0 for name, _, extra in calls if name.startswith("MiB"))
    table = (out / "table.md").read_text()
    assert "| VOC disjoint old / new / all |" in table
    assert "| MiB | 1 | 50.00 | 10.00 | 30.00 |" in table and "| 46.2 / 12.9 / 37.9 |" in table
    assert "| SDR | 1 | 50.00 | 10.00 | 50.00 |" in table and "| 59.4 / 14.3 / 48.7 |" in table
    assert "| REMINDER | 1 | 50.00 | 10.00 | 60.00 | 20.00 | 60.00 | - |" in table
    names = ", ".join(canonical(m) for m in ("MiB", "PLOP", "SDR"))
    assert f"with VOC disjoint over 3 methods ({names}): 1.00" in table
    # the same runs overlapped: VOC puts PLOP above SDR, so rho falls to 0.5 (ranks 1 2 3 against 1 3 2)
    calls.clear()
    lb.main(["--methods", *names.split(", "), "--seeds", "42", "--last_step", "1",
             "--logdir", str(logdir), "--out", str(tmp_path / "out-ov")])
    assert all("--overlap" in base for _, base, _ in calls)
    assert f"with VOC over 3 methods ({names}): 0.50" in (tmp_path / "out-ov" / "table.md").read_text()


_FAKE_JOINT_RUN = """
import json, sys
results, name, task, overlap, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5:]
with open(results, "a") as f:
    for step in map(int, steps):
        # the joint run: 0.8 IoU on ids 0-15, 0.5 (seed 42) or 0.3 (seed 1) on 16-20
        iou = [0.8] * 16 + [0.5 if name.endswith("seed42") else 0.3] * 5 if name.startswith("Joint") else [0.5] * 17
        f.write(json.dumps({"dataset": "shapes", "task": task, "overlap": overlap, "method": name.split("-")[0],
                            "name": name, "step": step, "miou_all": 0.4, "miou_old": 0.5, "miou_new": 0.1,
                            "hiou": 0.2, "class_iou": iou}) + "\\n")
"""


def test_joint_adds_the_bound_trained_on_every_class_once_per_seed(tmp_path, monkeypatch, capsys):
    """--joint: FT on --task offline (overlapped whatever the table's protocol) once per seed, from
    no step-0 run, scored with the table's old/new split beside VOC's Joint and kept out of rho; its
    run folder is the same for 15-1 and 15-5 tables, so the second table reuses it."""
    lb = _leaderboard()
    logdir, calls = tmp_path / "runs", []

    def fake(job, logdir, results, extra, base):
        argv = base + job.extra  # as command() joins them: the job's --task comes last and wins
        task = argv[len(argv) - 1 - argv[::-1].index("--task") + 1]
        calls.append((job.name, task, job.steps, job.extra, "--overlap" in argv))
        return [sys.executable, "-c", _FAKE_JOINT_RUN, str(results), job.name, task, str(int("--overlap" in argv)),
                *job.steps]

    monkeypatch.setattr(lb, "command", fake)
    out = tmp_path / "out"
    lb.main(["--methods", "MiB", "--seeds", "42", "1", "--last_step", "1", "--joint", "--disjoint",
             "--logdir", str(logdir), "--out", str(out)])
    joint = [c for c in calls if c[0].startswith("Joint")]
    assert [c[0] for c in joint] == ["Joint-seed42", "Joint-seed1"]
    assert all(task == "offline" and steps == ["0"] and overlap for _, task, steps, _, overlap in joint)
    assert [extra[extra.index("--random_seed") + 1] for *_, extra, _ in joint] == ["42", "1"]
    assert "--step_ckpt" not in joint[0][3]
    text = (out / "table.md").read_text()
    # old 80 on both seeds; new 50 and 30 -> 40 ± 14.14; VOC's Joint (MiB's Tab. 1) beside it
    assert "| Joint | 2 | 80.00 ± 0.00 | 40.00 ± 14.14 |" in text and "| 79.1 / 72.6 / 77.4 |" in text
    assert text.index("| MiB | 2 |") < text.index("| Joint | 2 |")  # the bound closes the table
    # a variant may not take the row's name
    with pytest.raises(SystemExit):
        lb.main(["--variant", "Joint=MiB --loss_kd 100", "--logdir", str(logdir), "--out", str(out)])
    assert "give the variant another one" in capsys.readouterr().err
