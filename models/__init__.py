"""Backbones: ResNet-18/34/50/101/152 in the in-place-ABN layout (reference/mib_plop.md §3.1)."""
from .resnet import RESNETS, ModelConfigError, ResNet, ResidualBlock, build_backbone, scale_channels  # noqa: F401
