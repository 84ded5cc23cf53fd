"""metrics/ranking.py, the leaderboard's tables: the rank correlation, the seed summary over a
shared step-0 run, the one-seed-per-method spread, and pooling tables."""
from __future__ import annotations

import pytest

from metrics import ranking


def test_spearman_by_hand():
    assert ranking.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert ranking.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4) -> 4.5 / sqrt(4.5 * 5)
    assert ranking.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)


def _row(name, step, all_, old=0.5, new=0.1, hiou=0.2):
    return {"dataset": "shapes", "task": "15-1", "overlap": True, "name": name, "step": step,
            "miou_all": all_, "miou_old": old, "miou_new": new, "hiou": hiou}


def test_summary_over_seeds_uses_the_shared_step0():
    rows = [_row("FT", 0, 0.80, old=0.80, new=None, hiou=None),
            _row("MiB-seed42", 1, 0.60), _row("MiB-seed42", 2, 0.40, old=0.30),
            _row("MiB-seed1", 1, 0.50), _row("MiB-seed1", 2, 0.20, old=0.50)]
    (row,) = ranking.summarise(rows, {"MiB": [42, 1]}, {"MiB": "FT"})
    assert row["seeds"] == 2
    assert row["miou_old"] == pytest.approx(40.0) and row["miou_old_sd"] == pytest.approx(14.1421356)
    assert row["miou_all"] == pytest.approx(30.0)
    # avg: mean over steps 0-2 of each seed (step 0 from FT's run), then over seeds
    assert row["avg"] == pytest.approx(100 * ((0.8 + 0.6 + 0.4) / 3 + (0.8 + 0.5 + 0.2) / 3) / 2)
    assert (row["voc_old"], row["voc_new"], row["voc_all"]) == (35.1, 13.5, 29.7)


def test_ranking_spread_draws_one_seed_per_method():
    """Every combination of one seed per ranked method: FT is always last, and MiB above PLOP
    (the reverse of VOC's order) in one of MiB's x PLOP's four pairs -> rho 0.5 there, 1 elsewhere."""
    mib, plop = ranking.canonical("MiB"), ranking.canonical("PLOP")
    seeds = {"FT": (0.05, 0.06), mib: (0.50, 0.40), plop: (0.45, 0.70)}
    recipes = dict.fromkeys(seeds, "FT")
    rows = [_row("FT", 0, 0.8, new=None, hiou=None)]
    rows += [_row(f"{m}-seed{seed}", 1, value) for m, values in seeds.items() for seed, value in zip((42, 1), values)]
    low, high, mean, share, draws = ranking.ranking_spread(rows, {m: [42, 1] for m in seeds}, recipes)
    assert (low, high, draws) == (pytest.approx(0.5), pytest.approx(1.0), 8)
    assert mean == pytest.approx((0.5 + 3 * 1.0) / 4) and share == pytest.approx(0.75)
    assert "8 draws): 0.50 to 1.00, mean 0.88, at least 0.8 in 75 % of draws" in ranking.markdown(
        ranking.summarise(rows, {m: [42, 1] for m in seeds}, recipes), (low, high, mean, share, draws))
    # one seed each: nothing to draw
    assert ranking.ranking_spread(rows, {m: [42] for m in seeds}, recipes) is None


def test_pooled_table_is_the_mean_and_sd_of_each_tables_means():
    """Two draws: MiB's all-mIoU means 30 and 40 pool to 35 ± 7.07; PLOP, missing from the
    second draw's table, is left out of the pool and named."""
    mib, plop = ranking.canonical("MiB"), ranking.canonical("PLOP")

    def table(all_by_method: dict) -> list[dict]:
        rows = [_row("FT", 0, 0.8, new=None, hiou=None)]
        rows += [_row(f"{m}-seed{seed}", 1, value) for m, values in all_by_method.items()
                 for seed, value in zip((42, 1, 2), values)]
        seeds = {m: [42, 1, 2] for m in all_by_method}
        return ranking.summarise(rows, seeds, dict.fromkeys(all_by_method, "FT"))

    tables = {"draw 0": (table({mib: (0.2, 0.3, 0.4), plop: (0.5, 0.5, 0.5)}), []),
              "draw 1": (table({mib: (0.4, 0.4, 0.4)}), [plop])}
    (row,) = ranking.pool_tables(tables)
    assert row["method"] == mib and row["seeds"] == "2×3"
    assert row["miou_all"] == pytest.approx(35.0) and row["miou_all_sd"] == pytest.approx(50 ** 0.5)
    assert row["voc_all"] == 29.7
    text = ranking.pooled_markdown(tables)
    assert "| method | draws × seeds |" in text and "35.00 ± 7.07" in text
    assert f"{plop}: did not finish on draw 1 (left out)" in text


def _joint_line(seed, class_iou):
    return {"dataset": "shapes", "task": "offline", "overlap": True, "name": f"Joint-seed{seed}", "step": 0,
            "miou_all": None, "miou_old": None, "miou_new": None, "hiou": None, "class_iou": class_iou}


def test_joint_bound_is_scored_with_the_tables_split_of_the_classes():
    """The joint run's IoU is by class id: on 15-1 old = ids 0-15, new = 16-20; an absent class
    (null) is skipped; on PLOP's order b, old and new are that order's classes instead."""
    iou = [0.9] * 16 + [0.6, 0.5, None, 0.3, 0.2]  # 16 old at 0.9; new 0.6, 0.5, (absent), 0.3, 0.2 -> 0.4
    (row,) = ranking.summarise([_joint_line(42, iou), _joint_line(1, [0.7] * 16 + [0.4] * 5)],
                               {ranking.JOINT: [42, 1]}, {}, task="15-1")
    assert row["seeds"] == 2
    assert row["miou_old"] == pytest.approx(80.0) and row["miou_old_sd"] == pytest.approx(0.2 / 2 ** 0.5 * 100)
    assert row["miou_new"] == pytest.approx(40.0)
    # all: seed 42's 20 present classes (16 x 0.9 + 1.6) / 20 = 0.8, seed 1's (16 x 0.7 + 2.0) / 21
    assert row["miou_all"] == pytest.approx(100 * (0.8 + 13.2 / 21) / 2)
    assert row["hiou"] == pytest.approx(100 * (2 * 0.9 * 0.4 / 1.3 + 2 * 0.7 * 0.4 / 1.1) / 2)
    assert row["avg"] is None
    assert (row["voc_old"], row["voc_new"], row["voc_all"]) == (79.1, 72.6, 77.4)
    # order b learns 17, 3, 6, 18 and 10 after step 0: those are its new classes
    ordered = [0.2 if c in (17, 3, 6, 18, 10) else 0.8 for c in range(21)]
    (row,) = ranking.summarise([_joint_line(42, ordered)], {ranking.JOINT: [42]}, {}, task="15-1_b")
    assert (row["miou_old"], row["miou_new"]) == (pytest.approx(80.0), pytest.approx(20.0))
    # a reference row: in the table, never in the correlation
    mib = ranking.canonical("MiB")
    rows = [_row("FT", 0, 0.8, new=None, hiou=None), _row("FT-seed42", 1, 0.05), _row(f"{mib}-seed42", 1, 0.3),
            _joint_line(42, iou)]
    table = ranking.summarise(rows, {"FT": [42], mib: [42], ranking.JOINT: [42]}, {"FT": "FT", mib: "FT"})
    assert ranking.ranking_correlation(table)[1] == ["FT", mib]
    assert "| Joint | 1 | 90.00 | 40.00 | 80.00 |" in ranking.markdown(table)
