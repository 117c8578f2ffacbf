"""Pictures for the tests: random noise in any PIL mode, saved in any format."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def image_bytes(image: Image.Image, fmt: str, **save: Any) -> bytes:
    """`image` saved as `fmt` (a PIL format name: "PNG", "JPEG", ...) with PIL's `save`
    options, as the bytes of a file."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A random picture: distinct seeds give distinct predictions from the test model."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


def png(seed: int = 0, width: int = 40, height: int = 36) -> bytes:
    """A PNG file of `noise_image(width, height, seed)`."""
    return image_bytes(noise_image(width, height, seed), "PNG")
