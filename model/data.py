"""CIFAR-10 data: load any source into a uint8 tensor cache, split it, augment whole batches.

Sources accepted by `load_dataset` (and so by `--data` in training and evaluation):
- torchvision's CIFAR-10 folder (`cifar-10-batches-py`, or the folder that contains it);
  `download=True` fetches it with torchvision where there is internet;
- a folder tree with one sub-folder of images per class;
- a `.tar` / `.tar.gz` / `.tgz` of such a tree, with or without one top-level folder around
  the class folders (`../shared/data/cifar10-train-jpeg.tar.gz` is one).

Images are decoded once, through `model.preprocessing` (the rule the service uses too),
into a uint8 tensor saved as safetensors under the cache folder, keyed by the SHA-256 of
the source; a second run loads it in a second instead of decoding 50,000 files again.

Augmentation (airbench-style) runs on whole batches as tensor ops on the training device,
because two CPU cores cannot feed a per-image PIL pipeline in DataLoader workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.files import write_atomically
from model.preprocessing import CIFAR10_CLASSES, image_to_tensor
from model.weights import sha256_of

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CACHE_FORMAT = "1"  # bump when the decoded representation changes


@dataclass
class Dataset:
    """Decoded images (uint8, N x 3 x 32 x 32), labels (int64, N), class names, provenance."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str
    checksum: str  # SHA-256 of the source (file bytes; for a folder, its paths and bytes)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> Dataset:
        return Dataset(
            self.images[indices],
            self.labels[indices],
            self.classes,
            self.source,
            self.checksum,
        )


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnet-cifar10"


# --- Source detection and checksums ----------------------------------------------------


def _cifar_batches_dir(path: Path) -> Path | None:
    """The `cifar-10-batches-py` folder at or directly under `path`, if there is one."""
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return candidate
    return None


