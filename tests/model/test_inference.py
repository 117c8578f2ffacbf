"""model/inference.py: what a forward pass means at test time (mirror TTA, softmax), checked
against answers worked out by hand, and `model.evaluate --tta` going through it."""

from __future__ import annotations

import math

import torch
from torch import nn

from model import evaluate, inference


def _first_row(images: torch.Tensor) -> torch.Tensor:
    """A 'model' whose logits are the pixels of channel 0, row 0: (N, 3, H, W) -> (N, W)."""
    return images[:, 0, 0, :].float()


def _image(first_row: list[int]) -> torch.Tensor:
    """A uint8 (3, 2, W) image whose channel 0, row 0 is `first_row`; the rest differs."""
    image = torch.full((3, 2, len(first_row)), 7, dtype=torch.uint8)
    image[0, 0] = torch.tensor(first_row, dtype=torch.uint8)
    return image


def test_without_mirror_the_logits_are_the_run_s_own_as_float32() -> None:
    images = torch.stack([_image([1, 2, 3, 40])])
    logits = inference.logits(lambda x: _first_row(x).half(), images)
    assert logits.dtype == torch.float32
    assert logits.tolist() == [[1, 2, 3, 40]]


def test_mirror_tta_averages_each_image_with_its_left_right_mirror() -> None:
    images = torch.stack([_image([1, 2, 3, 40]), _image([0, 10, 0, 0])])
    calls: list[torch.Tensor] = []

    def run(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch)
        return _first_row(batch)

    logits = inference.logits(run, images, mirror_tta=True)
    # [1, 2, 3, 40] mirrored is [40, 3, 2, 1]; the mean of the two, column by column:
    assert logits.tolist() == [[20.5, 2.5, 2.5, 20.5], [0, 5, 5, 0]]
    assert len(calls) == 2  # two forward passes, each over the whole batch
    assert [tuple(call.shape) for call in calls] == [(2, 3, 2, 4)] * 2


def test_class_probabilities_are_the_softmax_of_the_logits() -> None:
    images = torch.zeros(2, 3, 1, 1)

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.0, math.log(3.0)], [5.0, 5.0]])

    probabilities = inference.class_probabilities(run, images)
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities, torch.tensor([[0.25, 0.75], [0.5, 0.5]]))


class _FirstTwoColumns(nn.Module):
    """Logits: channel 0, row 0, columns 0 and 1 of the normalised image (two classes)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :2]


def test_evaluate_with_tta_scores_the_mirror_averaged_logits() -> None:
    # Row [0, 10, 20, 100]: plain logits (0, 10) say class 1; with the mirror (100, 20) the
    # means (50, 15) say class 0, its label. Row [0, 100, 10, 0]: class 1 either way.
    # Normalisation is a per-channel affine map with a positive scale: the same winners.
    images = torch.stack([_image([0, 10, 20, 100]), _image([0, 100, 10, 0])])
    labels = torch.tensor([0, 1])
    cpu = torch.device("cpu")
    plain = evaluate.evaluate_model(_FirstTwoColumns(), images, labels, cpu)
    mirrored = evaluate.evaluate_model(_FirstTwoColumns(), images, labels, cpu, tta=True)
    assert plain["confusion_matrix"] == [[0, 1], [0, 1]]
    assert mirrored["confusion_matrix"] == [[1, 0], [0, 1]]
    assert (plain["accuracy"], mirrored["accuracy"]) == (0.5, 1.0)
