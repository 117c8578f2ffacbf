"""Data sources, the decoded-image cache, the stratified split and batched augmentation.

Every source is generated here, small: class-folder trees of PNG/JPEG files, tar archives
of them, and a folder in torchvision's `cifar-10-batches-py` format. Each class has its own
colour, so a decoded image can be matched back to the class it was written for.
"""

from __future__ import annotations

import pickle
import random
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image

from model import data as data_module
from model.data import augment, cutout, load_dataset, random_crop, random_flip, stratified_split
from model.preprocessing import CIFAR10_CLASSES, image_to_tensor

# Well separated colours, one per class (at most ten classes in these tests).
PALETTE = np.array(
    [
        (220, 40, 40),
        (40, 200, 40),
        (40, 40, 220),
        (230, 220, 40),
        (220, 40, 220),
        (40, 220, 220),
        (250, 250, 250),
        (10, 10, 10),
        (240, 140, 20),
        (120, 60, 200),
    ],
    dtype=np.int16,
)
NOISE = 20  # per-pixel noise amplitude: images differ, classes stay far apart


def class_pixels(
    label: int, rng: np.random.Generator, size: tuple[int, int] = (32, 32)
) -> np.ndarray:
    """An H x W x 3 uint8 image: the class colour plus uniform noise."""
    width, height = size
    noise = rng.integers(-NOISE, NOISE + 1, size=(height, width, 3))
    return np.clip(PALETTE[label] + noise, 0, 255).astype(np.uint8)


