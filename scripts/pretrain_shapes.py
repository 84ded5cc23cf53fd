"""Pretrain a backbone on the synthetic pretraining pool: the ImageNet of ``--dataset shapes``.

    python scripts/pretrain_shapes.py                     # the demo's ResNet-18 x0.25 with ABN
    python scripts/pretrain_shapes.py --backbone resnet18 --width 0.5 --norm_act bn

Dense: the body in the benchmark's layout (``--output_stride``, default 8), a 1x1 convolution
over the pool's categories (``dataset.shapes.POOL``, none of which is a benchmark class) plus
background, per-pixel cross-entropy on pool scenes (``dataset.shapes_pool.generate_scene``),
SGD with Nesterov momentum, a cosine schedule, random horizontal flips.  ImageNet features
transfer to dense prediction; a classifier trained on this small body and 64-pixel images, whose
last map is 2x2, did not (README, "Step 0: in VOC's range, from VOC-sized increments": step 0
reached 21.4 % from those weights, 13.4 % from scratch, 41.5 % from dense pool weights), so the
pool is learned densely.  Writes
``pretrained/shapes_<backbone>_w<width>_<norm_act>.pth.tar`` in the ImageNet file's format (a
``state_dict`` with the body's keys and ``classifier.fc.*``, which the loader drops), which step 0
of every ``--dataset shapes`` run loads by default.  The same command on the same torch build,
thread count (``--threads``, default 2) and CPU writes the same bytes, whatever ``--out`` names.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from argparser import build_parser, check_bounds  # noqa: E402
from dataset.shapes import POOL  # noqa: E402
from dataset.presence import IGNORE_LABEL  # noqa: E402
from dataset.shapes_pool import generate_scene  # noqa: E402
from dataset.transforms import device_batch, normalize  # noqa: E402
from metrics.confusion import ConfusionMatrix  # noqa: E402
from models.resnet import ResidualBlock, build_backbone  # noqa: E402
from modules.norm import make_norm_act  # noqa: E402
from modules.norm_drift import variance_ratios  # noqa: E402
from segmentation_module import shapes_pretrained_file  # noqa: E402
from utils.checkpoint import require_writable, save_atomic  # noqa: E402
from utils.cli import ToolParser, script_main  # noqa: E402
from utils.errors import ConfigError  # noqa: E402


class PoolSegmenter(nn.Module):
    """body -> 1x1 convolution -> bilinear upsampling, the classifier named like the ImageNet
    files' (``classifier.fc``) so that the loader drops it."""

    def __init__(self, body: nn.Module, num_classes: int):
        super().__init__()
        self.body = body
        self.classifier = nn.Sequential()
        self.classifier.add_module("fc", nn.Conv2d(body.out_channels, num_classes, 1))

    def forward(self, x):
        features, _ = self.body(x)
        return F.interpolate(self.classifier.fc(features), size=x.shape[-2:], mode="bilinear", align_corners=False)


