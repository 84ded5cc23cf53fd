"""The leaderboard's tables (``scripts/leaderboard.py``): every row's last-step scores over its
seeds, VOC's published 15-1 figures beside them, and Spearman's rank correlation between the two.

A row's runs are named ``<row>-seed<seed>`` and start from a step-0 run of their own (its name: the
row's *recipe*); their results are run.py's JSON lines (``metrics.report.load_results``).
"""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, replace
from typing import Optional

import methods
from dataset.tasks import Task, layout
from metrics.confusion import incremental_scores


def canonical(name: str) -> str:
    """The registry's spelling of a method (``LwF`` is registered as ``LWF``): every table below
    is looked up under it."""
    return methods.get_method_class(name).name


# Compared with VOC over all seeds (issue 15's nine); the leaderboard runs the others' first seed.
RANKED = [canonical(m) for m in ("FT", "LwF", "ILT", "MiB", "SDR", "PLOP", "REMINDER", "DKD", "LSKD")]
# The rank correlation with VOC that issue 15 asks of the ranked methods.
RHO_TARGET = 0.8
SCORES = ("miou_old", "miou_new", "miou_all", "hiou", "avg")

# Sources cited by many rows of the tables below.
MIB_TABLE_1 = "MiB, CVPR 2020, Tab. 1"
DKD_README = "DKD, NeurIPS 2022 (all and hIoU of its README; old/new derived from them)"
LSKD_TABLE_1 = "LSKD, TIP 2024, Tab. I"
LSKD_TABLE_2 = "LSKD, TIP 2024, Tab. II"

