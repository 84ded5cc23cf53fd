"""Text tables of evaluation results and the confusion-matrix figure."""
from __future__ import annotations

import math
from typing import Sequence


def _pct(value: float) -> str:
    return "   -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:6.2f}"


def class_table(class_iou: Sequence[float], names: Sequence[str] | None = None) -> str:
    rows = ["class                 IoU"]
    for c, iou in enumerate(class_iou):
        name = names[c] if names and c < len(names) else str(c)
        rows.append(f"{c:3d} {name[:16]:<16} {_pct(iou)}")
    return "\n".join(rows)


def summary_header() -> str:
    return "step |   all  |   old  |   new  |  hIoU  | seconds"


def summary_row(result: dict) -> str:
    return (f"{result['step']:4d} | {_pct(result['miou_all'])} | {_pct(result['miou_old'])} | "
            f"{_pct(result['miou_new'])} | {_pct(result['hiou'])} | {result['seconds']:7.1f}")


def confusion_figure(matrix, names: Sequence[str] | None = None):
    """Row-normalised confusion matrix as a matplotlib figure (for tensorboard)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = matrix.double().cpu()
    m = m / m.sum(1, keepdim=True).clamp_min(1)
    n = m.shape[0]
    fig, ax = plt.subplots(figsize=(max(4, n * 0.3), max(4, n * 0.3)))
    ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if names and n <= 40:
        ax.set_xticks(range(n), [names[i] for i in range(n)], rotation=90, fontsize=6)
        ax.set_yticks(range(n), [names[i] for i in range(n)], fontsize=6)
    fig.tight_layout()
    return fig
