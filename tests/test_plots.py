"""Figures of metrics/plots.py on tiny synthetic results: files, panels, sizes, colours."""
import json

import numpy as np
from PIL import Image

from dataset.voc import voc_palette
from metrics.plots import main, plot_class_iou_heatmap, plot_miou_per_step, prediction_grid

# Well-known VOC colours (the devkit's colour map), written out independently of voc_palette.
AEROPLANE, PERSON = (128, 0, 0), (192, 128, 128)


def _rows(name, n_steps, classes_at_step0=16):
    """A 15-1-like run: step s has seen 16 + s classes; class c scores c / 100 (unseen: absent)."""
    rows = []
    for s in range(n_steps):
        n = classes_at_step0 + s
        rows.append({"dataset": "voc", "task": "15-1", "overlap": True, "method": name, "name": name, "step": s,
                     "miou_all": 0.8 - 0.1 * s, "miou_old": 0.8 - 0.15 * s, "miou_new": None if s == 0 else 0.1,
                     "hiou": None, "class_iou": [c / 100 for c in range(n - 1)] + [None]})
    return rows


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _pixel_size(fig):
    w, h = fig.get_size_inches() * fig.dpi
    return round(h), round(w)


def test_miou_per_step_has_two_panels_and_one_line_per_run(tmp_path):
    rows = _rows("FT", 3) + _rows("MiB", 4)
    fig = plot_miou_per_step(rows, tmp_path / "m.png")
    assert _png(tmp_path / "m.png").shape[:2] == _pixel_size(fig)
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 2
    for ax, key in zip(panels, ("miou_all", "miou_old")):
        assert len(ax.lines) == 2
        ft, mib = ax.lines
        assert list(mib.get_xdata()) == [0, 1, 2, 3]
        expected = [100 * (0.8 - 0.1 * s) if key == "miou_all" else 100 * (0.8 - 0.15 * s) for s in range(4)]
        assert np.allclose(mib.get_ydata(), expected)


def test_heatmap_is_runs_by_classes_of_the_last_step(tmp_path):
    rows = _rows("FT", 2) + _rows("MiB", 3)
    fig = plot_class_iou_heatmap(rows, tmp_path / "h.png")
    assert _png(tmp_path / "h.png").shape[:2] == _pixel_size(fig)
    (image,) = [im for ax in fig.axes for im in ax.images]
    data = image.get_array()
    assert data.shape == (2, 18)  # MiB's last step (2) has seen 18 classes; FT's (1) 17
    assert np.allclose(data[1, :17], np.arange(17))  # IoU c / 100 shown in %
    assert data.mask[1, 17] and data.mask[0, 16] and data.mask[0, 17]  # absent class and unseen class blank
    assert np.allclose(data[0, :16], np.arange(16))


def test_prediction_grid_rows_and_palette_colours(tmp_path):
    h, w = 40, 60
    image = np.zeros((h, w, 3), np.uint8)
    image[...] = (10, 200, 30)
    label = np.full((h, w), 15)
    label[:, w // 2:] = 255
    pred = np.ones((h, w), int)
    fig = prediction_grid([image, image / 255.0, image], [label] * 3, [pred] * 3, tmp_path / "g.png", voc_palette())
    png = _png(tmp_path / "g.png")
    assert png.shape[:2] == _pixel_size(fig)
    assert len([ax for ax in fig.axes if ax.images]) == 9

    def colour(ax, fx, fy):
        """PNG colour at fraction (fx, fy) of an axes box, fy from the top."""
        box = ax.get_window_extent()
        x = int(box.x0 + fx * box.width)
        y = png.shape[0] - int(box.y0 + (1 - fy) * box.height)
        return tuple(int(v) for v in png[y, x])

    for row in range(3):
        img_ax, gt_ax, pred_ax = fig.axes[3 * row: 3 * row + 3]
        assert colour(img_ax, 0.5, 0.5) == (10, 200, 30)
        assert colour(gt_ax, 0.25, 0.5) == PERSON
        assert colour(gt_ax, 0.75, 0.5) == (255, 255, 255)
        assert colour(pred_ax, 0.5, 0.5) == AEROPLANE
        for ax in (img_ax, gt_ax, pred_ax):  # panels keep the 60x40 aspect of the inputs
            box = ax.get_window_extent()
            assert abs(box.width / box.height - w / h) < 0.05


def test_cli_writes_both_figures(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows("PLOP", 2)))
    main([str(path), "--out", str(tmp_path / "out")])
    for name in ("miou_per_step.png", "class_iou.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert "miou_per_step.png" in capsys.readouterr().out