# Published VOC 15-1 overlapped (old 0-15 / new 16-20 / all, mIoU %), with their source.
PUBLISHED = {
    "FT": (0.2, 1.8, 0.6, MIB_TABLE_1),
    "LwF": (1.0, 3.9, 1.8, MIB_TABLE_1),
    "LwF-MC": (6.4, 8.4, 6.9, MIB_TABLE_1),
    "ILT": (4.9, 7.8, 5.7, MIB_TABLE_1),
    "EWC": (0.3, 4.3, 1.3, MIB_TABLE_1),
    "RW": (0.0, 5.2, 1.3, MIB_TABLE_1),
    "PI": (0.0, 1.8, 0.5, MIB_TABLE_1),
    "MiB": (35.1, 13.5, 29.7, MIB_TABLE_1),
    "SDR": (47.3, 14.7, 39.5, "SDR on MiB, CVPR 2021, as in LSKD, TIP 2024, Tab. I"),
    "PLOP": (65.1, 21.1, 54.6, "PLOP, CVPR 2021, Tab. 1"),
    "REMINDER": (68.3, 27.2, 58.5, "REMINDER, CVPR 2022, Tab. 1"),
    "LSKD": (72.8, 34.5, 63.7, "LSKD, TIP 2024, Tab. I"),
    "DKD": (78.4, 45.4, 70.5, DKD_README),
    "DKD-M": (78.9, 54.0, 73.0, DKD_README),
}
# Published VOC 15-1 disjoint, where a paper gives it (REMINDER's gives overlapped only).
PUBLISHED_DISJOINT = {
    "FT": (0.2, 1.8, 0.6, MIB_TABLE_1),
    "LwF": (0.8, 3.6, 1.5, MIB_TABLE_1),
    "LwF-MC": (4.5, 7.0, 5.2, MIB_TABLE_1),
    "ILT": (3.7, 5.7, 4.2, MIB_TABLE_1),
    "EWC": (0.3, 4.3, 1.3, MIB_TABLE_1),
    "RW": (0.2, 5.4, 1.5, MIB_TABLE_1),
    "PI": (0.0, 1.8, 0.4, MIB_TABLE_1),
    "MiB": (46.2, 12.9, 37.9, MIB_TABLE_1),
    "SDR": (59.4, 14.3, 48.7, "SDR on MiB, CVPR 2021, as in LSKD, TIP 2024, Tab. II"),
    "PLOP": (57.9, 13.7, 46.5, "PLOP, CVPR 2021, as in LSKD, TIP 2024, Tab. II"),
    "LSKD": (67.6, 24.4, 57.4, "LSKD, TIP 2024, Tab. II"),
    "DKD": (76.8, 41.9, 68.5, DKD_README),
    "DKD-M": (77.5, 49.4, 70.8, DKD_README),
}
# Published VOC 15-5 overlapped and disjoint (old 0-15 / new 16-20 / all).  SDR, REMINDER and LSKD
# as LSKD's tables give them (REMINDER's own Tab. 1: 76.11 / 50.74 / 70.07); DKD's derived as above.
PUBLISHED_15_5 = {
    "FT": (2.1, 33.1, 9.8, MIB_TABLE_1),
    "LwF": (58.9, 36.6, 53.3, MIB_TABLE_1),
    "LwF-MC": (58.1, 35.0, 52.3, MIB_TABLE_1),
    "ILT": (66.3, 40.6, 59.9, MIB_TABLE_1),
    "EWC": (24.3, 35.5, 27.1, MIB_TABLE_1),
    "RW": (16.6, 34.9, 21.2, MIB_TABLE_1),
    "PI": (1.6, 33.3, 9.5, MIB_TABLE_1),
    "MiB": (75.5, 49.4, 69.0, MIB_TABLE_1),
    "SDR": (76.3, 50.2, 70.1, "SDR on MiB, CVPR 2021, as in " + LSKD_TABLE_1),
    "PLOP": (75.7, 51.7, 70.1, "PLOP, CVPR 2021, Tab. 1"),
    "REMINDER": (76.1, 50.7, 70.1, "REMINDER, CVPR 2022, as in " + LSKD_TABLE_1),
    "LSKD": (78.6, 54.6, 72.9, LSKD_TABLE_1),
    "DKD": (78.8, 58.6, 73.95, DKD_README),
    "DKD-M": (79.1, 61.1, 74.84, DKD_README),
}
PUBLISHED_15_5_DISJOINT = {
    "FT": (1.1, 33.6, 9.2, MIB_TABLE_1),
    "LwF": (58.4, 37.4, 53.1, MIB_TABLE_1),
    "LwF-MC": (67.2, 41.2, 60.7, MIB_TABLE_1),
    "ILT": (63.2, 39.5, 57.3, MIB_TABLE_1),
    "EWC": (26.7, 37.7, 29.4, MIB_TABLE_1),
    "RW": (17.9, 36.9, 22.7, MIB_TABLE_1),
    "PI": (1.3, 34.1, 9.5, MIB_TABLE_1),
    "MiB": (71.8, 43.3, 64.7, MIB_TABLE_1),
    "SDR": (74.6, 44.1, 67.3, "SDR on MiB, CVPR 2021, as in " + LSKD_TABLE_2),
    "PLOP": (71.0, 42.8, 64.3, "PLOP, CVPR 2021, as in " + LSKD_TABLE_2),
    "LSKD": (76.2, 49.8, 69.9, LSKD_TABLE_2),
    "DKD": (77.6, 55.0, 72.21, DKD_README),
    "DKD-M": (77.7, 55.9, 72.53, DKD_README),
}
# The joint-training bound: one network trained on every class at once with step 0's schedule
# (``--task offline``), scored with each table's split of the classes.  A reference row beside the
# methods, as in every paper's table, never ranked.  MiB's Tab. 1 gives VOC's for 15-5 and 15-1,
# both protocols (PLOP's and REMINDER's re-runs: 77.4 / 77.39 all as well).
JOINT = "Joint"
PUBLISHED_JOINT = (79.1, 72.6, 77.4, MIB_TABLE_1)
PUBLISHED, PUBLISHED_DISJOINT, PUBLISHED_15_5, PUBLISHED_15_5_DISJOINT = (
    {canonical(m): row for m, row in rows.items()} | {JOINT: PUBLISHED_JOINT}
    for rows in (PUBLISHED, PUBLISHED_DISJOINT, PUBLISHED_15_5, PUBLISHED_15_5_DISJOINT))


@dataclass(frozen=True)
class Protocol:
    """How an increment's training images are chosen (``mib_plop.md`` §2), on the task layout of
    the table: *overlapped* keeps images that also hold future classes (labelled background
    there), *disjoint* drops them.  VOC ranks the methods differently under the two (MiB keeps
    more old classes disjoint, PLOP fewer), and under 15-5 and 15-1, so each table is compared
    with the published rows of its own layout and protocol (``tables``: layout -> rows)."""

    overlap: bool
    tables: dict
    layout: str = "15-1"

    @property
    def name(self) -> str:
        return "overlapped" if self.overlap else "disjoint"

    @property
    def flags(self) -> list[str]:
        return ["--overlap"] if self.overlap else []

    @property
    def published(self) -> dict:
        return self.tables[self.layout]

    @property
    def voc(self) -> str:
        """The published setting, as the tables name it: "VOC", "VOC 15-5 disjoint", ..."""
        return " ".join(["VOC"] + ([self.layout] if self.layout != "15-1" else []) + ([] if self.overlap else [self.name]))

    def on(self, layout: str) -> "Protocol":
        """This protocol on another task layout (one with published rows)."""
        if layout not in self.tables:
            raise ValueError(f"no published VOC {layout} rows; the leaderboard runs {' or '.join(self.tables)}")
        return replace(self, layout=layout)


