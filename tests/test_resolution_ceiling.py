"""scripts/resolution_ceiling.py: what a logit grid of a given stride can express."""
import torch

from scripts_loader import load_script


def _script():
    return load_script("scripts/resolution_ceiling.py")


def test_cell_aligned_regions_survive_and_sub_cell_detail_is_lost():
    script = _script()
    label = torch.zeros(8, 8, dtype=torch.uint8)
    label[:, 4:] = 1  # an edge on a cell boundary is kept exactly
    assert torch.equal(script.round_trip(label, 3, 4), label.long())
    alone = torch.zeros(8, 8, dtype=torch.uint8)
    alone[:4, 4:] = 2  # a one-cell object on background: bilinear upsampling rounds its inner corner off
    out = script.round_trip(alone, 3, 4)
    assert out[0, 7] == 2 and out[3, 4] == 0 and out[2, 5] == 2
    label[6, 1] = 2  # one pixel of a 16-pixel cell: the cell says background
    assert script.round_trip(label, 3, 4)[6, 1] == 0


def test_ignored_pixels_vote_for_no_class():
    script = _script()
    label = torch.zeros(4, 4, dtype=torch.uint8)
    label[:, 2:] = 1
    label[:, 1:3] = 255  # a boundary band, as the sets draw it
    out = script.round_trip(label, 2, 4)  # one cell: 4 background, 4 class-1 pixels, 8 ignored
    assert out.shape == (4, 4) and set(out.unique().tolist()) <= {0, 1}


def test_ceiling_of_a_tiny_synthetic_step():
    script = _script()
    from argparser import parse_args
    from dataset.tasks import Task

    opts = parse_args(["--dataset", "shapes", "--task", "15-1", "--overlap", "--shapes_val_size", "40",
                       "--shapes_train_size", "40", "--crop_size", "64", "--output_stride", "8", "--num_workers", "0"])
    fine = script.ceiling(opts, Task("shapes", "15-1", 0))["miou"]
    opts.output_stride = 32
    coarse = script.ceiling(opts, Task("shapes", "15-1", 0))["miou"]
    assert 0.7 < fine < 1.0 and coarse < fine - 0.2  # a 2x2 grid loses most of each object
