"""`python -m model.calibration`: INT8 calibration images are training images only, decoded
as the service decodes them, in proportion per class, and a bad file is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import calibration
from model.calibration import (
    CalibrationError,
    calibration_indices,
    load_calibration,
    save_calibration,
)
from model.data import load_dataset, stratified_split
from model.preprocessing import CIFAR10_CLASSES
from tests.model.test_data import write_class_tree


def test_indices_come_from_the_training_part_in_proportion_per_class() -> None:
    labels = torch.arange(10).repeat_interleave(60)  # 60 images per class
    picked, val = calibration_indices(labels, val_size=100, seed=0, size=50)
    train, expected_val = stratified_split(labels, 100, 0)
    assert torch.equal(val, expected_val)
    assert set(picked.tolist()) <= set(train.tolist())
    assert not set(picked.tolist()) & set(val.tolist())
    assert torch.bincount(labels[picked], minlength=10).tolist() == [5] * 10
    again, _ = calibration_indices(labels, val_size=100, seed=0, size=50)
    other, _ = calibration_indices(labels, val_size=100, seed=1, size=50)
    assert torch.equal(picked, again) and not torch.equal(picked, other)
    with pytest.raises(ValueError, match="--size must be in"):
        calibration_indices(labels, val_size=100, seed=0, size=500)


def test_main_writes_decoded_training_images_and_their_provenance(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_class_tree(tree, CIFAR10_CLASSES, per_class=12)
    output = tmp_path / "out" / "calibration.safetensors"
    cache = tmp_path / "cache"
    calibration.main(
        ["--data", str(tree), "--val-size", "40", "--seed", "3", "--size", "30",
         "--cache-dir", str(cache), "--output", str(output)]
    )  # fmt: skip
    loaded = load_calibration(output)
    dataset = load_dataset(tree, cache_dir=cache)
    indices = torch.tensor(json.loads(loaded.metadata["indices"]))
    assert loaded.images.shape == (30, 3, 32, 32) and loaded.images.dtype == torch.uint8
    assert torch.equal(loaded.images, dataset.images[indices])  # the loader's own pixels
    assert torch.equal(loaded.labels, dataset.labels[indices])
    _, val = stratified_split(dataset.labels, 40, 3)
    assert not set(indices.tolist()) & set(val.tolist())
    assert json.loads(loaded.metadata["split"]) == {"val_size": 40, "seed": 3}
    assert loaded.metadata["source_sha256"] == dataset.checksum
    assert [p.name for p in output.parent.iterdir()] == [output.name]  # no temporary left


def test_bad_calibration_files_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="not found: make one with"):
        load_calibration(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError, match="unreadable"):
        load_calibration(garbage)
    floats = save_calibration(
        tmp_path / "floats.safetensors", torch.zeros(4, 3, 32, 32), torch.zeros(4), {}
    )
    with pytest.raises(CalibrationError, match=r"not uint8 \(N, 3, 32, 32\)"):
        load_calibration(floats)


def test_the_shipped_calibration_set_is_300_cifar10_training_images() -> None:
    shipped = load_calibration(calibration.DEFAULT_PATH)
    assert shipped.images.shape == (300, 3, 32, 32)
    assert torch.bincount(shipped.labels, minlength=10).tolist() == [30] * 10
    assert json.loads(shipped.metadata["split"]) == {"val_size": 5000, "seed": 0}
    assert json.loads(shipped.metadata["classes"]) == list(CIFAR10_CLASSES)