OVERLAPPED = Protocol(True, {"15-1": PUBLISHED, "15-5": PUBLISHED_15_5})
DISJOINT = Protocol(False, {"15-1": PUBLISHED_DISJOINT, "15-5": PUBLISHED_15_5_DISJOINT})
JOINT_RUNS = Protocol(True, {}, "offline")  # where the joint bound's runs are (scripts/leaderboard.py)


def seed_name(row: str, seed: int) -> str:
    """The run of one seed of a table row."""
    return f"{row}-seed{seed}"


def _last_by_step(rows: list[dict], name: str, protocol: Protocol) -> dict[int, dict]:
    """A run's result line per step, on the protocol's task layout (a later line of a step wins)."""
    return {r["step"]: r for r in rows if r["name"] == name and r["dataset"] == "shapes"
            and layout(r["task"]) == protocol.layout and r["overlap"] == protocol.overlap}


def seed_scores(rows: list[dict], row: str, seed: int, recipe: str,
                protocol: Protocol = OVERLAPPED) -> dict | None:
    """The last step's scores of one seed of a row, and *avg*: the mean of the per-step mIoU,
    step 0's taken from the row's step-0 run, ``recipe``."""
    steps = _last_by_step(rows, seed_name(row, seed), protocol)
    step0 = _last_by_step(rows, recipe, protocol).get(0)
    if not steps or step0 is None:
        return None
    steps[0] = step0
    last = steps[max(steps)]
    out = {k: last[k] for k in SCORES if k != "avg"}
    out["avg"] = statistics.mean(s["miou_all"] for s in steps.values())
    return out


def class_split(task: str) -> tuple[list[int], list[int]]:
    """A task's old classes (background and step 0's) and new ones (every later step's), by class id."""
    step0 = Task("shapes", task, 0)
    return step0.base_classes, step0.future_classes


def joint_scores(rows: list[dict], seed: int, split: tuple[list[int], list[int]]) -> dict | None:
    """One seed of the joint bound (its run: ``Joint-seed<seed>``, one step of ``--task offline``,
    whose class IoU is indexed by class id): old / new / all and hIoU under the table's ``split``
    (``class_split``); no *avg*, as the bound has no steps."""
    line = _last_by_step(rows, seed_name(JOINT, seed), JOINT_RUNS).get(0)
    if line is None:
        return None
    iou = [math.nan if v is None else v for v in line["class_iou"]]  # null: a class absent from the test set
    return {**incremental_scores(iou, *split), "avg": None}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation, ties taking their average rank."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return result

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def summarise(rows: list[dict], seeds_of: dict[str, list[int]], recipes: dict[str, str],
              protocol: Protocol = OVERLAPPED, task: str = "15-1") -> list[dict]:
    """One row per method or variant: mean and sd over its seeds of every score, and the
    published row under ``protocol`` (``recipes``: each row's step-0 run).  A ``JOINT`` row
    scores the joint bound with ``task``'s split of the classes."""
    table = []
    for method, seeds in seeds_of.items():
        if method == JOINT:
            split = class_split(task)
            scores = [joint_scores(rows, seed, split) for seed in seeds]
        else:
            scores = [seed_scores(rows, method, seed, recipes[method], protocol) for seed in seeds]
        found = [s for s in scores if s is not None]
        if not found:
            continue
        row = {"method": method, "seeds": len(found)}
        for key in SCORES:
            values = [100 * s[key] for s in found if s[key] is not None]
            row[key] = statistics.mean(values) if values else None
            row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else None
        old, new, all_, source = protocol.published.get(method, (None, None, None, ""))
        row.update(voc_old=old, voc_new=new, voc_all=all_, voc_source=source)
        table.append(row)
    return table


def ranking_correlation(table: list[dict]) -> tuple[float | None, list[str]]:
    """Spearman's rho of the all-class mIoU here and on VOC, over the ranked methods present."""
    rows = [r for r in table if r["method"] in RANKED and r["voc_all"] is not None and r["miou_all"] is not None]
    if len(rows) < 3:
        return None, [r["method"] for r in rows]
    return spearman([r["miou_all"] for r in rows], [r["voc_all"] for r in rows]), [r["method"] for r in rows]


