"""The shapes set's ImageNet: scripts/pretrain_shapes.py is deterministic, writes the file step 0
loads by default, and that file is the one shipped in pretrained/."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from argparser import parse_args
from segmentation_module import PretrainedWeightsError, check_pretrained, make_model, read_pretrained

from scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
# the demo's and the leaderboard's shared settings: generator 3 (the default), the small network, pool-pretrained
DEMO = (ROOT / "scripts" / "demo_flags.txt").read_text().split()


def _script():
    return load_script("scripts/pretrain_shapes.py")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pretraining_is_deterministic_and_learns():
    script = _script()
    kwargs = dict(width=0.125, images=96, epochs=2, batch_size=16, lr=0.05, val_images=16, log=lambda _: None)
    first, meta = script.pretrain(**kwargs)
    second, _ = script.pretrain(**kwargs)
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
    # a per-pixel classifier over background and every pool category, dropped by the loader
    assert first["state_dict"]["classifier.fc.weight"].shape[0] == meta["categories"] + 1
    assert meta["categories"] >= 50 and meta["output_stride"] == 8
    # the body moved away from its initialisation
    torch.manual_seed(0)
    fresh = script.PoolSegmenter(script.build_backbone("resnet18", script.make_norm_act("abn"), 8, 0.125),
                                 meta["categories"] + 1)
    assert not torch.equal(fresh.body.state_dict()["mod1.conv1.weight"], first["state_dict"]["mod1.conv1.weight"])


def test_the_demos_step0_loads_the_shipped_pool_weights():
    opts = parse_args(["--dataset", "shapes", "--task", "15-1", *DEMO])
    assert not opts.no_pretrained and opts.shapes_version == 3
    path = check_pretrained(opts)
    assert path.parent == ROOT / "pretrained" and path.is_file()
    expected = read_pretrained(path)  # the body's keys, classifier dropped
    body = make_model(opts, [16]).body.state_dict()
    assert set(expected) <= set(body) and len(expected) >= len(body) - 1
    for key, value in expected.items():
        assert torch.equal(body[key], value), key


def test_missing_pool_weights_name_the_script():
    opts = parse_args(["--dataset", "shapes", "--backbone", "resnet34", "--width", "0.5", "--norm_act", "abn"])
    with pytest.raises(PretrainedWeightsError, match="scripts/pretrain_shapes.py --backbone resnet34 --width 0.5"):
        make_model(opts, [16])


def test_written_bytes_do_not_depend_on_the_file_name(tmp_path, capsys):
    """The sha256 the script prints is the file's, and a rerun to another path prints the same one,
    so a user can check the shipped file without overwriting it (torch.save to a path would name
    the archive after the file)."""
    script = _script()
    args = ["--images", "16", "--epochs", "1", "--width", "0.125", "--threads", str(torch.get_num_threads())]
    first, second = tmp_path / "a.pth.tar", tmp_path / "sub" / "other-name.tar"
    assert script.main([*args, "--out", str(first)]) == 0
    assert script.main([*args, "--out", str(second)]) == 0
    digests = re.findall(r"sha256 ([0-9a-f]{64})", capsys.readouterr().out)
    assert digests == [_sha256(first)] * 2 and first.read_bytes() == second.read_bytes()
    ckpt = torch.load(first, map_location="cpu", weights_only=True)  # plain tensors and values only
    assert ckpt["meta"]["epochs"] == 1 and ckpt["meta"]["torch"] == str(torch.__version__)


def test_the_shipped_file_is_the_one_pretrained_readme_names():
    shipped = ROOT / "pretrained" / "shapes_resnet18_w0.25_abn.pth.tar"
    named = re.findall(r"`([0-9a-f]{64})`", (ROOT / "pretrained" / "README.md").read_text())
    assert named == [_sha256(shipped)]
    meta = torch.load(shipped, map_location="cpu", weights_only=True)["meta"]
    assert (meta["epochs"], meta["threads"], meta["torch"]) == (32, 2, "2.13.0+cpu")


def test_damaged_pool_weights_fail_with_one_line(tmp_path):
    shipped = torch.load(ROOT / "pretrained" / "shapes_resnet18_w0.25_abn.pth.tar", map_location="cpu",
                         weights_only=True)
    damaged = tmp_path / "damaged.pth.tar"
    shipped["state_dict"]["mod1.conv1.weight"].view(-1)[0] += 1.0  # one weight off, digest kept
    torch.save(shipped, damaged)
    with pytest.raises(PretrainedWeightsError, match=r"damaged .*digest.*--no_pretrained") as info:
        read_pretrained(damaged)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet101"])
def test_zero_init_residual_starts_every_block_as_its_shortcut(backbone):
    """--zero_init_residual: every residual branch's last norm starts at scale 0, so a block adds
    nothing to its shortcut until training moves that scale, in either mode."""
    script = _script()
    body = script.build_backbone(backbone, script.make_norm_act("abn"), 8, 0.125)
    script.zero_residual_scales(body)
    blocks = [m for m in body.modules() if isinstance(m, script.ResidualBlock)]
    assert len(blocks) == (8 if backbone == "resnet18" else 33)
    x = torch.randn(2, blocks[-1].convs.conv1.in_channels, 6, 6)
    for train in (True, False):
        assert torch.equal(blocks[-1].train(train).residual_sum(x), x)  # the last block has no projection
    for block in blocks:
        assert not list(block.convs.children())[-1].weight.any()


def test_zero_init_residual_is_recorded_only_when_set():
    """The flag joins the file's metadata only when set, so the shipped file's recipe (and bytes)
    stand; the run differs from the default one."""
    script = _script()
    kwargs = dict(width=0.125, images=32, epochs=1, batch_size=16, val_images=8, log=lambda _: None)
    plain, meta = script.pretrain(**kwargs)
    zeroed, zeroed_meta = script.pretrain(zero_init_residual=True, **kwargs)
    assert "zero_init_residual" not in meta and zeroed_meta["zero_init_residual"] is True
    assert not torch.equal(plain["state_dict"]["mod2.block1.convs.bn2.weight"],
                           zeroed["state_dict"]["mod2.block1.convs.bn2.weight"])


def test_the_shipped_body_evaluates_as_it_trains():
    """ImageNet weights are used in eval mode at their published accuracy; the shipped body's
    running statistics likewise describe its eval-mode maps on pool scenes it never trained on
    (eval_drift about 1; a ResNet-101 x0.25 under the same recipe without --zero_init_residual:
    in the thousands, docs/ablations.md *Depth*)."""
    script = _script()
    state = torch.load(ROOT / "pretrained" / "shapes_resnet18_w0.25_abn.pth.tar", map_location="cpu",
                       weights_only=True)["state_dict"]
    body = script.build_backbone("resnet18", script.make_norm_act("abn"), 8, 0.25)
    body.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier")})
    model = script.PoolSegmenter(body, 2)
    images, _ = script.make_scenes(1, script.EVAL_DRIFT_IMAGES, 64)
    assert 1.0 < script.eval_drift(model, images) < 2.0
