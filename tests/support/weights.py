"""Helpers shared by the tests: small weights files with valid model cards."""

from __future__ import annotations

from pathlib import Path

import torch

from model.preprocessing import CIFAR10_CLASSES
from model.resnet import count_parameters, resnet
from model.weights import Architecture, ModelCard, save_checked


def write_test_weights(path: Path, depth: int = 8, version: int = 1, seed: int = 0) -> Path:
    """A randomly initialised ResNet (BN statistics perturbed so outputs differ per image)
    saved with its model card through `save_checked`, as model.train saves them."""
    torch.manual_seed(seed)
    model = resnet(depth, version)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    card = ModelCard(
        name=f"resnet{depth}",
        architecture=Architecture(depth=depth, version=version, num_classes=10),
        parameters=count_parameters(model),
        classes=CIFAR10_CLASSES,
    )
    save_checked(model, path, card)
    return path
