"""The incremental segmentation network: ResNet body + DeepLabV3 head + one classifier per step.

reference/mib_plop.md §3.3 (``IncrementalSegmentationModule``) and §3.5 (ImageNet weights).
``forward`` returns every tensor a distillation method reads (see ``methods/base.py``), so no
method needs a second pass or hooks.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.resnet import build_backbone, scale_channels
from modules.deeplab import DeeplabV3
from modules.dkd_head import DKDHead, dkd_classifier_forward
from modules.norm import freeze_norm_layers, make_norm_act
from utils.checkpoint import DIGEST_KEY, content_digest, strip_module_prefix
from utils.errors import UserError

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
HEAD_CHANNELS = 256  # ASPP hidden and output channels at --width 1 (§3.2)


class PretrainedWeightsError(UserError):
    """Pretrained body weights (ImageNet, or the shapes pool) that are missing, damaged or do not fit the body."""


class IncrementalSegmentationModule(nn.Module):
    """body -> head -> per-step 1x1 classifiers (concatenated) -> bilinear upsampling.

    ``cls[k]`` has ``classes_per_step[k]`` outputs with bias and PyTorch's default init; channel
    c of the logits is class c.  ``classifier_forward(cls, features)`` turns head features into
    ``{"logits_small", ...}``: softmax-style linear classifiers by default, DKD's sigmoid
    classifiers with decomposed logits for ``--head dkd``.
    """

    def __init__(self, body: nn.Module, head: nn.Module, head_channels: int, classes_per_step: list[int],
                 classifier_forward: Optional[Callable[[nn.ModuleList, Tensor], dict]] = None):
        super().__init__()
        self.body = body
        self.head = head
        self.classifier_forward = classifier_forward or linear_classifiers
        self.classes_per_step = list(classes_per_step)
        self.cls = nn.ModuleList([nn.Conv2d(head_channels, n, 1) for n in self.classes_per_step])
        self._norm_frozen = False

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_step)

    def forward(self, x: Tensor) -> dict[str, Any]:
        body, stages = self.body(x)
        pre_logits = self.head(body)
        # Classifiers and upsampling in fp32 under --amp: every loss reads the logits, bf16 would
        # round them to 3 significant digits, and these ops cost nothing next to the body.
        with torch.autocast(x.device.type, enabled=False):
            out = self.classifier_forward(self.cls, pre_logits.float())
            out["logits"] = F.interpolate(out["logits_small"], size=x.shape[-2:], mode="bilinear",
                                          align_corners=False)
        out.update(body=body, stages=stages, pre_logits=pre_logits)
        return out

    def classify(self, features: Tensor) -> Tensor:
        return self.classifier_forward(self.cls, features)["logits_small"]

    def freeze_bn(self) -> None:
        """``--fix_bn``: norm layers use running statistics and get no gradient, also after
        later ``train()`` calls (the Trainer switches modes every epoch)."""
        self._norm_frozen = True
        freeze_norm_layers(self)

    def train(self, mode: bool = True) -> "IncrementalSegmentationModule":
        super().train(mode)
        if self._norm_frozen:
            freeze_norm_layers(self)
        return self


def linear_classifiers(classifiers: nn.ModuleList, features: Tensor) -> dict[str, Tensor]:
    """All classifiers as one 1x1 conv: equal to concatenating each step's output, one kernel."""
    weight = torch.cat([c.weight for c in classifiers]).to(features.dtype)  # a bf16 inference copy
    bias = torch.cat([c.bias for c in classifiers]).to(features.dtype)
    return {"logits_small": F.conv2d(features, weight, bias)}


def build_head(opts, in_channels: int, norm_act: Callable[[int], nn.Module], bn_group: Optional[Any] = None):
    """The head on top of the body (it exposes ``out_channels``) and its classifier forward.

    ``--head deeplab`` is the MiB/PLOP DeepLabV3 with activated BN (§3.2); ``--head dkd`` is DKD's
    ASPP with ReLU features and sigmoid classifiers (recent_methods.md §5.1), normalised with
    BatchNorm (SyncBatchNorm across CUDA ranks).
    """
    channels = scale_channels(HEAD_CHANNELS, opts.width)
    if getattr(opts, "head", "deeplab") == "dkd":
        sync = bn_group is not None and torch.cuda.is_available()
        norm = (lambda n: nn.SyncBatchNorm(n, process_group=bn_group)) if sync else nn.BatchNorm2d
        return DKDHead(in_channels, channels, opts.output_stride, norm_layer=norm), dkd_classifier_forward
    return DeeplabV3(in_channels, channels, channels, norm_act, opts.output_stride, opts.pooling), linear_classifiers


def shapes_pretrained_file(backbone: str, width: float, norm_act: str) -> Path:
    """Where ``scripts/pretrain_shapes.py`` writes the pool-pretrained body of the shapes set."""
    return PRETRAINED_DIR / f"shapes_{backbone}_w{width:g}_{norm_act}.pth.tar"