def ranking_spread(rows: list[dict], seeds_of: dict[str, list[int]], recipes: dict[str, str],
                   protocol: Protocol = OVERLAPPED, limit: int = 200_000) -> tuple[float, float, float, float, int] | None:
    """How much of the table's rho is seed noise: rho with VOC when every ranked method contributes
    one of its seeds' all-class mIoU instead of their mean, over every such combination.  Returns
    (lowest, highest, mean, share of draws >= RHO_TARGET, draws); None with fewer than three
    ranked methods, a single seed each, or more than ``limit`` combinations."""
    per_method = {}
    for method, seeds in seeds_of.items():
        if method not in RANKED or method not in protocol.published:
            continue
        found = (seed_scores(rows, method, seed, recipes[method], protocol) for seed in seeds)
        values = [s["miou_all"] for s in found if s is not None and s["miou_all"] is not None]
        if values:
            per_method[method] = values
    draws = math.prod(len(v) for v in per_method.values())
    if len(per_method) < 3 or draws == 1 or draws > limit:
        return None
    voc = [protocol.published[m][2] for m in per_method]
    rhos = [spearman(list(draw), voc) for draw in itertools.product(*per_method.values())]
    return min(rhos), max(rhos), statistics.mean(rhos), sum(r >= RHO_TARGET for r in rhos) / draws, draws


def _cell(row: dict, key: str) -> str:
    value, sd = row[key], row[key + "_sd"]
    if value is None:
        return "-"
    return f"{value:.2f} ± {sd:.2f}" if sd is not None else f"{value:.2f}"


def markdown(table: list[dict], spread: Optional[tuple] = None, protocol: Protocol = OVERLAPPED) -> str:
    voc = protocol.voc
    lines = [f"| method | seeds | old | new | all | hIoU | avg | {voc} old / new / all |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        published = f"{r['voc_old']} / {r['voc_new']} / {r['voc_all']}" if r["voc_all"] is not None else "-"
        lines.append(f"| {r['method']} | {r['seeds']} | " + " | ".join(_cell(r, k) for k in SCORES)
                     + f" | {published} |")
    rho, names = ranking_correlation(table)
    if rho is not None:
        lines.append(f"\nSpearman rank correlation of all-class mIoU with {voc} over {len(names)} methods "
                     f"({', '.join(names)}): {rho:.2f}")
    if spread is not None:
        low, high, mean, share, draws = spread
        lines.append(f"With one seed per method instead of the mean ({draws} draws): {low:.2f} to {high:.2f}, "
                     f"mean {mean:.2f}, at least {RHO_TARGET} in {100 * share:.0f} % of draws")
    return "\n".join(lines)


def pool_tables(tables: dict[str, tuple[list[dict], list[str]]]) -> list[dict]:
    """One row per method that finished in every table (draw or class order): the mean and sd over
    tables of its per-table means (the seeds' spread is each table's)."""
    per_table = [{r["method"]: r for r in table} for table, _ in tables.values()]
    pooled = []
    for method in [m for m in per_table[0] if all(m in rows for rows in per_table)]:
        rows = [table[method] for table in per_table]
        row = {"method": method, "seeds": f"{len(rows)}×{rows[0]['seeds']}"}
        for key in SCORES:
            values = [r[key] for r in rows if r[key] is not None]
            row[key] = statistics.mean(values) if values else None
            row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else None
        row.update({k: rows[0][k] for k in ("voc_old", "voc_new", "voc_all", "voc_source")})
        pooled.append(row)
    return pooled


def pooled_markdown(tables: dict[str, tuple[list[dict], list[str]]], noun: str = "draw",
                    protocol: Protocol = OVERLAPPED) -> str:
    """The pooled table (its *seeds* column: tables × seeds), each table's Spearman and the
    methods left out of some table; ``noun`` says what the tables are (draw, order)."""
    text = markdown(pool_tables(tables), protocol=protocol)
    text = text.replace("| method | seeds |", f"| method | {noun}s × seeds |")
    rhos = ", ".join(f"{label} {rho:.2f}" for label, (table, _) in tables.items()
                     for rho in [ranking_correlation(table)[0]] if rho is not None)
    text += f"\nSpearman of each {noun}'s table: {rhos}" if rhos else ""
    for method in dict.fromkeys(m for _, failed in tables.values() for m in failed):
        labels = [label for label, (_, failed) in tables.items() if method in failed]
        text += f"\n{method}: did not finish on {', '.join(labels)} (left out)"
    return text