def make_scenes(seed: int, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` pool scenes as uint8 NCHW images and uint8 NHW labels."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty((count, size, size), dtype=np.uint8)
    for index in range(count):
        images[index], labels[index] = generate_scene(POOL, seed, index, size)
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)


@torch.no_grad()
def pool_miou(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 100) -> float:
    """Validation mIoU over background and the pool categories present."""
    model.eval()
    confusion = ConfusionMatrix(len(POOL) + 1)
    for start in range(0, len(images), batch):
        x, y = device_batch(images[start:start + batch], labels[start:start + batch], torch.device("cpu"))
        confusion.update(model(x).argmax(1), y)
    return confusion.scores()["miou"]


def pretrain(backbone: str = "resnet18", width: float = 0.25, norm_act: str = "abn", output_stride: int = 8,
             images: int = 10000, epochs: int = 32, batch_size: int = 16, lr: float = 0.1, size: int = 64,
             seed: int = 0, zero_init_residual: bool = False, val_images: int = 500,
             log=None) -> tuple[dict, dict]:
    """Train on pool scenes; return (checkpoint dict, metadata)."""
    log = log or (lambda line: print(line, flush=True))
    torch.manual_seed(seed)
    train_x, train_y = make_scenes(seed, images, size)
    val_x, val_y = make_scenes(seed + 1, val_images, size)
    body = build_backbone(backbone, make_norm_act(norm_act), output_stride, width)
    if zero_init_residual:
        zero_residual_scales(body)
    model = PoolSegmenter(body, len(POOL) + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    steps = epochs * (images // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(images, generator=generator)
        flips = torch.rand(images, generator=generator) < 0.5
        total = 0.0
        for start in range(0, images - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            flip = flips[index]
            x = torch.where(flip[:, None, None, None], train_x[index].flip(-1), train_x[index])
            y = torch.where(flip[:, None, None], train_y[index].flip(-1), train_y[index])
            x, y = device_batch(x, y, torch.device("cpu"))
            loss = F.cross_entropy(model(x), y, ignore_index=IGNORE_LABEL)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        log(f"epoch {epoch + 1}/{epochs}: loss {total / (images // batch_size):.4f}, "
            f"pool validation mIoU {100 * pool_miou(model, val_x, val_y):.2f} %, "
            f"eval-mode drift {eval_drift(model, val_x[:EVAL_DRIFT_IMAGES]):.3g}")
    meta = {"backbone": backbone, "width": width, "norm_act": norm_act, "output_stride": output_stride,
            "images": images, "epochs": epochs, "batch_size": batch_size, "lr": lr, "size": size, "seed": seed,
            "categories": len(POOL), "val_miou": pool_miou(model, val_x, val_y), "torch": str(torch.__version__),
            "threads": torch.get_num_threads()}
    if zero_init_residual:  # recorded only when set, so the shipped file's bytes stand
        meta["zero_init_residual"] = True
    state = dict(model.body.state_dict())
    state.update({f"classifier.fc.{k}": v for k, v in model.classifier.fc.state_dict().items()})
    return {"state_dict": state, "meta": meta}, meta


def zero_residual_scales(body: nn.Module) -> None:
    """Start every residual branch's last norm at scale 0, so each block begins as the identity
    (Goyal et al., "Accurate, Large Minibatch SGD", 2017, §5.1; torchvision's
    ``zero_init_residual``).  Without it a ResNet-101 x0.25 trained here ends with an eval mode
    far from its training mode (``eval_drift`` in the thousands; ResNet-18: about 1)."""
    for block in body.modules():
        if isinstance(block, ResidualBlock):
            nn.init.zeros_(list(block.convs.children())[-1].weight)


EVAL_DRIFT_IMAGES = 64


def eval_drift(model: nn.Module, images: torch.Tensor) -> float:
    """The largest eval-mode input variance over running variance of any norm layer of the body
    on ``images`` (uint8 NCHW): about 1 when the running statistics describe the eval-mode maps,
    as they do for ImageNet weights, whose published accuracies are eval-mode ones."""
    return max(ratio for _, ratio in variance_ratios(model.body, normalize(images)))


RECIPE_FLAGS = ("backbone", "width", "norm_act", "output_stride", "images", "epochs", "batch_size", "lr", "seed",
                "zero_init_residual")


# As run.py's NUMERIC_BOUNDS: the lowest value of each numeric flag, and whether it is excluded.
RECIPE_BOUNDS = {"images": (1, False), "epochs": (1, False), "batch_size": (1, False), "lr": (0, True),
                 "width": (0, True), "seed": (0, False), "threads": (1, False)}


def check_args(args: argparse.Namespace) -> Path:
    """Refuse a recipe that cannot train, and an --out that cannot be written, before an hour of
    training rather than after it; return the file to write."""
    check_bounds(args, RECIPE_BOUNDS)
    if args.images < args.batch_size:
        raise ConfigError(f"--images {args.images} is fewer than one batch (--batch_size {args.batch_size})")
    out = args.out or shapes_pretrained_file(args.backbone, args.width, args.norm_act)
    require_writable(out, "--out")
    return out


def main(argv=None) -> int:
    p = ToolParser(description=__doc__)
    recipe = inspect.signature(pretrain).parameters  # the defaults live once, in pretrain()'s signature
    run_choices = {action.dest: action.choices for action in build_parser()._actions}
    for name in RECIPE_FLAGS:
        default = recipe[name].default
        if isinstance(default, bool):
            p.add_argument(f"--{name}", action="store_true")
        else:
            p.add_argument(f"--{name}", type=type(default), default=default, choices=run_choices.get(name),
                           help="the benchmark's (--output_stride of run.py)" if name == "output_stride" else None)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the bytes written depend on it)")
    p.add_argument("--out", type=Path, default=None, help="default: the file step 0 loads")
    args = p.parse_args(argv)
    out = check_args(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ckpt, meta = pretrain(**{name: getattr(args, name) for name in RECIPE_FLAGS})
    save_atomic(ckpt, out)  # through a file object: the bytes do not depend on the file's name
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {digest}) in {time.perf_counter() - start:.0f} s; "
          f"pool validation mIoU {100 * meta['val_miou']:.2f} %")
    return 0


if __name__ == "__main__":
    script_main(main)
