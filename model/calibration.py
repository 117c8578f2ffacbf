"""Calibration images for post-training INT8 quantization (NNCF), made once and shipped.

    python -m model.calibration --data ../shared/data/cifar10-train-jpeg.tar.gz \\
        --val-size 5000 --seed 0 --size 300 --output weights/cifar10-calibration.safetensors

NNCF's post-training quantization runs a few hundred representative inputs through the
network to choose the INT8 range of every activation. Those inputs must be what the service
feeds the model, so they are training images decoded by `model.data.load_dataset` through
`model.preprocessing` (the service's rule), kept as the uint8 (N, 3, 32, 32) pixels the
exported graph takes. They come from the *training* part of the same seeded split that
`model.train` and `model.evaluate` use (`--val-size`, `--seed`), never from the validation
images the INT8 accuracy is measured on: `size` of them, in proportion per class (30 of
each CIFAR-10 class for 300), chosen with the same seed.

The file is small (3,072 bytes an image: 0.9 MB for 300) and is committed beside the
weights, because the service needs it where the training data is not (the Docker image has
no data set). The service reads it only when it quantizes, i.e. on the first start with
`--precision int8` for a given weights file; its SHA-256 is part of the cache key of the
quantized model, so new calibration images give a new quantized model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.files import write_atomically
from model.preprocessing import IMAGE_SIZE
from model.weights import sha256_of

DEFAULT_PATH = (
    Path(__file__).resolve().parent.parent / "weights" / "cifar10-calibration.safetensors"
)
DEFAULT_SIZE = 300  # NNCF's default subset_size; its guide suggests 300 samples


_HOW_TO_MAKE = (
    "make one with `python -m model.calibration --data <CIFAR-10 training data>` or set the "
    "calibration path"
)


class CalibrationError(RuntimeError):
    """The calibration file cannot be used; the message says why and how to make one."""


@dataclass(frozen=True)
class CalibrationSet:
    """uint8 images (N, 3, 32, 32), their int64 labels (N) and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    metadata: dict[str, str]


def calibration_indices(
    labels: torch.Tensor, val_size: int, seed: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration indices, validation indices) into `labels`.

    The validation indices are `model.data.stratified_split(labels, val_size, seed)`'s;
    the `size` calibration indices are drawn from its training part only, each class in
    proportion (the same stratified draw, seeded with `seed`). Raises ValueError when
    `size` is not smaller than the training part.
    """
    from model.data import stratified_split

    train, val = stratified_split(labels, val_size, seed)
    if not 0 < size < len(train):
        raise ValueError(f"--size must be in [1, {len(train)}), got {size}")
    _, picked = stratified_split(labels[train], size, seed)
    return train[picked].sort().values, val


def save_calibration(
    path: Path, images: torch.Tensor, labels: torch.Tensor, metadata: dict[str, str]
) -> Path:
    """Write a calibration set as safetensors (images, labels; metadata in the header),
    atomically: a temporary name beside `path`, then a rename."""
    tensors = {"images": images.contiguous(), "labels": labels.contiguous()}
    return write_atomically(Path(path), lambda temporary: save_file(tensors, temporary, metadata))


def calibration_sha256(path: Path) -> str:
    """The hex SHA-256 of a calibration file (part of the quantized model's cache key);
    raises CalibrationError when there is no such file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration images {path} not found: {_HOW_TO_MAKE}")
    return sha256_of(path)


def load_calibration(path: Path) -> CalibrationSet:
    """Read and check a calibration file; raises CalibrationError naming the fix."""
    path = Path(path).expanduser()
    make = _HOW_TO_MAKE
    if not path.is_file():
        raise CalibrationError(f"calibration images {path} not found: {make}")
    try:
        with safe_open(path, "pt") as handle:
            images = handle.get_tensor("images")
            labels = handle.get_tensor("labels")
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CalibrationError(
            f"calibration images {path} are unreadable ({error}): {make}"
        ) from None
    shape = (3, IMAGE_SIZE, IMAGE_SIZE)
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise CalibrationError(
            f"calibration images {path} hold {images.dtype} {tuple(images.shape)}, not uint8 "
            f"(N, {', '.join(map(str, shape))}): {make}"
        )
    if len(images) == 0 or len(labels) != len(images):
        raise CalibrationError(f"calibration images {path} are empty or unlabelled: {make}")
    return CalibrationSet(images, labels, metadata)


def main(argv: list[str] | None = None) -> Path:
    from model.data import load_dataset

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="training data, as model.train takes it")
    parser.add_argument("--val-size", type=int, default=5000, help="as in model.train")
    parser.add_argument("--seed", type=int, default=0, help="as in model.train")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="calibration images")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded-image cache")
    parser.add_argument("--output", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)

    dataset = load_dataset(args.data, cache_dir=args.cache_dir)
    try:
        picked, val = calibration_indices(dataset.labels, args.val_size, args.seed, args.size)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    assert not set(picked.tolist()) & set(val.tolist())  # by construction; cheap to be sure
    metadata = {
        "source": Path(dataset.source).name,
        "source_sha256": dataset.checksum,
        "split": json.dumps({"val_size": args.val_size, "seed": args.seed}),
        "classes": json.dumps(list(dataset.classes)),
        "indices": json.dumps(picked.tolist()),  # into the source, in load_dataset's order
    }
    path = save_calibration(args.output, dataset.images[picked], dataset.labels[picked], metadata)
    counts = torch.bincount(dataset.labels[picked], minlength=len(dataset.classes)).tolist()
    print(
        f"wrote {path}: {len(picked)} training images (per class {counts}), none of the "
        f"{len(val)} validation images of --val-size {args.val_size} --seed {args.seed}"
    )
    return path


if __name__ == "__main__":
    main()
