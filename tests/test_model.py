"""The network: ResNet body, DeepLabV3 head, incremental classifiers, ImageNet-weight loading."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models.resnet import ModelConfigError, build_backbone
from modules.deeplab import DeeplabV3
from modules.norm import is_norm_layer, make_norm_act
import segmentation_module
from segmentation_module import (
    PRETRAINED_DIR,
    PretrainedWeightsError,
    check_pretrained,
    default_pretrained_path,
    load_pretrained,
    make_model,
)


def _opts(**kw) -> SimpleNamespace:
    base = dict(backbone="resnet18", output_stride=16, norm_act="iabn_sync", width=0.25, pooling=32,
                pretrained=None, no_pretrained=True)
    base.update(kw)
    return SimpleNamespace(**base)


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def _stage_sizes(n: int, output_stride: int) -> list[int]:
    """Spatial size after mod2..mod5: 7x7/2 conv, 3x3/2 max-pool, then a 3x3/2 conv opening each
    undilated stage after mod2 (mod3, mod4 at OS16; mod3 only at OS8)."""
    n = _conv_out(_conv_out(n, 7, 2, 3), 3, 2, 1)
    sizes = [n]
    for strided in ([True, True, False] if output_stride == 16 else [True, False, False]):
        n = _conv_out(n, 3, 2, 1) if strided else n
        sizes.append(n)
    return sizes


@pytest.mark.parametrize("backbone,channels", [("resnet18", [16, 32, 64, 128]), ("resnet50", [64, 128, 256, 512])])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_dict_shapes(backbone, channels, output_stride):
    model = make_model(_opts(backbone=backbone, output_stride=output_stride), [16, 1, 1])
    out = model(torch.randn(2, 3, 45, 62))
    hs, ws = _stage_sizes(45, output_stride), _stage_sizes(62, output_stride)
    assert hs[-1] == math.ceil(45 / output_stride) and ws[-1] == math.ceil(62 / output_stride)
    assert out["logits"].shape == (2, 18, 45, 62)
    assert out["logits_small"].shape == (2, 18, hs[-1], ws[-1])
    assert out["body"].shape == (2, channels[-1], hs[-1], ws[-1])
    assert out["pre_logits"].shape == (2, 64, hs[-1], ws[-1])  # 256 * width
    assert [tuple(s.shape) for s in out["stages"]] == [(2, c, h, w) for c, h, w in zip(channels, hs, ws)]
    assert model.body.stage_channels == channels


def test_classifiers_per_step_and_concatenated_logits():
    model = make_model(_opts(), [16, 2, 1]).eval()
    assert [c.out_channels for c in model.cls] == [16, 2, 1]
    assert all(c.bias is not None and c.kernel_size == (1, 1) for c in model.cls)
    assert model.num_classes == 19
    x = torch.randn(1, 3, 33, 47)
    out = model(x)
    per_step = torch.cat([c(out["pre_logits"]) for c in model.cls], dim=1)
    torch.testing.assert_close(out["logits_small"], per_step)
    upsampled = F.interpolate(per_step, size=(33, 47), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["logits"], upsampled)


def test_resnet101_key_names_follow_inplace_abn():
    with torch.device("meta"):
        body = build_backbone("resnet101", make_norm_act("iabn_sync"), 16, 1.0)
    sd = body.state_dict()
    shapes = {
        "mod1.conv1.weight": (64, 3, 7, 7),
        "mod1.bn1.running_mean": (64,),
        "mod2.block1.convs.conv1.weight": (64, 64, 1, 1),
        "mod2.block1.proj_bn.weight": (256,),
        "mod3.block1.proj_conv.weight": (512, 256, 1, 1),
        "mod4.block23.convs.conv2.weight": (256, 256, 3, 3),
        "mod5.block3.convs.bn3.running_var": (2048,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "mod4.block24.convs.conv1.weight" not in sd
    assert "mod2.block2.proj_conv.weight" not in sd
    assert body.out_channels == 2048
    blocks = {k.split(".")[1] for k in sd if k.startswith("mod4.")}
    assert len(blocks) == 23


@pytest.mark.parametrize("output_stride,dil", [(16, {"mod4": 1, "mod5": 2}), (8, {"mod4": 2, "mod5": 4})])
def test_strides_and_dilations(output_stride, dil):
    """inplace_abn ``_stride_dilation``: dilated stages keep stride 1; undilated ones start with 2."""
    with torch.device("meta"):
        body = build_backbone("resnet50", make_norm_act("abn"), output_stride, 1.0)
    for mod, d in dil.items():
        first = getattr(body, mod).block1
        assert first.convs.conv2.dilation == (d, d) and first.convs.conv2.padding == (d, d)
        assert first.convs.conv2.stride == ((2, 2) if d == 1 else (1, 1))
        assert first.proj_conv.stride == first.convs.conv2.stride
    assert body.mod3.block1.convs.conv2.stride == (2, 2)
    assert body.mod2.block1.convs.conv2.stride == (1, 1)


def test_unknown_backbone_and_output_stride():
    with pytest.raises(ModelConfigError, match="unknown --backbone 'resnet99'"):
        build_backbone("resnet99", make_norm_act("bn"), 16, 1.0)
    with pytest.raises(ModelConfigError, match="--output_stride 16 or 8"):
        build_backbone("resnet18", make_norm_act("bn"), 4, 1.0)
    # 32, the undilated layout backbones are pretrained in (scripts/pretrain_shapes.py)
    features, _ = build_backbone("resnet18", make_norm_act("bn"), 32, 0.25)(torch.zeros(1, 3, 64, 64))
    assert features.shape[-2:] == (2, 2)


def test_stages_are_taken_before_the_activation():
    body = make_model(_opts(), [3]).body.eval()
    out, stages = body(torch.randn(2, 3, 40, 40))
    assert all((s < 0).any() for s in stages)  # negatives, where pre- and post-activation differ
    torch.testing.assert_close(out, F.leaky_relu(stages[-1], 0.01))
    # the next stage reads the *activated* previous one
    for prev, nxt, mod in zip(stages[:-1], stages[1:], (body.mod3, body.mod4, body.mod5)):
        torch.testing.assert_close(mod(F.leaky_relu(prev, 0.01)), F.leaky_relu(nxt, 0.01))


def test_tiny_model_forward_backward():
    model = make_model(_opts(norm_act="abn"), [11, 5])
    out = model(torch.randn(2, 3, 48, 40))
    loss = F.cross_entropy(out["logits"], torch.randint(0, 16, (2, 48, 40)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.cls[1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("output_stride,dilations", [(16, (6, 12, 18)), (8, (12, 24, 32))])
def test_aspp_dilations(output_stride, dilations):
    head = DeeplabV3(8, 4, 4, make_norm_act("iabn"), output_stride, 32)
    assert head.map_convs[0].kernel_size == (1, 1)
    assert tuple(c.dilation[0] for c in head.map_convs[1:]) == dilations
    assert tuple(c.padding[0] for c in head.map_convs[1:]) == dilations
    assert all(c.bias is None for c in head.modules() if isinstance(c, torch.nn.Conv2d))


def test_aspp_xavier_init_with_leaky_relu_gain():
    head = DeeplabV3(512, 256, 256, make_norm_act("iabn"), 16, 32)
    w = head.global_pooling_conv.weight  # fan_in 512, fan_out 256
    expected = math.sqrt(2 / (1 + 0.01 ** 2)) * math.sqrt(2 / (512 + 256))
    assert abs(w.std().item() / expected - 1) < 0.02
    assert abs(w.mean().item()) < 0.1 * expected


def _reference_aspp(head: DeeplabV3, x: torch.Tensor, pooling: int | None) -> torch.Tensor:
    """MiB/PLOP ``DeeplabV3.forward`` order: pool, replicate-pad, then conv / norm / conv."""
    out = head.red_conv(head.map_bn(torch.cat([m(x) for m in head.map_convs], dim=1)))
    if pooling is None:
        pool = x.mean(dim=(2, 3), keepdim=True)
        pool = head.pool_red_conv(head.global_pooling_bn(head.global_pooling_conv(pool)))
        pool = pool.repeat(1, 1, x.shape[2], x.shape[3])
    else:
        ph, pw = min(pooling, x.shape[2]), min(pooling, x.shape[3])
        padding = ((pw - 1) // 2, (pw - 1) // 2 if pw % 2 == 1 else (pw - 1) // 2 + 1,
                   (ph - 1) // 2, (ph - 1) // 2 if ph % 2 == 1 else (ph - 1) // 2 + 1)
        pool = F.pad(F.avg_pool2d(x, (ph, pw), stride=1), pad=padding, mode="replicate")
        pool = head.pool_red_conv(head.global_pooling_bn(head.global_pooling_conv(pool)))
    return head.red_bn(out + pool)


@pytest.mark.parametrize("pooling", [3, 4, 32])
def test_aspp_eval_pooling_matches_reference_order(pooling):
    torch.manual_seed(0)
    head = DeeplabV3(6, 5, 4, make_norm_act("iabn"), 16, pooling)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in head.modules():
            if is_norm_layer(m):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
    head.eval()
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(head(x), _reference_aspp(head, x, pooling))


def test_aspp_training_uses_global_pooling():
    torch.manual_seed(0)
    head = DeeplabV3(6, 5, 4, make_norm_act("bn"), 16, 3)
    x = torch.randn(3, 6, 5, 7)
    ref_head = copy.deepcopy(head)  # same weights, its own running statistics
    torch.testing.assert_close(head(x), _reference_aspp(ref_head, x, None))


def test_freeze_bn_survives_train():
    model = make_model(_opts(), [3, 1])
    model.freeze_bn()
    model.train()
    norms = [m for m in model.modules() if is_norm_layer(m)]
    assert norms and all(not m.training and not m.weight.requires_grad for m in norms)
    assert model.training and model.cls[0].training and model.cls[0].weight.requires_grad
    assert model.body.mod1.conv1.weight.requires_grad


def test_eval_mode_restores_the_mode_also_on_error_and_keeps_fix_bn():
    from utils.modes import eval_mode

    model = make_model(_opts(), [3, 1])
    model.freeze_bn()
    model.train()
    with eval_mode(model):
        assert not model.training and not model.cls[0].training
    assert model.training and model.cls[0].training
    norms = [m for m in model.modules() if is_norm_layer(m)]
    assert all(not m.training for m in norms)  # still frozen after the restore
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            raise RuntimeError("inside")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


def test_channels_last_gives_the_same_output():
    model = make_model(_opts(), [4]).eval()
    x = torch.randn(2, 3, 37, 41)
    expected = model(x)["logits"]
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out["logits"], expected, rtol=1e-4, atol=1e-4)


# --- ImageNet weights ------------------------------------------------------------------------------
def _fake_imagenet_checkpoint(body: torch.nn.Module) -> tuple[dict, dict]:
    """A file shaped like mapillary's release: 'state_dict', 'module.' keys, an fc classifier, and
    no num_batches_tracked (the release predates it)."""
    g = torch.Generator().manual_seed(1)
    weights = {k: torch.rand(v.shape, generator=g) + 0.5 for k, v in body.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    state = {f"module.{k}": v for k, v in weights.items()}
    state["module.classifier.fc.weight"] = torch.zeros(1000, body.out_channels)
    state["module.classifier.fc.bias"] = torch.zeros(1000)
    return {"state_dict": state, "epoch": 90}, weights


def test_load_pretrained_strips_prefix_and_classifier(tmp_path):
    body = make_model(_opts(), [2]).body
    ckpt, weights = _fake_imagenet_checkpoint(body)
    path = tmp_path / "w.pth.tar"
    torch.save(ckpt, path)
    load_pretrained(body, path)
    loaded = body.state_dict()
    for k, v in weights.items():
        assert torch.equal(loaded[k], v), k

    # a clean file (no prefix, no wrapper) loads too
    torch.save(weights, path)
    load_pretrained(make_model(_opts(), [2]).body, path)


def test_load_pretrained_rejects_weights_of_another_backbone(tmp_path):
    ckpt, _ = _fake_imagenet_checkpoint(make_model(_opts(backbone="resnet34"), [2]).body)
    path = tmp_path / "w.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(PretrainedWeightsError, match="do not fit the body") as err:
        load_pretrained(make_model(_opts(), [2]).body, path)
    assert "\n" not in str(err.value)


def test_make_model_loads_pretrained_body(tmp_path):
    opts = _opts(width=1.0, no_pretrained=True)
    ckpt, weights = _fake_imagenet_checkpoint(make_model(opts, [2]).body)
    path = tmp_path / "resnet18_iabn_sync.pth.tar"
    torch.save(ckpt, path)
    model = make_model(_opts(width=1.0, no_pretrained=False, pretrained=str(path)), [2])
    assert torch.equal(model.body.mod5.block2.convs.bn2.running_var, weights["mod5.block2.convs.bn2.running_var"])


def test_default_pretrained_path():
    opts = _opts(backbone="resnet101", norm_act="iabn_sync", pretrained=None)
    assert default_pretrained_path(opts) == PRETRAINED_DIR / "resnet101_iabn_sync.pth.tar"


def test_missing_pretrained_file_error(tmp_path):
    missing = tmp_path / "resnet18_iabn_sync.pth.tar"
    with pytest.raises(PretrainedWeightsError) as err:
        make_model(_opts(width=1.0, no_pretrained=False, pretrained=str(missing)), [2])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"--pretrained {missing} is not a file") and "--no_pretrained" in message
    assert str(PRETRAINED_DIR / "resnet18_iabn_sync.pth.tar") in message  # the default it would read instead


@pytest.mark.parametrize("backbone,source", [("resnet101", "'ResNet101 iABN sync'"),
                                             ("resnet50", "the resnet50 ImageNet")])
def test_missing_default_imagenet_file_names_where_to_get_it(monkeypatch, tmp_path, backbone, source):
    monkeypatch.setattr(segmentation_module, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(PretrainedWeightsError) as err:
        check_pretrained(_opts(backbone=backbone, width=1.0, no_pretrained=False, pretrained=None))
    message = str(err.value)
    assert message.startswith(f"ImageNet weights {tmp_path / (backbone + '_iabn_sync.pth.tar')} are missing")
    assert source in message and "mapillary/inplace_abn" in message and "--no_pretrained" in message


def test_width_with_imagenet_weights_is_an_error():
    with pytest.raises(PretrainedWeightsError, match="--width 0.25"):
        make_model(_opts(width=0.25, no_pretrained=False, pretrained=None), [2])


def test_explicit_weights_of_the_same_width_load(tmp_path):
    donor = make_model(_opts(width=0.25), [2]).body.state_dict()
    path = tmp_path / "narrow.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.items()}}, path)
    model = make_model(_opts(width=0.25, no_pretrained=False, pretrained=str(path)), [2])
    for key, value in donor.items():
        torch.testing.assert_close(model.body.state_dict()[key], value)
    wide = make_model(_opts(width=0.5), [2]).body.state_dict()
    torch.save({"state_dict": wide}, path)
    with pytest.raises(PretrainedWeightsError, match="do not fit the body"):
        make_model(_opts(width=0.25, no_pretrained=False, pretrained=str(path)), [2])


@pytest.mark.parametrize("head", ["deeplab", "dkd"])
def test_amp_logits_are_fp32_and_match_an_fp32_classifier(head):
    """Under bf16 autocast the body and head run in bf16, the classifiers and the upsampling in
    fp32 (the losses' input), also for a bf16 inference copy whose classifier weights are bf16."""
    from modules.fuse import inference_copy

    torch.manual_seed(0)
    model = make_model(_opts(head=head, norm_act="iabn"), [3, 2]).eval()
    x = torch.randn(2, 3, 48, 48)
    for net in (model, inference_copy(model, torch.bfloat16)):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            out = net(x)
        assert out["pre_logits"].dtype == torch.bfloat16
        assert out["logits_small"].dtype == torch.float32 and out["logits"].dtype == torch.float32
        with torch.no_grad():  # the same classifier on the same bf16 features, in fp32
            expected = net.classifier_forward(net.cls, out["pre_logits"].float())["logits_small"]
        torch.testing.assert_close(out["logits_small"], expected)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_model_on_inplace_abn_package_matches_the_pure_layers(inplace_abn, monkeypatch):
    """The same weights in the compiled in-place layers and in ours.  In fp32 the training forward,
    gradients and running statistics agree; under bf16 / fp16 autocast both stay as close to that
    fp32 result as each other (the package's layers compute in fp32, ours in the autocast type
    with fp32 accumulation); the folded inference copies agree too."""
    from train import Precision

    torch.manual_seed(0)
    package = make_model(_opts(norm_act="iabn"), [16, 1])
    assert sum(isinstance(m, inplace_abn.InPlaceABN) for m in package.modules()) > 10
    monkeypatch.setenv("CSSBENCH_INPLACE_ABN", "0")
    pure = make_model(_opts(norm_act="iabn"), [16, 1])
    assert not any(isinstance(m, inplace_abn.ABN) for m in pure.modules())
    pure.load_state_dict(package.state_dict())
    x = torch.randn(4, 3, 96, 96)  # batch statistics over enough values to be well conditioned
    labels = torch.randint(0, 17, (4, 96, 96))

    def train_pass(net, amp):
        net = copy.deepcopy(net)
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = net(x)
        F.cross_entropy(out["logits"], labels).backward()
        params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
        return [out["logits"].detach(), params["body.mod1.conv1.weight"].grad, params["cls.0.weight"].grad,
                buffers["body.mod2.block1.convs.bn1.running_var"], buffers["head.red_bn.running_var"]]

    fp32 = train_pass(pure, None)
    for got, expected, tolerance in zip(train_pass(package, None), fp32, [1e-4, 1e-2, 1e-4, 1e-5, 1e-5]):
        assert _relative_error(got, expected) < tolerance
    for amp in (torch.bfloat16, torch.float16):
        errors = {name: [_relative_error(a, b) for a, b in zip(train_pass(net, amp), fp32)]
                  for name, net in (("package", package), ("pure", pure))}
        assert all(p < 1.5 * q + 1e-3 for p, q in zip(errors["package"], errors["pure"])), errors
        precision = Precision(torch.device("cpu"), True, {torch.float16: "fp16"}.get(amp, "bf16"))
        with torch.no_grad(), precision.autocast():
            folded = [precision.inference_copy(net)(x)["logits"] for net in (package, pure)]
        assert _relative_error(folded[0], folded[1]) < 0.02
