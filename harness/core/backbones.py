"""Feature extractors shared by the CNN methods. Each returns an nn.Module with `out_dim`; forward gives
(B, out_dim) features (no classifier)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from harness.errors import ConfigError


SHORTCUTS = ("projection", "zero_pad")


class ZeroPadShortcut(nn.Module):
    """He et al.'s parameter-free option A (PyCIL's ResNet-32, `DownsampleA`): keep every `stride`-th pixel and
    append zero channels up to `planes`."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "projection") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            # projection: option B (1x1 convolution + BN); zero_pad: option A, no parameters
            self.shortcut = (ZeroPadShortcut(in_planes, planes, stride) if shortcut == "zero_pad" else
                             nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, no max-pool, `len(blocks)` stages doubling the width."""

    def __init__(self, blocks: list[int], width: int, in_channels: int = 3, shortcut: str = "projection") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, planes, in_planes = [], width, width
        for i, n in enumerate(blocks):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(in_planes, planes, stride if j == 0 else 1, shortcut))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
            planes *= 2
        self.stages = nn.Sequential(*layers)
        self.out_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ImageNetResNet18(nn.Module):
    """torchvision's ResNet-18 without its classifier (224px inputs)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        net.fc = nn.Identity()
        self.net = net
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyCNN(nn.Module):
    """A few thousand parameters: for tests and smoke runs only."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


BACKBONES: dict[str, Callable[[int | None, str], nn.Module]] = {
    # ResNet-32 as in iCaRL / PyCIL: 3 stages of 5 basic blocks, 16-32-64 channels (0.46 M parameters).
    "resnet32": lambda w, s: CifarResNet([5, 5, 5], w or 16, shortcut=s),
    # ResNet-18 CIFAR variant (DER's paper): 4 stages of 2 blocks, 64..512 channels (11.17 M parameters).
    "resnet18_cifar": lambda w, s: CifarResNet([2, 2, 2, 2], w or 64, shortcut=s),
    # Reduced ResNet-18 (GEM / ER papers: width 20): small enough for 2-CPU benchmarks.
    "resnet18_reduced": lambda w, s: CifarResNet([2, 2, 2, 2], w or 20, shortcut=s),
    "resnet18": lambda w, s: ImageNetResNet18(),
    "tiny_cnn": lambda w, s: TinyCNN(w or 16),
}
CIFAR_RESNETS = ("resnet32", "resnet18_cifar", "resnet18_reduced")


def build_backbone(name: str, width: int | None = None, shortcut: str | None = None) -> nn.Module:
    """`shortcut` (option `resnet_shortcut`): projection | zero_pad, for the CIFAR ResNets."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}")
    shortcut = shortcut or "projection"
    if shortcut not in SHORTCUTS:
        raise ConfigError(f"unknown resnet_shortcut {shortcut!r}: use one of {', '.join(SHORTCUTS)}")
    if shortcut != "projection" and name not in CIFAR_RESNETS:
        raise ConfigError(f"resnet_shortcut {shortcut!r} applies to {', '.join(CIFAR_RESNETS)} only, not {name!r}")
    return BACKBONES[name](width, shortcut)


def prefers_channels_last(model: nn.Module) -> bool:
    """True for convolution-dominated models (the CNN backbones above): most parameters are Conv2d kernels.

    Why: channels-last (NHWC) convolutions are faster with oneDNN on CPU and cuDNN on GPU (numbers in
    docs/PERFORMANCE.md); a ViT such as DyTox, whose only convolution is the patch embedding, gains nothing."""
    conv = total = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            total += p.numel()
            if isinstance(module, nn.Conv2d):
                conv += p.numel()
    return total > 0 and conv / total > 0.5
