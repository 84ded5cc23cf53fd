"""Figures of continual-learning results: mIoU per step, per-class IoU heatmap, prediction grids.

    python -m metrics.plots runs/voc/15-1-ov/*/results.jsonl --out plots/

Each function saves a PNG and returns the matplotlib figure, so a caller can also send it to
tensorboard (``Logger.figure``).  Figures are built without pyplot (no global state, nothing to
close) and drawn with the Agg backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

WHITE = (255, 255, 255)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Figure:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return fig


def _runs(rows: Sequence[dict]) -> dict[str, dict[int, dict]]:
    """Rows grouped by run, keyed by a label; a later line of the same step wins (as in report.py)."""
    settings = {(r["dataset"], r["task"], bool(r["overlap"])) for r in rows}
    runs: dict[str, dict[int, dict]] = {}
    for r in rows:
        label = r["name"]
        if len(settings) > 1:
            label += f" ({r['dataset']} {r['task']}-{'ov' if r['overlap'] else 'dj'})"
        runs.setdefault(label, {})[r["step"]] = r
    return runs


def _value(v) -> float:
    return float("nan") if v is None else float(v)


def plot_miou_per_step(rows: Sequence[dict], path) -> Figure:
    """Two panels, mIoU of all classes and of the old ones (%) against the step, one line per run."""
    fig = _figure(11, 4)
    axes = fig.subplots(1, 2, sharey=True)
    palette = matplotlib.colormaps["tab20"].colors  # distinct colours for up to 20 runs
    for ax in axes:
        ax.set_prop_cycle(color=palette)
    for label, steps in _runs(rows).items():
        order = sorted(steps)
        for ax, key in zip(axes, ("miou_all", "miou_old")):
            ax.plot(order, [100 * _value(steps[s][key]) for s in order], marker="o", label=label)
    for ax, title in zip(axes, ("all classes", "old classes (background + step 0)")):
        ax.set_title(f"mIoU, {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("mIoU (%)")
    fig.legend(*axes[1].get_legend_handles_labels(), fontsize=8, loc="outside right center")
    return _save(fig, path)


def plot_class_iou_heatmap(rows: Sequence[dict], path, names: Sequence[str] | None = None) -> Figure:
    """Per-class IoU (%) after each run's last step: one row per run, one column per class.

    Classes a run has not seen, or that are absent from its test set, are left blank.
    """
    runs = _runs(rows)
    last = [steps[max(steps)] for steps in runs.values()]
    n_classes = max(len(r["class_iou"]) for r in last)
    table = np.full((len(last), n_classes), np.nan)
    for i, r in enumerate(last):
        table[i, : len(r["class_iou"])] = [100 * _value(v) for v in r["class_iou"]]
    fig = _figure(min(max(6.0, 0.3 * n_classes + 3), 40), 1.5 + 0.35 * len(last))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(table), cmap="viridis", vmin=0, vmax=100, aspect="auto",
                      interpolation="nearest")
    ax.set_yticks(range(len(last)), [f"{label} (step {r['step']})" for label, r in zip(runs, last)], fontsize=8)
    if n_classes <= 60:
        labels = [names[c] if names and c < len(names) else str(c) for c in range(n_classes)]
        ax.set_xticks(range(n_classes), labels, rotation=90, fontsize=7)
    ax.set_xlabel("class")
    fig.colorbar(image, ax=ax, label="IoU (%)")
    return _save(fig, path)


def colorize(mask, palette: Sequence[int]) -> np.ndarray:
    """Label map -> RGB uint8 image with a flat 768-value palette; ignored pixels (255) are white."""
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3).copy()
    colours[255] = WHITE
    return colours[np.asarray(mask, dtype=np.int64)]


def _rgb(image) -> np.ndarray:
    """HxWx3 or 3xHxW array/tensor, uint8 or float in [0, 1] -> HxWx3 array imshow accepts."""
    image = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    return image if image.dtype == np.uint8 else np.clip(image, 0, 1)


def prediction_grid(images, labels, predictions, path, palette: Sequence[int]) -> Figure:
    """One row per sample: image | ground truth | prediction, masks coloured with ``palette``
    (e.g. ``dataset.voc.voc_palette()``), 255 shown white.  Images are RGB, HxWx3 or 3xHxW,
    uint8 or float in [0, 1] (undo the input normalisation first)."""
    n = len(images)
    if not n == len(labels) == len(predictions):
        raise ValueError(f"got {n} images, {len(labels)} label maps and {len(predictions)} predictions")
    height, width = np.asarray(labels[0]).shape[:2]
    panel = 3.0
    fig = _figure(3 * panel, n * panel * height / width + 0.4)
    axes = np.asarray(fig.subplots(n, 3, squeeze=False))
    for row, (image, label, pred) in enumerate(zip(images, labels, predictions)):
        for ax, picture in zip(axes[row], (_rgb(image), colorize(label, palette), colorize(pred, palette))):
            ax.imshow(picture, interpolation="nearest")
            ax.set_axis_off()
    for ax, title in zip(axes[0], ("image", "ground truth", "prediction")):
        ax.set_title(title)
    return _save(fig, path)


def main(argv=None) -> None:
    from utils.cli import ToolParser

    from metrics.report import RESULT_FIELDS, load_results

    p = ToolParser(prog="python -m metrics.plots",
                   description="mIoU-per-step and per-class IoU figures of results.jsonl files.")
    p.add_argument("results", nargs="+", help="results.jsonl files (run.py writes one per run)")
    p.add_argument("--out", required=True, help="folder for miou_per_step.png and class_iou.png")
    args = p.parse_args(argv)
    rows = load_results(args.results, RESULT_FIELDS + ("class_iou",))
    if not rows:
        p.error("the results files hold no rows")
    out = Path(args.out)
    plot_miou_per_step(rows, out / "miou_per_step.png")
    plot_class_iou_heatmap(rows, out / "class_iou.png", _channel_names({(r["dataset"], r["task"]) for r in rows}))
    print(f"wrote {out / 'miou_per_step.png'} and {out / 'class_iou.png'}")


def _channel_names(tasks: set[tuple[str, str]]) -> Sequence[str] | None:
    """The names of the channels of the one (dataset, task) of the rows; ids where they differ."""
    from dataset import Task, channel_names

    return channel_names(Task(*next(iter(tasks)), 0)) if len(tasks) == 1 else None


if __name__ == "__main__":
    from utils.cli import script_main

    script_main(main)
