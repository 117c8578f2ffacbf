"""The reference the service's answers are compared with: the model on one image at a time.

Its preprocessing is `model.preprocessing.image_to_tensor`, the same code the service runs;
that code is checked against known answers in tests/model/test_preprocessing.py and
test_transparency.py, so a preprocessing bug cannot hide behind this comparison."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from model.preprocessing import image_to_tensor, normalize
from model.weights import load_checked


def reference_probabilities(
    weights: Path, images: Iterable[Image.Image], mirror_tta: bool = True
) -> list[list[float]]:
    """What the model gives for each image alone: batch size 1, no service involved.
    With `mirror_tta` (the service's default) the logits are averaged with those of the
    image mirrored left-right, written out here rather than through the service's helper.

    Returns one row of 10 class probabilities (float, summing to 1) per image, in order."""
    model, _ = load_checked(weights)
    rows = []
    with torch.inference_mode():
        for image in images:
            pixels = normalize(image_to_tensor(image).unsqueeze(0))
            logits = model(pixels)
            if mirror_tta:
                logits = (logits + model(pixels.flip(-1))) / 2
            rows.append(torch.softmax(logits.float(), dim=1)[0].tolist())
    return rows
