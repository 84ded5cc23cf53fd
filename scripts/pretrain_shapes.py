"""Pretrain a backbone on the synthetic pretraining pool: the ImageNet of ``--dataset shapes``.

    python scripts/pretrain_shapes.py                     # the demo's ResNet-18 x0.25 with ABN
    python scripts/pretrain_shapes.py --backbone resnet18 --width 0.5 --norm_act bn

Classification, as ImageNet pretraining is: the body in its undilated layout (output stride
32), global average pooling and a linear classifier over the pool's categories
(``dataset.shapes.POOL``, none of which is a benchmark class), cross-entropy, SGD with Nesterov
momentum and a cosine schedule, random horizontal flips.  Writes
``pretrained/shapes_<backbone>_w<width>_<norm_act>.pth.tar`` in the ImageNet file's format (a
``state_dict`` with the body's keys and ``classifier.fc.*``, which the loader drops), which
step 0 of every ``--dataset shapes`` run loads by default.  The same command on the same torch
build and thread count writes the same bytes (``--threads``, default 2).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset.shapes import POOL  # noqa: E402
from dataset.shapes_pool import generate_example  # noqa: E402
from dataset.transforms import device_batch  # noqa: E402
from models.resnet import build_backbone  # noqa: E402
from modules.norm import make_norm_act  # noqa: E402
from segmentation_module import shapes_pretrained_file  # noqa: E402


class PoolClassifier(nn.Module):
    """body -> global average pooling -> linear, named like the ImageNet files (``classifier.fc``)."""

    def __init__(self, body: nn.Module, num_classes: int):
        super().__init__()
        self.body = body
        self.classifier = nn.Sequential()
        self.classifier.add_module("fc", nn.Linear(body.out_channels, num_classes))

    def forward(self, x):
        features, _ = self.body(x)
        return self.classifier.fc(features.mean(dim=(2, 3)))


def make_examples(seed: int, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` pool examples as uint8 NCHW images and int64 categories."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for index in range(count):
        images[index], labels[index] = generate_example(POOL, seed, index, size)
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        x, _ = device_batch(images[start:start + batch], labels[start:start + batch], torch.device("cpu"))
        correct += int((model(x).argmax(1) == labels[start:start + batch]).sum())
    return correct / len(images)


def pretrain(backbone: str = "resnet18", width: float = 0.25, norm_act: str = "abn", images: int = 12000,
             epochs: int = 8, batch_size: int = 64, lr: float = 0.1, size: int = 64, seed: int = 0,
             val_images: int = 1000, log=None) -> tuple[dict, dict]:
    """Train on the pool; return (checkpoint dict, metadata)."""
    log = log or (lambda line: print(line, flush=True))
    torch.manual_seed(seed)
    train_x, train_y = make_examples(seed, images, size)
    val_x, val_y = make_examples(seed + 1, val_images, size)
    model = PoolClassifier(build_backbone(backbone, make_norm_act(norm_act), 32, width), len(POOL))
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
            x = torch.where(flips[index, None, None, None], train_x[index].flip(-1), train_x[index])
            x, _ = device_batch(x, train_y[index], torch.device("cpu"))
            loss = nn.functional.cross_entropy(model(x), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        log(f"epoch {epoch + 1}/{epochs}: loss {total / (images // batch_size):.4f}, "
            f"pool validation accuracy {100 * accuracy(model, val_x, val_y):.2f} %")
    meta = {"backbone": backbone, "width": width, "norm_act": norm_act, "images": images, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "size": size, "seed": seed, "categories": len(POOL),
            "val_accuracy": accuracy(model, val_x, val_y), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    state = dict(model.body.state_dict())
    state.update({f"classifier.fc.{k}": v for k, v in model.classifier.fc.state_dict().items()})
    return {"state_dict": state, "meta": meta}, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--norm_act", default="abn")
    p.add_argument("--images", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the bytes written depend on it)")
    p.add_argument("--out", type=Path, default=None, help="default: the file step 0 loads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ckpt, meta = pretrain(args.backbone, args.width, args.norm_act, args.images, args.epochs, args.batch_size,
                          args.lr, seed=args.seed)
    out = args.out or shapes_pretrained_file(args.backbone, args.width, args.norm_act)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {digest}) in {time.perf_counter() - start:.0f} s; "
          f"pool validation accuracy {100 * meta['val_accuracy']:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
