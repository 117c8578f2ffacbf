"""Helpers shared by the tests: small weights files with valid model cards."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from model.preprocessing import CIFAR10_CLASSES
from model.resnet import count_parameters, resnet
from model.weights import sha256_of, write_card


def write_test_weights(path: Path, depth: int = 8, version: int = 1, seed: int = 0) -> Path:
    """A randomly initialised ResNet (BN statistics perturbed so outputs differ per image)
    saved as safetensors with a model card whose SHA-256 matches, like model.train writes."""
    torch.manual_seed(seed)
    model = resnet(depth, version)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    card = {
        "name": f"resnet{depth}",
        "architecture": {
            "depth": depth,
            "version": version,
            "shortcut": "projection",
            "num_classes": 10,
        },
        "parameters": count_parameters(model),
        "classes": list(CIFAR10_CLASSES),
        "validation": None,
        "sha256": sha256_of(path),
    }
    write_card(path, card)
    return path
