"""model.preprocessing: the resize rule at any aspect ratio (issue 14, kind 1)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from model.preprocessing import resize_and_crop
from tests.support.tools import PROJECT_ROOT


def rule_2(image: Image.Image, size: int = 32) -> Image.Image:
    """The README's rule 2 written out plainly: resize the short side to 32 (bicubic,
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
