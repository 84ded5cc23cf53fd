"""scripts/pseudo_label_quality.py: PLOP's relabelling scored against the full ground truth."""
import numpy as np
import torch
from torch import nn

from scripts_loader import load_script


def _script():
    return load_script("scripts/pseudo_label_quality.py")


def test_outcomes_of_crafted_pixels():
    script = _script()
    n_old = 3  # background, 1, 2 are old; 3 is the new class
    full = torch.tensor([[1, 1, 1, 1, 2, 0, 0, 0, 3, 0]])
    masked = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 3, 255]])
    relabelled = torch.tensor([[1, 2, 0, 255, 2, 0, 1, 255, 3, 255]])
    counts = script.count_outcomes(relabelled, masked, full, n_old)
    # old pixels: 1->1 and 2->2 right, 1->2 wrong, 1->0 background, 1->255 ignored
    assert counts["old"].tolist() == [2, 1, 1, 1]
    # true background: kept, turned into class 1, ignored; the 255-labelled pixel is not counted
    assert counts["background"].tolist() == [1, 1, 1]
    # the same old pixels per true class: class 1 has one of each outcome, class 2 one right
    assert counts["per_class"].tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    rows = script.class_rows(counts["per_class"], ["background", "cat", "dog", "car"])
    assert rows == [("    class   1 cat (4): 25.0 % its class, 25.0 % another old class, 25.0 % background, "
                     "25.0 % ignored"),
                    ("    class   2 dog (1): 100.0 % its class, 0.0 % another old class, 0.0 % background, "
                     "0.0 % ignored")]
    assert script.class_rows(counts["per_class"])[0].startswith("    class   1 (4): 25.0 % its class")  # ADE: no names


class AlwaysBackground(nn.Module):
    def __init__(self, n_old: int):
        super().__init__()
        self.n_old = n_old

    def forward(self, images):
        logits = torch.zeros(len(images), self.n_old, *images.shape[-2:])
        logits[:, 0] = 20.0  # certain: entropy far below PLOP's floor
        return {"logits": logits}


def test_a_teacher_that_sees_only_background_leaves_every_old_pixel_background():
    script = _script()
    from argparser import parse_args
    from dataset import build_datasets
    from dataset.tasks import Task

    opts = parse_args(["--dataset", "shapes", "--method", "PLOP", "--task", "15-1", "--overlap",
                       "--shapes_train_size", "60", "--shapes_val_size", "20", "--crop_size", "64", "--num_workers", "0"])
    task = Task("shapes", "15-1", 1)
    totals = script.quality(opts, task, AlwaysBackground(task.n_old), torch.device("cpu"), batch_size=7)
    train, _, _ = build_datasets(opts, task)
    labels = np.stack([train.source.load(int(i))[1] for i in train.indices])  # 64 px: the centre crop is the image
    old = int(((labels >= 1) & (labels < task.n_old)).sum())
    background = int((labels == 0).sum())
    assert totals["old"].tolist() == [0, 0, old, 0] and old > 0
    per_class = [int(((labels == c)).sum()) for c in range(task.n_old)]
    assert totals["per_class"][:, 2].tolist() == [0, *per_class[1:]]  # every class's pixels stay background
    assert totals["background"].tolist() == [background, 0, 0]


def test_bad_inputs_are_one_line_with_exit_code_2(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cases = [(["scripts/pseudo_label_quality.py", "--dataset", "shapes", "--task", "15-1", "--step", "1",
               "--ckpt", str(tmp_path / "missing.pth")], "does not exist"),
             (["scripts/pseudo_label_quality.py", "--dataset", "shapes", "--task", "15-1", "--step", "0"],
              "pass --step t with t >= 1"),
             (["scripts/resolution_ceiling.py", "--dataset", "voc", "--data_root", str(tmp_path / "none")],
              "data root")]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, *argv], cwd=root, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
