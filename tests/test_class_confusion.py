"""scripts/class_confusion.py: a step's errors on chosen classes, future classes labelled by their id."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("scripts/class_confusion.py")


def test_report_of_a_crafted_matrix():
    script = _script()
    from dataset.tasks import Task

    task = Task("shapes", "15-1", 4)  # seen 0-19, future 20
    mat = torch.zeros(21, 21, dtype=torch.int64)
    mat[7, 7], mat[7, 0], mat[7, 17] = 60, 30, 10     # class 7: 100 pixels, 60 right
    mat[0, 7], mat[20, 7], mat[8, 7] = 20, 15, 5      # 40 false positives: background, future 20, class 8
    names = [f"c{k}" for k in range(21)]
    lines = script.report(mat, [7], names, task)
    assert lines == ["  class 7 c7: IoU 42.9 %",  # 60 / (100 + 100 - 60)
                     "    its 100 pixels are predicted as: 60.0 % (60) 7 c7, 30.0 % (30) 0 c0, 10.0 % (10) 17 c17",
                     "    the 100 pixels predicted as it are: 60.0 % (60) 7 c7, 20.0 % (20) 0 c0, "
                     "15.0 % (15) 20 c20 (future), 5.0 % (5) 8 c8"]
    # the same matrix as the sum of two models: shares unchanged, counts per model
    halves = script.report(mat, [7], names, task, models=2)
    assert halves[0] == lines[0]
    assert halves[2] == ("    the 50 pixels predicted as it are: 60.0 % (30) 7 c7, 20.0 % (10) 0 c0, "
                         "15.0 % (7.5) 20 c20 (future), 5.0 % (2.5) 8 c8")
    # a future class: one line, where its pixels go (it cannot be predicted yet)
    assert script.report(mat, [20], names, task) == [
        "  class 20 c20 (future): its 15 pixels are predicted as: 100.0 % (15) 7 c7"]


def test_grouped_shares_of_a_crafted_matrix():
    """15-1 step 2: base 1-15, added 16 (step 1) and 17 (step 2), future 18-20."""
    script = _script()
    from dataset.tasks import Task

    task = Task("shapes", "15-1", 2)
    mat = torch.zeros(21, 21, dtype=torch.int64)
    mat[3, 3], mat[3, 5], mat[3, 0], mat[3, 17] = 50, 10, 20, 20   # base class 3: 100 pixels
    mat[16, 16], mat[16, 3], mat[16, 17], mat[16, 19] = 40, 20, 30, 10  # added class 16: 100 pixels
    mat[19, 16] = 99                                                  # a future class: not counted
    line = script.by_group(mat, [3, 16, 19], task)
    # own 50+40, another base 10+20, background 20, added 20 (3->17) + 30 (16->17), future 10; of 200
    assert line == ("  the 200 pixels of classes 3 16 are predicted as: 45.0 % their own class, "
                    "15.0 % another base class, 10.0 % background, 25.0 % a class added at steps 1-2, "
                    "5.0 % a future class")
    assert script.by_group(mat * 3, [3, 16], task, models=3) == line  # three models: counts per model
    # the other way: what the pixels predicted as 3 and 16 truly are. Column 3: 50 own, 20 from
    # class 16 (added); column 16: 40 own, 99 from future 19; 209 in all
    assert script.by_group(mat, [3, 16, 19], task, predicted=True) == (
        "  the 209 pixels predicted as classes 3 16 truly are: 43.1 % their own class, "
        "0.0 % another base class, 0.0 % background, 9.6 % a class added at steps 1-2, "
        "47.4 % a future class")
    mat[0, 3] = 41                                                    # background predicted as 3
    assert script.by_group(mat, [3], task, predicted=True) == (
        "  the 111 pixels predicted as classes 3 truly are: 45.0 % their own class, "
        "0.0 % another base class, 36.9 % background, 18.0 % a class added at steps 1-2, "
        "0.0 % a future class")


def test_grouped_shares_name_the_added_steps():
    """Step 0 has no added group (no "steps 1-0"); step 1's is one step."""
    script = _script()
    from dataset.tasks import Task

    mat = torch.zeros(21, 21, dtype=torch.int64)
    mat[3, 3], mat[3, 0], mat[3, 16] = 60, 30, 10
    assert script.by_group(mat, [3], Task("shapes", "15-1", 0)) == (
        "  the 100 pixels of classes 3 are predicted as: 60.0 % their own class, "
        "0.0 % another base class, 30.0 % background, 10.0 % a future class")
    assert script.by_group(mat, [3], Task("shapes", "15-1", 1)) == (
        "  the 100 pixels of classes 3 are predicted as: 60.0 % their own class, "
        "0.0 % another base class, 30.0 % background, 10.0 % a class added at step 1, "
        "0.0 % a future class")


class AlwaysOne(nn.Module):
    def __init__(self, n_seen: int):
        super().__init__()
        self.n_seen = n_seen

    def forward(self, images):
        logits = torch.zeros(len(images), self.n_seen, *images.shape[-2:])
        logits[:, 1] = 1.0
        return {"logits": logits}


def test_future_classes_keep_their_ids():
    """A model that predicts class 1 everywhere: column 1 holds every labelled pixel of the step's
    test images by its true class, future ones (17-20 at step 1) included, counted here from the files."""
    script = _script()
    from argparser import parse_args
    from dataset import build_datasets
    from dataset.tasks import Task
    from utils.distributed import DistInfo

    opts = parse_args(["--dataset", "shapes", "--method", "FT", "--task", "15-1", "--overlap", "--shapes_train_size",
                       "40", "--shapes_val_size", "30", "--crop_size", "64", "--num_workers", "0", "--step", "1"])
    task = Task("shapes", "15-1", 1)
    model = AlwaysOne(task.n_seen)
    info = DistInfo(device=torch.device("cpu"))
    mat = script.full_confusion(opts, task, [model], lambda logits: logits.argmax(1), info)
    _, _, test = build_datasets(opts, task)
    labels = np.stack([test.transform(*test.source.load(int(i)))[1] for i in test.indices])
    expected = np.bincount(labels[labels != 255].ravel(), minlength=21)
    assert mat[:, 1].tolist() == expected.tolist()
    assert expected[task.future_classes].sum() > 0  # the check sees future classes
    assert int(mat.sum()) == int(mat[:, 1].sum())
    twice = script.full_confusion(opts, task, [model, model], lambda logits: logits.argmax(1), info)
    assert twice.tolist() == (2 * mat).tolist()  # several models: their matrices summed


def test_bad_inputs_are_one_line_with_exit_code_2(tmp_path):
    base = ["scripts/class_confusion.py", "--dataset", "shapes", "--task", "15-1", "--step", "1"]
    cases = [([*base, "--classes", "21"], "has classes 0-20 only"),
             ([*base, "--classes", "7", "--ckpt", str(tmp_path / "missing.pth")], "does not exist")]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