def default_pretrained_path(opts) -> Path:
    """ImageNet's ``pretrained/{backbone}_{norm_act}.pth.tar`` (§3.5), or for ``--dataset shapes``
    the body pretrained on its pool (its ImageNet)."""
    if getattr(opts, "dataset", None) == "shapes":
        return shapes_pretrained_file(opts.backbone, opts.width, opts.norm_act)
    return PRETRAINED_DIR / f"{opts.backbone}_{opts.norm_act}.pth.tar"


def check_pretrained(opts) -> Optional[Path]:
    """The weights file to load, None with ``--no_pretrained``; fails before the model is built."""
    if opts.no_pretrained:
        return None
    if opts.pretrained:
        path = Path(opts.pretrained)
        if not path.is_file():
            raise PretrainedWeightsError(
                f"--pretrained {path} is not a file; check the path, drop --pretrained to read the default "
                f"{default_pretrained_path(opts)}, or pass --no_pretrained to train from scratch")
        return path
    path = default_pretrained_path(opts)
    if getattr(opts, "dataset", None) == "shapes":
        if not path.is_file():
            raise PretrainedWeightsError(
                f"pretrained weights {path} are missing; write them with python scripts/pretrain_shapes.py "
                f"--backbone {opts.backbone} --width {opts.width:g} --norm_act {opts.norm_act} "
                "(see pretrained/README.md), or pass --no_pretrained to train from scratch")
        return path
    if opts.width != 1:  # the ImageNet files are full width
        raise PretrainedWeightsError(
            f"--width {opts.width} changes every channel count, so ImageNet weights cannot be loaded; "
            "pass --no_pretrained, --width 1, or --pretrained with weights of this width")
    if not path.is_file():
        raise PretrainedWeightsError(f"ImageNet weights {path} are missing; {_imagenet_source(opts.backbone)}, see "
                                     "pretrained/README.md, or pass --no_pretrained to train from scratch")
    return path


def _imagenet_source(backbone: str) -> str:
    if backbone == "resnet101":
        return ("download 'ResNet101 iABN sync' from the mapillary/inplace_abn releases (mirrored as "
                "resnet101_iabn_sync.pth.tar in PLOP's release v1.0)")
    return f"save the {backbone} ImageNet weights of the mapillary/inplace_abn releases under that name"


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Older training scripts pickle extra objects next to the weights; the user chose the file.
        return torch.load(path, map_location="cpu", weights_only=False)


def read_pretrained(path: Path) -> dict[str, Tensor]:
    """Body weights of an ImageNet checkpoint: ``['state_dict']`` if present, ``module.`` prefixes
    stripped where present (PLOP strips 7 characters blindly), ImageNet classifier dropped.
    Files this tool wrote (``scripts/pretrain_shapes.py``) carry a content digest, checked here."""
    try:
        ckpt = _torch_load(path)
    except Exception as exc:
        raise PretrainedWeightsError(f"pretrained weights {path} cannot be read ({type(exc).__name__}); "
                                     "download or rewrite the file (pretrained/README.md) or pass --no_pretrained") from None
    if isinstance(ckpt, dict) and DIGEST_KEY in ckpt and content_digest(ckpt) != ckpt[DIGEST_KEY]:
        raise PretrainedWeightsError(f"pretrained weights {path} are damaged (their content does not match their "
                                     "digest); restore the file (git checkout, or rewrite it with "
                                     "scripts/pretrain_shapes.py) or pass --no_pretrained")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path} holds no state dict; expected a checkpoint with a 'state_dict' entry")
    return {k: v for k, v in strip_module_prefix(state).items() if not k.startswith("classifier.")}


def load_pretrained(body: nn.Module, path: Path) -> None:
    """Strict load of pretrained weights into the body, with a one-line error when they do not fit."""
    state = read_pretrained(path)
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch: weights of another backbone
        detail = str(exc).strip().splitlines()[-1].strip()
        raise PretrainedWeightsError(f"pretrained weights {path} do not fit the body ({detail}); "
                                     "check --backbone or pass --no_pretrained") from None
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"pretrained weights {path} do not fit the body ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); check --backbone or pass --no_pretrained")


def make_model(opts, classes_per_step: list[int], bn_group: Optional[Any] = None) -> IncrementalSegmentationModule:
    """Student/teacher network for ``classes_per_step`` (e.g. 15-1 step 2: [16, 1, 1]).

    Reads ``opts.backbone``, ``output_stride``, ``norm_act``, ``width``, ``pooling``,
    ``pretrained``, ``no_pretrained``; ``bn_group`` is the process group ``iabn_sync`` uses.
    """
    weights = check_pretrained(opts)
    norm_act = make_norm_act(opts.norm_act, group=bn_group)
    body = build_backbone(opts.backbone, norm_act, opts.output_stride, opts.width)
    if weights is not None:
        load_pretrained(body, weights)
    head, classifier_forward = build_head(opts, body.out_channels, norm_act, bn_group)
    return IncrementalSegmentationModule(body, head, head.out_channels, classes_per_step, classifier_forward)