def write_class_tree(
    root: Path,
    classes: Sequence[str],
    per_class: int,
    *,
    suffix: str = ".png",
    seed: int = 0,
    creation_order: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Write `root/<class>/<i><suffix>` images; class i gets PALETTE[i]'s colour.

    `creation_order` creates the folders in another order than `classes`, so tests can
    show that the loader does not depend on the file system's listing order. Returns the
    pixels written, keyed by the path relative to `root`.
    """
    rng = np.random.default_rng(seed)
    written: dict[str, np.ndarray] = {}
    for name in creation_order or classes:
        label = list(classes).index(name)
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = class_pixels(label, rng)
            relative = f"{name}/{i:03d}{suffix}"
            Image.fromarray(pixels).save(root / relative, quality=95)
            written[relative] = pixels
    return written


def nearest_class(image: torch.Tensor) -> int:
    """The palette index closest to a decoded (3, H, W) image's mean colour."""
    mean = image.double().mean(dim=(1, 2)).numpy()
    return int(np.argmin(((PALETTE - mean) ** 2).sum(axis=1)))


def assert_labels_match_colours(dataset: data_module.Dataset, classes: Sequence[str]) -> None:
    """Each image's label names the class whose colour it was written with."""
    for image, label in zip(dataset.images, dataset.labels, strict=True):
        written_as = classes[nearest_class(image)]
        assert dataset.classes[int(label)] == written_as


def make_archive(path: Path, tree: Path, top_level: str | None) -> Path:
    """A tar (gzip-compressed for .gz/.tgz) of `tree`'s class folders, optionally inside
    one top-level folder, plus files that are not training images."""
    mode: Literal["w:gz", "w"] = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as archive:
        for file in sorted(tree.rglob("*")):
            relative = file.relative_to(tree).as_posix()
            arcname = f"{top_level}/{relative}" if top_level else relative
            archive.add(file, arcname=arcname, recursive=False)
        readme = tree.parent / "README.txt"
        readme.write_text("not an image")
        archive.add(readme, arcname="README.txt")
    return path


def write_cifar_batches(root: Path, per_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A `cifar-10-batches-py` folder in torchvision's format (pickled dicts whose `data`
    rows are the R, G and B planes of a 32x32 image). Returns each batch's H x W x 3 images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images: dict[str, np.ndarray] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, size=per_batch).tolist()
        pixels = np.stack([class_pixels(label, rng) for label in labels])
        batch = {
            "batch_label": name,
            "labels": labels,
            "data": pixels.transpose(0, 3, 1, 2).reshape(per_batch, 3072),
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
        images[name] = pixels
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, handle)
    return images


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


# --- Sources ------------------------------------------------------------------------------


def test_png_tree_decodes_pixels_exactly(tmp_path: Path) -> None:
    classes = ("circle", "square", "triangle")
    written = write_class_tree(tmp_path / "tree", classes, per_class=4)
    dataset = load_dataset(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert dataset.images.shape == (12, 3, 32, 32) and dataset.images.dtype == torch.uint8
    assert dataset.labels.dtype == torch.int64
    # Not CIFAR-10's names: alphabetical order.
    assert dataset.classes == classes
    # PNG is lossless: every written image comes back exactly, under its folder's label.
    decoded = {
        hwc(image).tobytes(): int(label)
        for image, label in zip(dataset.images, dataset.labels, strict=True)
    }
    for relative, pixels in written.items():
        assert decoded[pixels.tobytes()] == classes.index(relative.split("/")[0])


def test_cifar_class_names_follow_cifar10_order(tmp_path: Path) -> None:
    # Folders (and archive members) created in a shuffled order: the labels must not
    # depend on the order in which the file system or the archive lists them.
    shuffled = list(CIFAR10_CLASSES)
    random.Random(3).shuffle(shuffled)
    assert shuffled != list(CIFAR10_CLASSES)
    write_class_tree(tmp_path / "tree", CIFAR10_CLASSES, 2, creation_order=shuffled)
    with tarfile.open(tmp_path / "shuffled.tar", "w") as archive:
        for name in shuffled:
            for file in sorted((tmp_path / "tree" / name).iterdir()):
                archive.add(file, arcname=f"{name}/{file.name}")
    for source in (tmp_path / "tree", tmp_path / "shuffled.tar"):
        dataset = load_dataset(source, cache_dir=tmp_path / "cache")
        assert dataset.classes == CIFAR10_CLASSES
        assert_labels_match_colours(dataset, CIFAR10_CLASSES)
        # The cached copy keeps the order too.
        cached = load_dataset(source, cache_dir=tmp_path / "cache")
        assert cached.classes == CIFAR10_CLASSES
        assert torch.equal(cached.labels, dataset.labels)


def test_jpeg_tree_keeps_each_class_colour(tmp_path: Path) -> None:
    classes = ("a", "b", "c")
    write_class_tree(tmp_path / "tree", classes, 3, suffix=".jpg")
    dataset = load_dataset(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert dataset.images.shape == (9, 3, 32, 32)
    assert dataset.classes == classes
    # JPEG is lossy, but each image keeps its class colour.
    assert_labels_match_colours(dataset, classes)


def test_other_sizes_and_modes_use_the_services_preprocessing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    translucent = Image.fromarray(class_pixels(1, rng, size=(40, 40))).convert("RGBA")
    translucent.putalpha(128)
    odd = {
        "wide.png": Image.fromarray(class_pixels(0, rng, size=(64, 40))),
        "grey.png": Image.fromarray(class_pixels(1, rng)[:, :, 0], mode="L"),
        "translucent.png": translucent,
    }
    (tmp_path / "tree" / "only").mkdir(parents=True)
    for name, image in odd.items():
        image.save(tmp_path / "tree" / "only" / name)
    dataset = load_dataset(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert dataset.images.shape == (3, 3, 32, 32) and dataset.classes == ("only",)
    # Training sees exactly what the service would feed the model for the same file.
    decoded = {hwc(image).tobytes() for image in dataset.images}
    for name in odd:
        with Image.open(tmp_path / "tree" / "only" / name) as image:
            assert hwc(image_to_tensor(image)).tobytes() in decoded


@pytest.mark.parametrize(
    ("archive_name", "top_level"),
    [("mini.tar.gz", "cifar-mini"), ("mini.tar", None), ("mini.tgz", "train")],
)
def test_archive_matches_the_folder_it_was_made_from(
    tmp_path: Path, archive_name: str, top_level: str | None
) -> None:
    classes = ("cat", "dog", "frog")
    write_class_tree(tmp_path / "tree", classes, per_class=3)
    archive = make_archive(tmp_path / archive_name, tmp_path / "tree", top_level)
    from_archive = load_dataset(archive, cache_dir=tmp_path / "cache")
    from_folder = load_dataset(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert from_archive.classes == from_folder.classes == classes
    assert len(from_archive) == 9  # README.txt is skipped

    def pairs(dataset: data_module.Dataset) -> set[tuple[bytes, int]]:
        return {
            (image.numpy().tobytes(), int(label))
            for image, label in zip(dataset.images, dataset.labels, strict=True)
        }

    assert pairs(from_archive) == pairs(from_folder)
    assert from_archive.checksum != from_folder.checksum  # two sources, two cache entries


def test_torchvision_folder_either_level_and_both_splits(tmp_path: Path) -> None:
    written = write_cifar_batches(tmp_path / "cifar", per_batch=4)
    train = load_dataset(tmp_path / "cifar", cache_dir=tmp_path / "cache")
    inner = load_dataset(tmp_path / "cifar" / "cifar-10-batches-py", cache_dir=tmp_path / "cache")
    test = load_dataset(tmp_path / "cifar", cifar_split="test", cache_dir=tmp_path / "cache")
    assert train.classes == test.classes == CIFAR10_CLASSES
    assert len(train) == 20 and len(test) == 4
    expected_train = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)])
    assert np.array_equal(train.images.permute(0, 2, 3, 1).numpy(), expected_train)
    assert np.array_equal(test.images.permute(0, 2, 3, 1).numpy(), written["test_batch"])
    assert torch.equal(inner.images, train.images) and torch.equal(inner.labels, train.labels)
    assert_labels_match_colours(train, CIFAR10_CLASSES)
    assert train.checksum != test.checksum  # the splits must not share a cache entry


def test_missing_empty_unsupported_and_corrupt_sources(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", cache_dir=cache)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        load_dataset(tmp_path / "empty", cache_dir=cache)
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match="unsupported data source"):
        load_dataset(tmp_path / "data.zip", cache_dir=cache)
    write_class_tree(tmp_path / "tree", ("a", "b"), 1)
    (tmp_path / "tree" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        load_dataset(tmp_path / "tree", cache_dir=cache)


# --- Cache --------------------------------------------------------------------------------


def test_second_load_reuses_the_cache_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_class_tree(tmp_path / "tree", ("a", "b"), 3)
    first = load_dataset(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def no_decoding(data: bytes, name: str) -> torch.Tensor:
        raise AssertionError(f"decoded {name} again")

    monkeypatch.setattr(data_module, "_decode", no_decoding)
    second = load_dataset(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert torch.equal(second.images, first.images)
    assert torch.equal(second.labels, first.labels)
    assert second.classes == first.classes and second.checksum == first.checksum


def test_changed_source_is_decoded_again(tmp_path: Path) -> None:
    write_class_tree(tmp_path / "tree", ("a", "b"), 3)
    first = load_dataset(tmp_path / "tree", cache_dir=tmp_path / "cache")
    # A user fixes one image in place: the stale cache must not be used.
    replacement = np.full((32, 32, 3), 7, dtype=np.uint8)
    Image.fromarray(replacement).save(tmp_path / "tree" / "a" / "000.png")
    second = load_dataset(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert second.checksum != first.checksum
    assert any(np.array_equal(hwc(image), replacement) for image in second.images)
    assert not any(np.array_equal(hwc(image), replacement) for image in first.images)


def test_torchvision_folder_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar_batches(tmp_path / "cifar", per_batch=2)
    first = load_dataset(tmp_path / "cifar", cache_dir=tmp_path / "cache")

    def no_unpickling(*args: object) -> None:
        raise AssertionError("read the batches again")

    monkeypatch.setattr(data_module, "_load_cifar_batches", no_unpickling)
    second = load_dataset(tmp_path / "cifar", cache_dir=tmp_path / "cache")
    assert torch.equal(second.images, first.images) and second.classes == CIFAR10_CLASSES


# --- Stratified split -----------------------------------------------------------------------


def test_split_has_exact_per_class_counts_and_is_disjoint() -> None:
    labels = torch.arange(10).repeat_interleave(50)  # sorted by class, as a folder loads
    train, val = stratified_split(labels, val_size=50, seed=0)
    assert torch.bincount(labels[val], minlength=10).tolist() == [5] * 10
    assert torch.bincount(labels[train], minlength=10).tolist() == [45] * 10
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(500))
    # Training takes `--limit` images from the front of `train`: a random sample, not the
    # first class only.
    assert len(labels[train[:20]].unique()) > 3


@pytest.mark.parametrize(
    ("val_size", "per_class"),
    [
        # Exact shares 8.0 / 4.8 / 3.2: rounded down, 15; the one left over goes to the
        # largest remainder, class 1.
        (16, [8, 5, 3]),
        # 6.5 / 3.9 / 2.6: rounded down, 11; two left over, to classes 1 (0.9) and 2 (0.6),
        # not to class 0, the biggest class, whose remainder (0.5) is the smallest.
        (13, [6, 4, 3]),
    ],
)
def test_split_rounds_uneven_classes_by_largest_remainders(
    val_size: int, per_class: list[int]
) -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, val = stratified_split(labels, val_size=val_size, seed=1)
    assert len(val) == val_size and len(train) == 100 - val_size
    assert torch.bincount(labels[val], minlength=3).tolist() == per_class


def test_split_is_seeded() -> None:
    labels = torch.arange(4).repeat(25)
    same = [stratified_split(labels, 20, seed=7) for _ in range(2)]
    other = stratified_split(labels, 20, seed=8)
    assert torch.equal(same[0][1], same[1][1]) and torch.equal(same[0][0], same[1][0])
    assert not torch.equal(same[0][1], other[1])


def test_split_bounds() -> None:
    labels = torch.arange(3).repeat(4)
    train, val = stratified_split(labels, 0, seed=0)
    assert len(val) == 0 and sorted(train.tolist()) == list(range(12))
    for bad in (-1, 12):
        with pytest.raises(ValueError, match="val-size"):
            stratified_split(labels, bad, seed=0)


# --- Augmentation ---------------------------------------------------------------------------


def random_batch(n: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Values 1..255: a zero in the output can only come from padding or cutout.
    return torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_keeps_shape_and_dtype_and_is_reproducible() -> None:
    images = random_batch()
    first = augment(images, generator(5), cutout_size=8)
    again = augment(images, generator(5), cutout_size=8)
    other = augment(images, generator(6), cutout_size=8)
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, images)


def test_augment_with_everything_off_is_identity() -> None:
    images = random_batch()
    out = augment(images, generator(0), crop_padding=0, flip=False, cutout_size=0)
    assert torch.equal(out, images)


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    images = random_batch(16)
    cropped = random_crop(images, padding=4, generator=generator(1))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    shifts = set()
    for image, window in zip(padded, cropped, strict=True):
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(image[:, dy : dy + 32, dx : dx + 32], window)
        ]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 4  # each image gets its own offset


def test_random_flip_mirrors_about_half() -> None:
    images = random_batch(200)
    flipped = random_flip(images, generator(2))
    mirrored = [not torch.equal(a, b) for a, b in zip(images, flipped, strict=True)]
    for image, out, was_mirrored in zip(images, flipped, mirrored, strict=True):
        assert torch.equal(out, image.flip(2) if was_mirrored else image)
    assert 60 < sum(mirrored) < 140


@pytest.mark.parametrize("size", [5, 7])
def test_cutout_zeroes_one_square_per_image(size: int) -> None:
    images = random_batch(64)
    out = cutout(images, size, generator(3))
    full_squares = 0
    for image, result in zip(images, out, strict=True):
        zeroed = (result == 0).all(dim=0)
        assert (result == 0).any(dim=0).eq(zeroed).all()  # all channels together
        assert torch.equal(result[:, ~zeroed], image[:, ~zeroed])  # the rest untouched
        rows, cols = zeroed.any(dim=1).nonzero(), zeroed.any(dim=0).nonzero()
        height, width = len(rows), len(cols)
        # One axis-aligned rectangle, at most size x size (smaller where it leaves the image).
        assert 1 <= height <= size and 1 <= width <= size
        assert zeroed.sum() == height * width
        assert int(rows[-1] - rows[0]) + 1 == height and int(cols[-1] - cols[0]) + 1 == width
        full_squares += height == width == size
    assert full_squares > 16  # most centres are far enough from the border


def test_cutout_even_size_is_size_by_size() -> None:
    images = random_batch(64)
    out = cutout(images, 8, generator(3))
    largest = max(int((result == 0).all(dim=0).sum()) for result in out)
    assert largest == 64
