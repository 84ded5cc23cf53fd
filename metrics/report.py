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


# --- results.jsonl: one strict-JSON line per tested step ------------------------------------------
RESULT_KEY = ("dataset", "task", "overlap", "method", "name", "step", "checkpoint")


def strict_json(value):
    """``value`` with every NaN or infinity replaced by None, so ``json.dumps`` writes ``null``
    and strict parsers (JavaScript, Go, databases) read the line."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def record_result(path, result: dict) -> None:
    """Add ``result`` to the JSON-lines file ``path``, replacing the line of the same tested step
    (same run, step and checkpoint) instead of duplicating it; the file is rewritten atomically."""
    import json
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    line = json.dumps(strict_json(result), allow_nan=False)
    key = tuple(result.get(k) for k in RESULT_KEY)

    def other_step(existing: str) -> bool:
        try:
            return tuple(json.loads(existing).get(k) for k in RESULT_KEY) != key
        except (ValueError, AttributeError):  # not ours to judge: keep it as it is
            return True

    kept = [l for l in (path.read_text().splitlines() if path.is_file() else []) if l.strip() and other_step(l)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the results from other users
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(kept + [line]) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- aggregation over runs (python -m metrics.report RESULTS.jsonl ...) ------------------------------
# What every reader of a results line needs (run.py writes these and more).
RESULT_FIELDS = ("dataset", "task", "overlap", "method", "name", "step", "miou_old", "miou_new", "miou_all", "hiou")


def load_results(paths, fields: Sequence[str] = RESULT_FIELDS) -> list[dict]:
    """Every line of run.py's results files; a file that cannot be read, or a line that is not a
    JSON object with ``fields``, is a one-line UserError naming the file and the line."""
    import json

    from utils.errors import UserError

    rows = []
    for path in paths:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else "not text"
            raise UserError(f"cannot read results file {path} ({reason}); give the results.jsonl files run.py "
                            "wrote (<run dir>/results.jsonl or its --results_file)") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            missing = [k for k in fields if k not in row] if isinstance(row, dict) else []
            if not isinstance(row, dict) or missing:
                what = f"lacks {', '.join(missing)}" if missing else "is not a JSON object"
                raise UserError(f"{path} line {number} {what}: not a line of run.py's results; remove it or give "
                                "the results.jsonl files run.py wrote")
            rows.append(row)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """One row per run (dataset, task, protocol, name): the last step's scores plus PLOP's
    *avg*, the mean of the per-step mIoU over all steps of the run (reference §5)."""
    runs: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        key = (r["dataset"], r["task"], "ov" if r["overlap"] else "dj", r["name"])
        runs.setdefault(key, {})[r["step"]] = r  # a later line of the same step wins
    table = []
    for (dataset, task, protocol, name), steps in runs.items():
        last = steps[max(steps)]
        table.append({"dataset": dataset, "task": task, "protocol": protocol, "name": name,
                      "method": last["method"], "steps": len(steps), "last_step": last["step"],
                      "miou_old": last["miou_old"], "miou_new": last["miou_new"], "miou_all": last["miou_all"],
                      "hiou": last["hiou"], "avg": sum(s["miou_all"] for s in steps.values()) / len(steps)})
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| setting | method | run | old | new | all | hIoU | avg |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        setting = f"{r['dataset']} {r['task']} {r['protocol']} (step {r['last_step']})"
        lines.append(f"| {setting} | {r['method']} | {r['name']} | " +
                     " | ".join(_pct(r[k]).strip() for k in ("miou_old", "miou_new", "miou_all", "hiou", "avg")) + " |")
    return "\n".join(lines)


def write_csv(table: list[dict], path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def main(argv=None) -> None:
    from utils.cli import ToolParser

    p = ToolParser(prog="python -m metrics.report",
                   description="Markdown table (and CSV) of old/new/all mIoU, hIoU and avg over runs.")
    p.add_argument("results", nargs="+", help="results.jsonl files")
    p.add_argument("--csv", default=None, help="also write the table as CSV")
    args = p.parse_args(argv)
    table = summarise(load_results(args.results))
    print(markdown(table))
    if args.csv and table:
        write_csv(table, args.csv)


if __name__ == "__main__":
    from utils.cli import script_main

    script_main(main)
