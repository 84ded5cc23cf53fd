import json
import math

from metrics.report import load_results, markdown, summarise, write_csv


def _row(name, step, all_, old, new, overlap=True):
    return {"dataset": "shapes", "task": "15-1", "overlap": overlap, "method": name, "name": name, "step": step,
            "miou_all": all_, "miou_old": old, "miou_new": new,
            "hiou": 2 * old * new / (old + new) if new == new and old + new else float("nan")}


def test_summary_takes_last_step_and_averages_steps(tmp_path):
    rows = [_row("a", 0, 0.8, 0.8, float("nan")), _row("a", 1, 0.5, 0.6, 0.2), _row("a", 2, 0.4, 0.5, 0.1),
            _row("b", 0, 0.9, 0.9, float("nan"))]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = {r["name"]: r for r in summarise(load_results([path]))}
    a = table["a"]
    assert a["last_step"] == 2 and a["steps"] == 3
    assert math.isclose(a["miou_old"], 0.5) and math.isclose(a["miou_new"], 0.1)
    assert math.isclose(a["avg"], (0.8 + 0.5 + 0.4) / 3)
    assert math.isclose(a["hiou"], 2 * 0.5 * 0.1 / 0.6)
    text = markdown(list(table.values()))
    assert "| shapes 15-1 ov (step 2) | a | a | 50.00 | 10.00 | 40.00 | 16.67 | 56.67 |" in text
    write_csv(list(table.values()), tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("dataset,task,protocol,name")


def test_rerun_of_a_step_replaces_it():
    rows = [_row("a", 1, 0.1, 0.1, 0.1), _row("a", 1, 0.3, 0.3, 0.3)]
    (r,) = summarise(rows)
    assert math.isclose(r["miou_all"], 0.3) and r["steps"] == 1
