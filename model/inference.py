"""What one forward pass means at test time, shared by `model.evaluate` and the service.

`run` is anything that maps a batch of images to logits: the torch model itself (as in
`model.evaluate`, on normalised images) or a service engine's `run` (uint8 images,
normalised inside). On top of it this module adds the two steps that make a prediction:
optional mirror test-time augmentation, and the softmax.

Mirror TTA averages the logits of each image and of its left-right mirror image. Training
flips images left-right at random (`model.data`), the one augmentation it applies to every
image with probability 1/2, so both views are equally familiar to the model and their
errors partly cancel. It costs a second forward pass; the model card (weights/MODEL_CARD.md)
gives its measured effect on accuracy, benchmarks/load.py its cost in throughput.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Run = Callable[[torch.Tensor], torch.Tensor]
"""A forward pass: images (N, 3, H, W), uint8 or normalised -> logits (N, classes)."""


def logits(run: Run, images: torch.Tensor, *, mirror_tta: bool = False) -> torch.Tensor:
    """float32 logits (N, classes) of `images` (N, 3, H, W), uint8 or normalised as `run`
    expects; with `mirror_tta`, the mean of the logits of each image and of its mirror image
    (the batch flipped along the width, dimension 3), which runs `run` twice."""
    if not mirror_tta:
        return run(images).float()
    return (run(images).float() + run(images.flip(3)).float()) / 2


def class_probabilities(
    run: Run, images: torch.Tensor, *, mirror_tta: bool = False
) -> torch.Tensor:
    """float32 class probabilities (N, classes), each row summing to 1: the softmax of
    `logits(run, images, mirror_tta=mirror_tta)` over the classes."""
    return torch.softmax(logits(run, images, mirror_tta=mirror_tta), dim=1)