def _sha256_tree(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        digest.update(file.read_bytes())  # images are small
    return digest.hexdigest()


def _class_order(names: set[str]) -> tuple[str, ...]:
    """CIFAR-10's order when the names are CIFAR-10's classes; alphabetical otherwise."""
    if names == set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(sorted(names))


# --- Decoders, one per source type -----------------------------------------------------


def _decode(data: bytes, name: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image_to_tensor(image)
    except Exception as error:  # PIL raises several types; name the file either way
        raise ValueError(f"cannot decode image {name!r}: {error}") from error


def _stack(
    samples: list[tuple[str, torch.Tensor]], where: str
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    if not samples:
        raise ValueError(
            f"no images found in {where}: expected one sub-folder per class holding "
            f"{', '.join(IMAGE_SUFFIXES)} files"
        )
    classes = _class_order({name for name, _ in samples})
    index = {name: i for i, name in enumerate(classes)}
    images = torch.stack([tensor for _, tensor in samples])
    labels = torch.tensor([index[name] for name, _ in samples], dtype=torch.int64)
    return images, labels, classes


def _image_files(root: Path) -> list[Path]:
    """Every image below `root`, in a stable order (the checksum depends on it)."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _load_folder(
    root: Path, files: list[Path]
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    samples = [(file.parent.name, _decode(file.read_bytes(), str(file))) for file in files]
    return _stack(samples, str(root))


def _load_archive(path: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    samples: list[tuple[str, torch.Tensor]] = []
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            parts = Path(member.name).parts
            if len(parts) < 2:
                continue  # an image at the archive's top level has no class folder
            handle = archive.extractfile(member)
            assert handle is not None
            samples.append((parts[-2], _decode(handle.read(), member.name)))
    return _stack(samples, str(path))


def _load_cifar_batches(
    folder: Path, split: str
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    arrays, labels = [], []
    for name in names:
        # The official CIFAR-10 python batches are pickles; there is no other format for
        # them. Only read files you trust (torchvision does the same).
        with open(folder / name, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        arrays.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels"])
    images = torch.from_numpy(np.concatenate(arrays))
    return images, torch.tensor(labels, dtype=torch.int64), CIFAR10_CLASSES


# --- Public entry point ----------------------------------------------------------------


def load_dataset(
    source: str | Path,
    *,
    cifar_split: str = "train",
    download: bool = False,
    cache_dir: Path | None = None,
) -> Dataset:
    """Load `source` (see the module docstring), decoding only on the first call.

    `cifar_split` picks torchvision's `train` (data_batch_1-5) or `test` (test_batch)
    batches; it is ignored for folder trees and archives.
    """
    path = Path(source).expanduser()
    if download and _cifar_batches_dir(path) is None:
        import torchvision  # only needed to fetch, where there is internet

        torchvision.datasets.CIFAR10(str(path), train=cifar_split == "train", download=True)
    if not path.exists():
        raise FileNotFoundError(
            f"data source {str(path)!r} does not exist: pass a cifar-10-batches-py folder, a "
            "folder with one sub-folder per class, or a .tar/.tar.gz of such folders"
        )

    cifar_dir = _cifar_batches_dir(path) if path.is_dir() else None
    folder_files: list[Path] = []
    if cifar_dir is not None:
        names = (
            [f"data_batch_{i}" for i in range(1, 6)] if cifar_split == "train" else ["test_batch"]
        )
        checksum = _sha256_tree(cifar_dir, [cifar_dir / name for name in names])
    elif path.is_dir():
        folder_files = _image_files(path)
        checksum = _sha256_tree(path, folder_files)
    elif path.name.lower().endswith(ARCHIVE_SUFFIXES):
        checksum = sha256_of(path)
    else:
        raise ValueError(
            f"unsupported data source {str(path)!r}: "
            "expected a folder or a .tar/.tar.gz/.tgz archive"
        )

    cache_file = (cache_dir or default_cache_dir()) / f"{checksum}-v{CACHE_FORMAT}.safetensors"
    if cache_file.is_file():
        tensors = load_file(cache_file)
        with safe_open(cache_file, "pt") as handle:  # class names live in the header metadata
            metadata = handle.metadata()
        classes = tuple(json.loads(metadata["classes"]))
        return Dataset(tensors["images"], tensors["labels"], classes, str(path), checksum)

    if cifar_dir is not None:
        images, labels, classes = _load_cifar_batches(cifar_dir, cifar_split)
    elif path.is_dir():
        images, labels, classes = _load_folder(path, folder_files)
    else:
        images, labels, classes = _load_archive(path)

    tensors = {"images": images.contiguous(), "labels": labels}
    metadata = {"classes": json.dumps(list(classes)), "source": str(path)}
    # Atomically: a killed run never leaves half a cache.
    write_atomically(cache_file, lambda temporary: save_file(tensors, temporary, metadata))
    return Dataset(images, labels, classes, str(path), checksum)


# --- Validation split ------------------------------------------------------------------


def stratified_split(
    labels: torch.Tensor, val_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split into (train, validation) indices, each class in proportion.

    Every class gives val_size * class_count / N images (largest remainders round), so a
    5,000-image split of CIFAR-10 holds exactly 500 per class, as in He et al.'s 45k/5k.
    """
    if not 0 <= val_size < len(labels):
        raise ValueError(f"--val-size must be in [0, {len(labels)}), got {val_size}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    shuffled = labels[order]
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * val_size / len(labels)
    quota = exact.floor().long()
    leftover = val_size - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True)[:leftover]] += 1
    val_parts = [order[shuffled == cls][: int(n)] for cls, n in zip(classes, quota, strict=True)]
    val = torch.cat(val_parts).sort().values
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val] = True
    train = order[~is_val[order]]  # keeps the seeded shuffle, so --limit takes a random subset
    return train, val


# --- Batched augmentation on the device --------------------------------------------------


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop after zero-padding by `padding` pixels (He et al. 2015 §4.2)."""
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
    rows = (dy[:, None] + torch.arange(height, device=images.device))[:, :, None]  # n, h, 1
    cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, :]  # n, 1, w
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing around a slice puts the indexed dims first: (n, h, w, c).
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one random `size` x `size` square per image (DeVries & Taylor 2017)."""
    n, _, height, width = images.shape
    cy = torch.randint(0, height, (n, 1, 1), device=images.device, generator=generator)
    cx = torch.randint(0, width, (n, 1, 1), device=images.device, generator=generator)
    ys = torch.arange(height, device=images.device)[None, :, None]
    xs = torch.arange(width, device=images.device)[None, None, :]
    # Offsets -size//2 .. size - size//2 - 1: exactly `size` pixels for odd and even sizes.
    half = size // 2
    inside = (
        (ys - cy >= -half) & (ys - cy < size - half) & (xs - cx >= -half) & (xs - cx < size - half)
    )
    return images.masked_fill(inside[:, None], 0)


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    cutout_size: int = 0,
) -> torch.Tensor:
    """The training augmentation on a uint8 batch: crop, flip, optional cutout."""
    if crop_padding > 0:
        images = random_crop(images, crop_padding, generator)
    if flip:
        images = random_flip(images, generator)
    if cutout_size > 0:
        images = cutout(images, cutout_size, generator)
    return images
