"""The command line end to end: a tiny continual run, --test, resume, and every bad input.

Bad input must end with exit code 2, one line on stderr that names the problem and the fix, no
traceback, and nothing on disk changed.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--backbone", "resnet18", "--width", "0.125", "--norm_act", "abn",
        "--no_pretrained", "--crop_size", "48", "--batch_size", "4", "--num_workers", "0",
        "--epochs", "1", "--lr", "0.01", "0.001", "--no_progress"]
TINY = ["--dataset", "shapes", *MODEL, "--shapes_image_size", "48", "--shapes_train_size", "96",
        "--shapes_val_size", "60"]


def cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Steps 0 and 1 of shapes 15-1 with FT, shared by the tests below."""
    logdir = tmp_path_factory.mktemp("runs")
    proc = cli(*TINY, "--task", "15-1", "--overlap", "--method", "FT", "--step", "0", "1",
               "--name", "ft", "--logdir", str(logdir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return logdir, logdir / "shapes" / "15-1-ov" / "ft", proc


def test_run_writes_checkpoints_results_and_logs(trained):
    _, run_dir, proc = trained
    assert (run_dir / "step-0.pth").is_file() and (run_dir / "step-1.pth").is_file()
    assert not list(run_dir.glob("*.last.pth"))
    lines = [json.loads(l) for l in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1]
    for key in ("dataset", "task", "overlap", "method", "name", "step", "miou_all", "miou_old", "miou_new",
                "hiou", "class_iou", "seconds"):
        assert key in lines[1]
    assert len(lines[0]["class_iou"]) == 16 and len(lines[1]["class_iou"]) == 17
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpt = torch.load(run_dir / "step-1.pth", weights_only=False)
    assert ckpt["task"]["classes"] == [list(range(16)), [16]]
    assert "cls.1.weight" in ckpt["model"] and ckpt["model"]["cls.1.weight"].shape[0] == 1
    assert "step |   all  |   old  |   new  |  hIoU" in proc.stdout


def test_pod_gap_script_reports_both_steps_images_and_changes_nothing(trained):
    logdir, run_dir, _ = trained
    before = snapshot(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pod_gap.py"), *TINY, "--task", "15-1",
                           "--overlap", "--step", "1", "--name", "ft", "--logdir", str(logdir),
                           "--spp_scales", "1", "2", "--batch_sizes", "2", "4", "--batches", "2", "--per_class",
                           "--method", "PLOP", "--batch_size", "3"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # --per_class: one line per class holding a training image, its step under 15-1, its image count
    # (up to the largest batch size), counted here from the labels alone
    from dataset.shapes import generate_label
    holding = {c: sum(c in generate_label(0, "train", i, 48) for i in range(96)) for c in range(1, 21)}
    per_class = {int(m[1]): (int(m[2]), float(m[3]), int(m[4])) for m in
                 re.finditer(r"class +(\d+) \(step (\d+)\): ([\d.]+) +\((\d+) images\)", proc.stdout)}
    assert set(per_class) == {c for c, n in holding.items() if n}
    assert all(step == max(0, c - 15) and count == min(4, holding[c]) for c, (step, _, count) in per_class.items())
    within = sum(shift <= 0.1 for _, shift, _ in per_class.values())
    assert f"classes within 0.1 running standard deviations: {within} of {len(per_class)}" in proc.stdout
    assert "training images of step 0" in proc.stdout and "training images of step 1" in proc.stdout
    rows = [l.split("|") for l in proc.stdout.splitlines() if l.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [2, 4, 2, 4]
    gaps = [float(x) for r in rows for x in r[1:]]
    assert len(gaps) == 20 and all(g > 0 for g in gaps)
    assert proc.stdout.count("first norm layer: channel means") == 2
    # under each table, per block the largest eval-mode input variance over running variance
    ratios = re.findall(r"^eval-mode input variance over running variance, largest channel per block: (.+)$",
                        proc.stdout, flags=re.M)
    assert len(ratios) == 2
    for line in ratios:
        assert line.split()[::2] == [f"body.mod{i}" for i in range(1, 6)] + ["head"], line
        assert all(float(v) > 0 for v in line.split()[1::2])
    # every step's images: the first norm layer's shift, then one mean per block, body.mod1 ... head
    steps = re.findall(r"^step (\d): ([\d.]+) \| (.+)$", proc.stdout, flags=re.M)
    assert [int(s) for s, _, _ in steps] == list(range(6))
    for _, first, blocks in steps:
        names = blocks.split()[::2]
        assert names == [f"body.mod{i}" for i in range(1, 6)] + ["head"], names
        assert all(float(v) >= 0 for v in blocks.split()[1::2]) and float(first) >= 0
    # --method PLOP: its POD term at step 1's first iteration, per layer, over --batches batches of the
    # run's --batch_size (not taken for an abbreviation of --batch_sizes); in eval mode the student's
    # features equal the teacher's, and only its logits (the new class summed into background) differ
    assert "PLOP's POD term at step 1's first iteration" in proc.stdout and "2 batches of 3 images" in proc.stdout
    terms = {m[1]: [float(v) for v in m[2].split("|")] for m in
             re.finditer(r"^(training|eval) +\|(.+)$", proc.stdout, flags=re.M)}
    assert len(terms["training"]) == len(terms["eval"]) == 7  # stages 1-4, head, logits, total
    assert terms["eval"][:5] == [0.0] * 5 and terms["eval"][5] > 0, proc.stdout
    assert all(v > 0 for v in terms["training"]) and terms["training"][6] == pytest.approx(sum(terms["training"][:6]), abs=2e-3)
    assert snapshot(run_dir) == before
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pod_gap.py"), *TINY, "--task", "15-1",
                           "--step", "0"], capture_output=True, text=True, env=env, timeout=600)
    assert_user_error(proc, "--step 0", "--step t with t >= 1")


def test_test_mode_reproduces_training_result(trained):
    logdir, run_dir, _ = trained
    before = [json.loads(l) for l in (run_dir / "results.jsonl").read_text().splitlines()]
    results = logdir / "test.jsonl"
    proc = cli(*TINY, "--task", "15-1", "--overlap", "--method", "FT", "--step", "1", "--name", "ft",
               "--logdir", str(logdir), "--test", "--results_file", str(results))
    assert proc.returncode == 0, proc.stderr
    again = json.loads(results.read_text())
    assert again["miou_all"] == pytest.approx(before[1]["miou_all"], abs=1e-9)
    assert again["class_iou"] == pytest.approx(before[1]["class_iou"], abs=1e-9)


def test_existing_step_is_reused_not_overwritten(trained):
    logdir, run_dir, _ = trained
    before = snapshot(run_dir)
    proc = cli(*TINY, "--task", "15-1", "--overlap", "--method", "FT", "--step", "0", "--name", "ft",
               "--logdir", str(logdir), "--results_file", str(logdir / "reuse.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert "exists, reusing it" in proc.stdout
    after = snapshot(run_dir)
    assert {p: t for p, t in after.items() if p.suffix == ".pth"} == \
           {p: t for p, t in before.items() if p.suffix == ".pth"}


def test_previous_checkpoint_of_other_classes(trained, tmp_path):
    _, run_dir, _ = trained
    proc = cli(*TINY, "--task", "19-1", "--method", "FT", "--step", "1", "--name", "x",
               "--logdir", str(tmp_path), "--step_ckpt", str(run_dir / "step-0.pth"))
    assert_user_error(proc, "step-0.pth", "same classes")
    assert not (tmp_path / "shapes" / "19-1-dj" / "x" / "step-1.pth").exists()


def test_class_order_task_learns_in_its_order(trained, tmp_path):
    """PLOP's order b of 15-1: step 1 learns class 17 on channel 16; the scores and the class table
    are per channel, old = the 16 channels of step 0; 15-1's own step 0 is refused as its teacher."""
    _, natural, _ = trained
    proc = cli(*TINY, "--task", "15-5s_b", "--overlap", "--method", "FT", "--step", "0", "1",
               "--name", "ft", "--logdir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "shapes" / "15-1_b-ov" / "ft"
    last = [json.loads(l) for l in (run_dir / "results.jsonl").read_text().splitlines()][-1]
    iou = np.array(last["class_iou"], dtype=float)
    assert len(iou) == 17
    assert last["miou_old"] == pytest.approx(np.nanmean(iou[:16])) and last["miou_new"] == pytest.approx(iou[16])
    names = __import__("dataset").class_names("shapes")
    assert re.search(rf"^ *16 {re.escape(names[17][:16])}", proc.stdout, re.M)
    assert re.search(rf"^ *1 {re.escape(names[12][:16])}", proc.stdout, re.M)
    ckpt = torch.load(run_dir / "step-1.pth", weights_only=False)
    assert ckpt["task"]["classes"] == [[0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11], [17]]
    proc = cli(*TINY, "--task", "15-1_b", "--overlap", "--method", "FT", "--step", "1", "--name", "x",
               "--logdir", str(tmp_path), "--step_ckpt", str(natural / "step-0.pth"))
    assert_user_error(proc, "step-0.pth", "same classes")


@pytest.mark.parametrize("args,fragments", [
    (["--dataset", "coco", "--data_root", "/x"], ["unknown dataset 'coco'", "shapes"]),
    (["--dataset", "shapes", "--task", "16-4"], ["unknown task '16-4'", "15-1"]),
    (["--dataset", "shapes", "--method", "Magic"], ["unknown method 'Magic'", "MiB"]),
    (["--dataset", "shapes", "--task", "15-1", "--step", "6"], ["step 6 is out of range", "0..5"]),
    (["--dataset", "voc"], ["--data_root is required"]),
    # flags the run would ignore, or that contradict each other
    (["--dataset", "shapes", "--step", "0", "--step_ckpt", "x.pth"], ["--step_ckpt", "step 0 has none"]),
    (["--dataset", "shapes", "--test", "--step", "1", "--step_ckpt", "x.pth"], ["--test trains nothing", "--ckpt"]),
    (["--dataset", "shapes", "--ckpt", "x.pth"], ["--ckpt has no effect while --test is not set"]),
    (["--dataset", "shapes", "--pretrained", "x.pth", "--no_pretrained"], ["contradict"]),
    (["--dataset", "shapes", "--data_root", "/x"], ["reads no --data_root", "make_shapes.py"]),
    (["--dataset", "voc", "--data_root", "/x", "--shapes_image_size", "32"],
     ["--shapes_image_size has no effect while --dataset is voc"]),
    (["--dataset", "shapes", "--amp", "--opt_level", "O0"], ["--opt_level O0", "--amp", "drop one"]),
    (["--dataset", "shapes", "--test", "--overwrite"], ["--overwrite", "--test", "drop one"]),
    (["--dataset", "shapes", "--method", "MiB", "--head", "dkd"], ["MiB trains the deeplab head", "drop --head"]),
    (["--dataset", "shapes", "--method", "DKD", "--head", "deeplab"], ["DKD trains the dkd head", "drop --head"]),
    (["--dataset", "shapes", "--method", "MiB", "--no_masks"], ["--no_masks is read by LSKD, not by --method MiB"]),
])
def test_bad_flags(args, fragments, tmp_path):
    assert_user_error(cli(*args, "--logdir", str(tmp_path)), *fragments)
    assert not any(tmp_path.iterdir())


def test_missing_and_empty_data_root(tmp_path):
    missing = tmp_path / "nope"
    assert_user_error(cli(*MODEL, "--dataset", "voc", "--data_root", str(missing), "--logdir", str(tmp_path / "r")),
                      str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(cli(*MODEL, "--dataset", "voc", "--data_root", str(empty), "--logdir", str(tmp_path / "r")),
                      str(empty))


def test_step_without_previous_checkpoint(tmp_path):
    proc = cli(*TINY, "--task", "15-1", "--step", "2", "--logdir", str(tmp_path))
    assert_user_error(proc, "step-1.pth", "train step 1 first")


def test_test_without_checkpoint(tmp_path):
    proc = cli(*TINY, "--task", "15-1", "--step", "0", "--test", "--logdir", str(tmp_path))
    assert_user_error(proc, "--test needs the checkpoint", "--ckpt")


def make_shapes(root: Path, train: int, val: int) -> None:
    subprocess.run([sys.executable, str(ROOT / "data" / "make_shapes.py"), "--root", str(root), "--train", str(train),
                    "--val", str(val), "--size", "48"], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_shapes_written_to_disk_train_through_the_voc_loader(tmp_path):
    root = tmp_path / "voc"
    make_shapes(root, 96, 40)
    proc = cli(*MODEL, "--dataset", "voc", "--data_root", str(root), "--task", "15-1", "--overlap", "--step", "0", "1",
               "--logdir", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "r" / "voc" / "15-1-ov" / "FT" / "results.jsonl").read_text().splitlines()
    assert [json.loads(l)["dataset"] for l in lines] == ["voc", "voc"]
    assert list(root.rglob("*.npy")) or list(root.rglob(".cache/*")), "presence index cached under the data root"


def test_corrupt_image_names_the_file(tmp_path):
    root = tmp_path / "voc"
    make_shapes(root, 24, 8)
    base = root / "VOC2012"
    # a training image that step 0 reads: it shows a class of 1-15
    bad = next(image for image in sorted((base / "JPEGImages").glob("train_*.jpg"))
               if any(0 < c <= 15 for c in np.unique(np.array(Image.open(base / "SegmentationClassAug"
                                                                        / f"{image.stem}.png")))))
    bad.write_bytes(b"not a jpeg at all")
    proc = cli(*MODEL, "--dataset", "voc", "--data_root", str(root), "--task", "15-1",
               "--overlap", "--step", "0", "--logdir", str(tmp_path / "r"))
    assert_user_error(proc, bad.name)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import run
    from methods import get_method_class

    FineTuning = get_method_class("FT")

    calls = {"n": 0}
    original = FineTuning.loss

    def diverging(self, batch, out, teacher_out):
        terms = original(self, batch, out, teacher_out)
        calls["n"] += 1
        if calls["n"] > 30:  # well into the second epoch
            terms["ce"] = terms["ce"] * float("nan")
        return terms

    monkeypatch.setattr(FineTuning, "loss", diverging)
    args = [*TINY, "--task", "15-1", "--overlap", "--method", "FT", "--step", "0", "--epochs", "3",
            "--logdir", str(tmp_path)]
    assert run.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the loss became nan at epoch 1 iteration" in err[0]
    run_dir = tmp_path / "shapes" / "15-1-ov" / "FT"
    assert not (run_dir / "step-0.pth").exists()
    partial = torch.load(run_dir / "step-0.last.pth", weights_only=False)
    assert partial["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in partial["model"].values() if v.is_floating_point())


def test_interrupted_step_resumes_from_last_epoch(tmp_path, monkeypatch, capsys):
    import run
    from train import Trainer

    args = [*TINY, "--task", "15-1", "--overlap", "--method", "FT", "--step", "0", "--epochs", "3",
            "--logdir", str(tmp_path)]
    original = Trainer.train_epoch

    def interrupted(self, loader, epoch, progress=None):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, loader, epoch, progress)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    assert run.main(args) == 130
    run_dir = tmp_path / "shapes" / "15-1-ov" / "FT"
    partial = torch.load(run_dir / "step-0.last.pth", weights_only=False)
    assert partial["epoch"] == 1 and not (run_dir / "step-0.pth").exists()

    epochs_run = []

    def counting(self, loader, epoch, progress=None):
        epochs_run.append(epoch)
        return original(self, loader, epoch, progress)

    monkeypatch.setattr(Trainer, "train_epoch", counting)
    capsys.readouterr()
    assert run.main(args) == 0
    assert epochs_run == [2]
    assert "resuming from" in capsys.readouterr().out
    assert (run_dir / "step-0.pth").exists() and not (run_dir / "step-0.last.pth").exists()
    assert torch.load(run_dir / "step-0.pth", weights_only=False)["trainer"]["iteration"] == \
        3 * partial["trainer"]["iteration"] // 2


def test_test_step_draws_sample_grid(trained):
    from PIL import Image

    _, run_dir, _ = trained
    grid = Image.open(run_dir / "samples-step1.png")
    assert grid.width > 0 and grid.height > grid.width  # 4 rows of image | ground truth | prediction
