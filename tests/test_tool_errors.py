"""The tools beside run.py stop a bad command line as run.py does (tests/test_reliability.py): one
line on stderr, exit code 2, no traceback, before any work and without writing anything."""
from __future__ import annotations

import pytest

import metrics.plots
import metrics.report
from utils.cli import script_main

from scripts_loader import load_script

CASES = [
    # a run.py flag that no method reads: refused before the leaderboard starts any run
    ("scripts/leaderboard.py", ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    # a method's flag given to a table that also runs other methods: refused for the first one it does not fit
    ("scripts/leaderboard.py", ["--methods", "FT", "PLOP", "--pod_factor", "1"], "--pod_factor is read by"),
    ("scripts/chaos.py", ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    # before, colour_cue read run.py's flags only with --ckpt: --shapes_seed alone was silently ignored
    ("scripts/colour_cue.py", ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("scripts/colour_cue.py", ["--shapes_seed", "-1"], "--shapes_seed must be >= 0"),
    ("scripts/pod_gap.py", ["--dataset", "shapes", "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("scripts/pseudo_label_quality.py", ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("scripts/class_confusion.py", [], "the following arguments are required: --classes"),
    ("scripts/pretrain_shapes.py", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    ("scripts/pretrain_shapes.py", ["--lr", "nan"], "--lr must be a finite number"),
    ("scripts/pretrain_shapes.py", ["--images", "8"], "--images 8 is fewer than one batch (--batch_size 16)"),
    ("scripts/pretrain_shapes.py", ["--backbone", "vgg16"], "argument --backbone: invalid choice: 'vgg16'"),
    # an --out that cannot be written stops before the hour of training, not after it
    ("scripts/pretrain_shapes.py", ["--out", "/sys/cssbench-test/body.pth.tar"], "its folder cannot be written"),
    ("scripts/bench_speed.py", ["--methods", "FT", "NoSuchMethod"], "unknown method 'NoSuchMethod'"),
    ("scripts/gpu_check.py", ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("data/make_shapes.py", [], "the following arguments are required: --root"),
]


def _expect_one_line_exit_2(main, argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tools' default output folders are relative: nothing may appear
    with pytest.raises(SystemExit) as exit_:
        script_main(lambda: main(argv))  # as each tool's __main__ runs it (a user error: one line)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert fragment in lines[0], lines[0]
    assert lines[0].count("--help") <= 1, lines[0]  # one pointer to the help, not run.py's and the tool's
    assert not captured.out.strip(), captured.out  # nothing started
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("tool,argv,fragment", CASES, ids=[f"{t.split('/')[-1]}:{' '.join(a)}" for t, a, _ in CASES])
def test_a_bad_command_line_is_one_line(tool, argv, fragment, capsys, tmp_path, monkeypatch):
    _expect_one_line_exit_2(load_script(tool).main, argv, fragment, capsys, tmp_path, monkeypatch)


@pytest.mark.parametrize("module,prog", [(metrics.report, "python -m metrics.report"),
                                         (metrics.plots, "python -m metrics.plots")])
def test_the_metrics_tools_name_how_they_are_run(module, prog, capsys, tmp_path, monkeypatch):
    _expect_one_line_exit_2(module.main, [], f"{prog}: error: the following arguments are required: results",
                            capsys, tmp_path, monkeypatch)


GOOD_LINE = ('{"dataset": "shapes", "task": "15-1", "overlap": true, "method": "FT", "name": "FT", "step": 0, '
             '"miou_old": 0.7, "miou_new": null, "miou_all": 0.7, "hiou": null, "class_iou": [0.9, 0.5]}\n')
BAD_RESULTS = [
    (None, "cannot read results file {path} (No such file or directory)"),
    ("dir", "cannot read results file {path} (Is a directory)"),
    (b"\xff\xfe\x00binary", "cannot read results file {path} (not text)"),
    ("not json\n", "{path} line 1 is not a JSON object"),
    (GOOD_LINE + "\n[1, 2]\n", "{path} line 3 is not a JSON object"),  # blank lines are skipped, still counted
    ('{"dataset": "shapes", "step": 0}\n', "{path} line 1 lacks task, overlap, method, name, miou_old"),
]


@pytest.mark.parametrize("module", [metrics.report, metrics.plots], ids=["report", "plots"])
@pytest.mark.parametrize("content,fragment", BAD_RESULTS, ids=["missing", "folder", "binary", "text", "array",
                                                               "foreign"])
def test_a_bad_results_file_is_one_line(module, content, fragment, capsys, tmp_path_factory, tmp_path, monkeypatch):
    path = tmp_path_factory.mktemp("results") / "results.jsonl"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    argv = [str(path)] + (["--out", "figures"] if module is metrics.plots else [])
    _expect_one_line_exit_2(module.main, argv, fragment.format(path=path), capsys, tmp_path, monkeypatch)


def test_the_plots_need_each_lines_class_iou(capsys, tmp_path_factory, tmp_path, monkeypatch):
    path = tmp_path_factory.mktemp("results") / "results.jsonl"
    path.write_text(GOOD_LINE.replace(', "class_iou": [0.9, 0.5]', ""))
    metrics.report.main([str(path)])  # the table does not read it
    assert "| shapes 15-1 ov (step 0) | FT | FT | 70.00 |" in capsys.readouterr().out
    _expect_one_line_exit_2(metrics.plots.main, [str(path), "--out", "figures"], f"{path} line 1 lacks class_iou",
                            capsys, tmp_path, monkeypatch)


def test_python_m_metrics_report_ends_a_bad_file_with_one_line(tmp_path):
    """The module's own entry point (``python -m``) goes through script_main too."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "r.jsonl").write_text("not json\n")
    proc = subprocess.run([sys.executable, "-m", "metrics.report", str(tmp_path / "r.jsonl")], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: {tmp_path / 'r.jsonl'} line 1 is not a JSON object: not a line of "
                                   "run.py's results; remove it or give the results.jsonl files run.py wrote")
