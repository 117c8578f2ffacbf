"""model.preprocessing against known answers: the resize rule at any aspect ratio (issue 14,
kind 1), and an image's path to model input end to end (issue 18): transparency over white,
16-bit samples scaled, the centre crop, CIFAR-10's normalisation constants.

Every expected value is worked out by hand from the README's rules, never by calling the
code under test: the service's tests compare it with `image_to_tensor`, so a mistake here
would show nowhere else."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocessing import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    image_to_tensor,
    normalize,
    resize_and_crop,
)
from tests.support.tools import PROJECT_ROOT


def rule_2(image: Image.Image, size: int = 32) -> Image.Image:
    """docs/api.md's rule 2 written out plainly: resize the short side to 32 (bicubic,
    antialiased), keeping the aspect ratio, then take the centre 32x32."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth(width: int, height: int, seed: int) -> Image.Image:
    """A photograph-like picture: slow colour waves along both axes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        127.5
        + 120
        * np.sin(
            2 * np.pi * (rng.uniform(0.5, 3) * x / width + rng.uniform(0.5, 3) * y / height)
            + rng.uniform(0, 6)
        )
        for _ in range(3)
    ]
    return Image.fromarray(np.stack(channels, -1).round().astype(np.uint8))


def _normal_sizes() -> list[tuple[int, int]]:
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 64), (64, 1), (31, 33), (33, 31), (45, 37), (400, 300), (7, 400)]
    sizes += [(int(w), int(h)) for w, h in rng.integers(1, 500, (40, 2))]
    return [(w, h) for w, h in sizes if max(w, h) / min(w, h) <= 64]


@pytest.mark.parametrize("size", _normal_sizes(), ids=str)
def test_up_to_64_to_1_the_rule_is_pillows_resize_then_the_crop_exactly(
    size: tuple[int, int],
) -> None:
    image = noise(*size, seed=sum(size))
    assert np.array_equal(np.asarray(resize_and_crop(image)), np.asarray(rule_2(image)))


@pytest.mark.parametrize(
    "size",
    [(1, 65), (1, 3000), (3, 5000), (7, 1000), (31, 2500), (33, 2500), (60, 4000), (100, 7000)],
    ids=str,
)
def test_beyond_64_to_1_the_crop_comes_first_with_the_same_result(
    size: tuple[int, int],
) -> None:
    """The same operation without the huge intermediate: equal to rule 2 but for rounding
    (a level or two on smooth pictures), for tall and wide images alike."""
    for width, height in (size, size[::-1]):
        image = smooth(width, height, seed=width * 7 + height)
        got = np.asarray(resize_and_crop(image), dtype=np.int16)
        expected = np.asarray(rule_2(image), dtype=np.int16)
        assert got.shape == (32, 32, 3)
        assert np.abs(got - expected).max() <= 2, (width, height)
        assert np.abs(got - expected).mean() < 0.1, (width, height)


def test_a_1x2000000_image_needs_no_big_intermediate() -> None:
    """Rule 2 taken literally would build a 32x64,000,000 RGB image (6 GB) for it. Peak
    memory is measured in a fresh process, around the call alone."""
    script = textwrap.dedent(
        """
        import resource, sys
        from PIL import Image
        from model.preprocessing import image_to_tensor
        image = Image.new("L", (1, 2_000_000), 77)
        image.putpixel((0, 1_000_000), 200)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pixels = image_to_tensor(image)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert tuple(pixels.shape) == (3, 32, 32)
        print((after - before) // 1024)  # MiB (ru_maxrss is in KiB on Linux)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert int(result.stdout.strip()) < 64, result.stdout


# --- Known answers, end to end (issue 18) -------------------------------------------------

# CIFAR-10's per-channel mean and standard deviation of the training images, as published
# (and used by torchvision's CIFAR examples); the README's rule 3 quotes the same numbers.
PUBLISHED_MEAN = (0.4914, 0.4822, 0.4465)
PUBLISHED_STD = (0.2470, 0.2435, 0.2616)


def model_input(image: Image.Image) -> torch.Tensor:
    """What the model is given for one image: float32 (3, 32, 32)."""
    return normalize(image_to_tensor(image).unsqueeze(0))[0]


def normalised(rgb: tuple[int, int, int]) -> list[float]:
    """(c / 255 - mean) / std per channel, with the published constants."""
    return [(c / 255 - m) / s for c, m, s in zip(rgb, PUBLISHED_MEAN, PUBLISHED_STD, strict=True)]


def test_the_normalisation_constants_are_cifar10s_published_ones() -> None:
    assert (CIFAR10_MEAN, CIFAR10_STD) == (PUBLISHED_MEAN, PUBLISHED_STD)
    # Black and white, worked out: -0.4914 / 0.2470 = -1.98947, (1 - 0.4914) / 0.2470 =
    # 2.05911; green -1.98029, 2.12649; blue -1.70680, 2.11583.
    pixels = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    got = normalize(pixels)
    assert got.dtype == torch.float32 and got.shape == (1, 3, 1, 2)
    expected = [-1.98947, 2.05911, -1.98029, 2.12649, -1.70680, 2.11583]  # R, G, B
    assert got.flatten().tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_fully_transparent_image_is_white_to_the_model(mode: str) -> None:
    """Alpha 0 over black pixels: white, 255 in every channel, then normalised as white
    (over black it would be 0, and normalise to about -2)."""
    image = Image.new(mode, (40, 40), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    pixels = image_to_tensor(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
    assert pixels.unique().tolist() == [255]
    got = model_input(image)
    for channel, value in enumerate(normalised((255, 255, 255))):
        assert got[channel].unique().tolist() == pytest.approx([value], abs=1e-5)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        # round((c * 128 + 255 * 127) / 255): 0 -> 32385 / 255 = 127 exactly;
        # 100 -> 45185 / 255 = 177.2 -> 177; 255 -> 65025 / 255 = 255 exactly.
        # (Over black: 0, 50, 128.)
        ("RGBA", (0, 100, 255, 128), (127, 177, 255)),
        # grey 60: (7680 + 32385) / 255 = 157.1 -> 157 in all three channels.
        ("LA", (60, 128), (157, 157, 157)),
    ],
)
def test_half_transparent_pixels_are_blended_with_white_exactly(
    mode: str, colour: tuple[int, ...], expected: tuple[int, int, int]
) -> None:
    image = Image.new(mode, (40, 40), colour)  # resized to 32x32: a flat colour stays exact
    pixels = image_to_tensor(image)
    assert [pixels[c].unique().tolist() for c in range(3)] == [[v] for v in expected]
    got = model_input(image)
    for channel, value in enumerate(normalised(expected)):
        assert got[channel].unique().tolist() == pytest.approx([value], abs=1e-5)


# 16-bit samples and their 8-bit values, round(v / 65535 * 255): 257 is exactly 1,
# 1000 -> 3.89 -> 4, 32768 -> 127.502 -> 128. Clipped at 255 (PIL's own convert), every
# value above 255 would be white.
SIXTEEN_BIT = {0: 0, 257: 1, 1000: 4, 32768: 128, 65535: 255}


@pytest.mark.parametrize("source", ["in memory", "PNG file"])
def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(source: str) -> None:
    samples = np.array(list(SIXTEEN_BIT), np.uint16)
    image = Image.fromarray(np.tile(samples, (32, 7))[:, :32])  # 32x32: no resampling
    if source == "PNG file":
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode == "I;16"
    pixels = image_to_tensor(image)
    expected = np.tile(np.array(list(SIXTEEN_BIT.values()), np.uint8), 7)[:32]
    for channel in range(3):  # grey: the same in R, G and B
        assert pixels[channel].tolist() == [expected.tolist()] * 32


@pytest.mark.parametrize("size", [(96, 32), (32, 96), (4096, 32), (32, 4096)], ids=str)
def test_the_centre_32x32_is_what_the_model_sees(size: tuple[int, int]) -> None:
    """A short side of 32 needs no resampling, so the crop is the centre window exactly:
    each pixel is coded with its own position (red: x, green: y, blue: 256s), and the
    output holds x from (width - 32) / 2, y from (height - 32) / 2. 4096 takes the path
    that crops before resampling (beyond 64:1)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    coded = np.stack([x % 256, y % 256, x // 256 + y // 256], axis=-1).astype(np.uint8)
    pixels = image_to_tensor(Image.fromarray(coded)).permute(1, 2, 0).numpy()
    left, top = (width - 32) // 2, (height - 32) // 2
    assert np.array_equal(pixels, coded[top : top + 32, left : left + 32])


@pytest.mark.parametrize("tall", [False, True], ids=["wide", "tall"])
def test_a_marked_centre_region_of_a_big_image_fills_the_crop(tall: bool) -> None:
    """640x320, blue, with the region the crop maps back to painted red: x from 160 to 480
    (resized by 1/10 to 64x32, the crop is x 16 to 48). Inside the crop everything is red but
    the two outer columns, which the filter blends with the blue just outside, alike on both
    sides; a crop one pixel off to either side would break that symmetry."""
    marked = np.zeros((320, 640, 3), np.uint8)
    marked[..., 2] = 255
    marked[:, 160:480] = (255, 0, 0)
    if tall:
        marked = marked.transpose(1, 0, 2)
    pixels = image_to_tensor(Image.fromarray(marked)).permute(1, 2, 0).numpy()
    if tall:
        pixels = pixels.transpose(1, 0, 2)
    assert (pixels[:, 1:31] == (255, 0, 0)).all()
    assert np.array_equal(pixels[:, 0], pixels[:, 31])
    assert (pixels[:, 0, 0] < 255).all() and (pixels[:, 0, 2] > 0).all()  # a blend of both
