"""scripts/gpu_check.py: its --device cpu mode end to end, the projection's arithmetic, the peak table."""
import json
import math
import tempfile

import pytest

from scripts_loader import load_script



@pytest.fixture(scope="module")
def gpu_check():
    return load_script("scripts/gpu_check.py")


def test_cpu_mode_runs_every_check_and_writes_consistent_figures(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the demo's runs and the pipeline's images
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ddp"] == {**report["ddp"], "backend": "gloo", "ok": True}
    assert report["demo"]["ok"] and report["demo"]["steps"] == 6
    assert report["environment"]["torch"] and report["environment"]["inplace_abn"]

    train = {(r["method"], r["precision"]): r for r in report["train"]}
    assert set(train) == {(m, p) for m in ("FT", "MiB", "PLOP") for p in ("bf16", "fp16")}
    for r in train.values():
        assert math.isclose(r["img_s"], 2 / r["step_s"], rel_tol=1e-9)  # batch 2 on a CPU
        assert math.isclose(r["tflop_s"], r["tflop_per_step"] / r["step_s"], rel_tol=1e-9)
        assert r["peak_mem_gb"] > 0 and r["share_of_bf16_peak"] is None  # no peak known for a CPU
    # The step's FLOPs: student forward (F) and backward (~2F); MiB and PLOP add the teacher's forward.
    ratio = train["MiB", "bf16"]["tflop_per_step"] / train["FT", "bf16"]["tflop_per_step"]
    assert 1.2 < ratio < 1.45

    per_worker = report["pipeline_img_s_per_worker"]
    assert per_worker > 0
    proj = {(r["method"], r["precision"]): r for r in report["projection"]}
    for (method, precision), r in proj.items():
        rate = {m: train[m, precision]["img_s"] for m in ("FT", "MiB", "PLOP")}
        train_min = 30 * (9568 / rate["FT"] + (487 + 299 + 491 + 500 + 548) / rate[method]) / 60
        test_min = 6 * 1449 / report["eval_img_s"][precision] / 60
        assert math.isclose(r["train_min"], train_min, rel_tol=1e-9)
        assert math.isclose(r["total_min"], train_min + test_min, rel_tol=1e-9)
        assert r["workers_to_feed"] == math.ceil(max(rate.values()) / per_worker)
    printed = capsys.readouterr().out
    assert "projected VOC 15-1 overlapped" in printed and "torchrun demo: ok" in printed
    assert not list(tmp_path.glob("gpu_check_*")) and not list(tmp_path.glob("bench_voc_*"))


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA GH200 480GB", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A10", 125), ("NVIDIA A10G", 70), ("NVIDIA L40S", 362),
    ("NVIDIA L4", 121), ("NVIDIA GeForce RTX 4090", 165), ("Tesla V100-SXM2-16GB", None), ("Unknown GPU", None),
])
def test_bf16_peak_by_device_name(gpu_check, name, peak):
    assert gpu_check.bf16_peak_tflops(name) == peak


def test_cuda_without_a_gpu_is_a_one_line_error(gpu_check, capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gpu_check.main(["--device", "cuda", "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cpu" in err[0]
    assert not (tmp_path / "x.json").exists()
