"""ResNet for CIFAR-10, as in He et al. 2015 (v1) and He et al. 2016 (v2).

v1 ("Deep Residual Learning for Image Recognition", §4.2): a 3x3 conv with 16 filters,
then three stages of n basic blocks each (16, 32 and 64 filters; the first block of
stages 2 and 3 halves the feature map with stride 2), global average pooling and a
10-way fully connected layer: 6n+2 weighted layers. ResNet20/32/44/56/110 are n=3/5/7/9/18.

v2 ("Identity Mappings in Deep Residual Networks"): pre-activation bottleneck blocks
(BN-ReLU-conv, 1x1 -> 3x3 -> 1x1, expansion 4), and BN-ReLU before the pooling, laid out
as in the Keras CIFAR-10 ResNet example (keras.io/examples/cifar10_resnet): 9n+2 layers.

Run `python -m model.resnet --depth 56` to print a per-stage summary.
"""

from __future__ import annotations

import argparse
from typing import Literal, TypedDict, Unpack

import torch
import torch.nn.functional as F
from torch import nn

Shortcut = Literal["projection", "padding"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1; no bias, since a BatchNorm always follows or precedes."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, for bottlenecks and projection shortcuts."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class PaddingShortcut(nn.Module):
    """The paper's option A: subsample by `stride`, then zero-pad the new channels.

    He et al. 2015 §4.2 used this parameter-free shortcut for their CIFAR-10 results.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Pad the channel dimension evenly on both sides (F.pad pads the last dims first).
        before = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))


def projection_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Option B: a strided 1x1 convolution and BatchNorm (torchvision's `downsample`)."""
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """v1 block: conv3x3-BN-ReLU-conv3x3-BN, add the shortcut, ReLU (post-activation)."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: Shortcut = "projection",
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "padding":
                self.shortcut = PaddingShortcut(in_planes, planes, stride)
            else:
                self.shortcut = projection_shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBottleneck(nn.Module):
    """v2 block: (BN-ReLU-conv1x1) -> (BN-ReLU-conv3x3) -> (BN-ReLU-conv1x1), plus shortcut.

    As in the Keras example, the very first block skips its leading BN-ReLU, because the
    stem has just applied one, and shape-changing shortcuts are a bare strided 1x1 conv.
    """

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, preactivate: bool = True
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1: nn.Module = nn.BatchNorm2d(in_planes) if preactivate else nn.Identity()
        self.preactivate = preactivate
        self.conv1 = conv1x1(in_planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = conv1x1(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x)) if self.preactivate else x
        # He et al. 2016 Fig. 5: the projection takes the pre-activated input.
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class ResNet(nn.Module):
    """Stem, three stages of residual blocks, global average pooling, classifier."""

    def __init__(
        self,
        version: Literal[1, 2],
        blocks_per_stage: int,
        num_classes: int = 10,
        shortcut: Shortcut = "projection",
    ) -> None:
        super().__init__()
        self.version = version
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        # Stage widths: 16/32/64 for v1; bottleneck widths 16/32/64 (outputs x4) for v2.
        self.layer1 = self._make_layer(16, blocks_per_stage, stride=1, shortcut=shortcut)
        self.layer2 = self._make_layer(32, blocks_per_stage, stride=2, shortcut=shortcut)
        self.layer3 = self._make_layer(64, blocks_per_stage, stride=2, shortcut=shortcut)
        # v2 ends with BN-ReLU before pooling, since its blocks end on a bare conv.
        self.final_bn: nn.Module = nn.BatchNorm2d(self.in_planes) if version == 2 else nn.Identity()
        self.fc = nn.Linear(self.in_planes, num_classes)
        self._init_weights()

    def _make_layer(
        self, planes: int, blocks: int, stride: int, shortcut: Shortcut
    ) -> nn.Sequential:
        layers: list[nn.Module] = []
        for index in range(blocks):
            block_stride = stride if index == 0 else 1
            if self.version == 1:
                block: nn.Module = BasicBlock(self.in_planes, planes, block_stride, shortcut)
                self.in_planes = planes
            else:
                first_of_network = self.in_planes == 16 and index == 0
                block = PreActBottleneck(self.in_planes, planes, block_stride, not first_of_network)
                self.in_planes = planes * PreActBottleneck.expansion
            layers.append(block)
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He et al. 2015 §3.4: "We initialize the weights as in [He et al. 2015b]" (Kaiming).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.final_bn(x)) if self.version == 2 else x
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def blocks_for_depth(depth: int, version: int) -> int:
    """Blocks per stage for a depth; ValueError naming the valid forms otherwise."""
    if version == 1:
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"ResNet v1 depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}"
            )
        return (depth - 2) // 6
    if version == 2:
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"ResNet v2 depth must be 9n+2 (29, 56, 110, 164, ...), got {depth}")
        return (depth - 2) // 9
    raise ValueError(f"ResNet version must be 1 or 2, got {version}")


def resnet(
    depth: int = 56,
    version: int = 1,
    num_classes: int = 10,
    shortcut: Shortcut = "projection",
) -> ResNet:
    """Build a CIFAR ResNet: v1 depth 6n+2 (basic blocks), v2 depth 9n+2 (bottlenecks).

    `shortcut` (v1 only): "projection" (1x1 conv + BN, default) or "padding" (option A).
    """
    if shortcut not in ("projection", "padding"):
        raise ValueError(f"shortcut must be 'projection' or 'padding', got {shortcut!r}")
    blocks = blocks_for_depth(depth, version)  # ValueError unless version is 1 or 2
    return ResNet(1 if version == 1 else 2, blocks, num_classes, shortcut)


class ResNetOptions(TypedDict, total=False):
    """The keyword arguments of `resnet` after the depth."""

    version: int
    num_classes: int
    shortcut: Shortcut


def resnet20(**kwargs: Unpack[ResNetOptions]) -> ResNet:
    return resnet(20, **kwargs)


def resnet56(**kwargs: Unpack[ResNetOptions]) -> ResNet:
    return resnet(56, **kwargs)


def resnet110(**kwargs: Unpack[ResNetOptions]) -> ResNet:
    return resnet(110, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summary(model: ResNet, image_size: int = 32) -> str:
    """One line per stage: output shape and parameter count."""
    rows = [f"{'stage':<8}{'output shape':<20}{'parameters':>12}"]
    x = torch.zeros(1, 3, image_size, image_size)
    model = model.eval()
    with torch.no_grad():
        x = F.relu(model.bn1(model.conv1(x)))
        stem = count_parameters(model.conv1) + count_parameters(model.bn1)
        rows.append(f"{'stem':<8}{tuple(x.shape[1:])!s:<20}{stem:>12,}")
        for name in ("layer1", "layer2", "layer3"):
            layer = getattr(model, name)
            x = layer(x)
            rows.append(f"{name:<8}{tuple(x.shape[1:])!s:<20}{count_parameters(layer):>12,}")
        head = count_parameters(model.final_bn) + count_parameters(model.fc)
        rows.append(f"{'head':<8}{(model.fc.out_features,)!s:<20}{head:>12,}")
    rows.append(f"{'total':<28}{count_parameters(model):>12,}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a CIFAR ResNet's per-stage summary.")
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--version", type=int, default=1, choices=(1, 2))
    parser.add_argument("--shortcut", default="projection", choices=("projection", "padding"))
    parser.add_argument("--num-classes", type=int, default=10)
    args = parser.parse_args(argv)
    model = resnet(args.depth, args.version, args.num_classes, args.shortcut)
    print(f"ResNet{args.depth} v{args.version} ({args.shortcut} shortcuts)")
    print(summary(model))


if __name__ == "__main__":
    main()
