"""The one place where an image becomes model input, shared by training and serving.

Training (`model.data`) and the service (`service.images`) both import from here, so the
class order, the normalisation constants and the resize rule cannot drift apart.

The rule for an arbitrary image (documented in docs/api.md, "How an image becomes model input"):
1. Any mode becomes 8-bit RGB. Transparency in any form (alpha channel, premultiplied
   alpha, PNG tRNS colour key, transparent palette entries) is composited over white;
   16-bit greyscale is scaled down to 8 bits (not clipped); CMYK, palette and the rest use
   PIL's own conversion.
2. The shorter side is resized to 32 pixels with an antialiased bicubic filter, keeping
   the aspect ratio; then the centre 32x32 square is cropped. A 32x32 image is untouched.
   Beyond an aspect ratio of 64:1 only the region that maps onto the 32x32 output is
   resampled (see `resize_and_crop`), so a 1x100,000 image costs what a small one does.
3. The uint8 pixels are scaled to [0, 1] and normalised with the CIFAR-10 channel means
   and standard deviations below (done on whole batches, on the model's device).

At test time the model may also see each image's mirror image (`model.inference`).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageFile

# CIFAR-10's label order (Krizhevsky 2009, batches.meta). Folder trees whose sub-folders
# carry these names are indexed in this order, whatever order the file system lists them.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

IMAGE_SIZE = 32

# Per-channel statistics of the CIFAR-10 training images, the usual published values.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """Straight (unassociated) alpha composited over white, exactly rounded:
    out = round((c * a + 255 * (255 - a)) / 255). rgb uint8 (H, W, 3), alpha uint8 (H, W).

    In uint16, one channel at a time: c * a + 255 * (255 - a) + 127 <= 65152, so nothing
    overflows, and the temporaries stay at 2 bytes per pixel."""
    a = alpha.astype(np.uint16)
    white = 255 - a
    white *= 255
    white += 127  # rounds the division below to nearest (no sum is a half multiple of 255)
    out = np.empty(rgb.shape, np.uint8)
    for channel in range(3):
        value = rgb[..., channel].astype(np.uint16)
        value *= a
        value += white
        value //= 255
        out[..., channel] = value
    return Image.fromarray(out, "RGB")


def _premultiplied_over_white(pixels: np.ndarray) -> Image.Image:
    """Premultiplied (associated) alpha over white: out = c' + (255 - a), where c' = c * a
    already (Porter and Duff 1984, "over"). pixels uint8 (H, W, 4) RGBa or (H, W, 2) La."""
    pixels = pixels.astype(np.int32)
    colour = pixels[..., :3] if pixels.shape[-1] == 4 else np.repeat(pixels[..., :1], 3, -1)
    out = colour + (255 - pixels[..., -1:])
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def _rawmode(image: Image.Image) -> str | None:
    """The raw mode of the pending decode (None once loaded, and for an image built in
    memory, which has no decode): what the file stores, which the decoded mode does not
    always say (16-bit samples, premultiplied alpha)."""
    if not isinstance(image, ImageFile.ImageFile) or not image.tile:
        return None
    args = image.tile[0].args
    if not args:  # a decoder that takes no raw mode
        return None
    return str(args if isinstance(args, str) else args[0])


def _stored_premultiplied(image: ImageFile.ImageFile) -> np.ndarray:
    """A file with premultiplied alpha (TIFF ExtraSamples = 1) that Pillow would decode to
    straight RGBA by dividing by alpha, losing precision: decode the stored values instead,
    by the plain raw mode. Call before the image is loaded."""
    plain = {"RGBa": "RGBA", "La": "LA"}
    tiles = []
    for tile in image.tile:
        args = tile.args
        if isinstance(args, str):
            args = plain[args]
        elif args:
            args = (plain[args[0]], *args[1:])
        tiles.append(tile._replace(args=args))
    image.tile = tiles
    return np.asarray(image)


def _sixteen_bit_rgb(image: ImageFile.ImageFile) -> np.ndarray:
    """A 16-bit RGB PNG's samples as uint16 (H, W, 3); call before the image is loaded.

    Pillow decodes 16-bit RGB to the high byte of each sample ("RGB;16B"). The low bytes
    come from decoding the same data once more with the little-endian raw mode
    ("RGB;16L"), which takes the other byte of each big-endian sample."""
    if image.fp is None:
        raise ValueError("read a 16-bit image's samples before it is loaded (its file is closed)")
    image.fp.seek(0)
    twin = Image.open(io.BytesIO(image.fp.read()), formats=["PNG"])
    twin.tile = [tile._replace(args="RGB;16L") for tile in twin.tile]
    high = np.asarray(image).astype(np.uint16)
    return (high << 8) | np.asarray(twin).astype(np.uint16)


def _colour_key_transparent(image: Image.Image, key: int | tuple[int, ...]) -> np.ndarray:
    """Where a PNG tRNS colour key makes pixels transparent: bool (H, W).

    The key holds raw samples at the file's bit depth, which Pillow's decoded pixels do not
    always have: 2- and 4-bit grey are scaled up to 8 bits, 16-bit RGB is cut to its high
    bytes. The bit depth is read from the raw mode of the pending decode, so this must run
    before the image is loaded (a loaded image is taken to be 8-bit)."""
    rawmode = _rawmode(image)
    if image.mode == "RGB":
        if rawmode == "RGB;16B" and isinstance(image, ImageFile.ImageFile):
            return np.all(_sixteen_bit_rgb(image) == np.asarray(key, np.uint16), axis=-1)
        return np.all(np.asarray(image) == np.asarray(key, np.int64), axis=-1)
    if image.mode in ("L", "1"):
        assert isinstance(key, int), "Pillow reads a grey colour key as one sample"
        bits = {"L;2": 2, "L;4": 4}.get(str(rawmode), 8)
        if bits < 8:
            key = int(key) * 255 // (2**bits - 1)  # e.g. 2-bit grey 1 is decoded as 85
        return np.asarray(image.convert("L")) == key
    return np.asarray(image) == key  # I;16 and I: Pillow keeps every bit


def _opaque_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's convert() clips 16/32-bit values at 255; scale them instead.
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        pixels = np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if pixels.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (rule 1 in the module docstring).

    Transparency in every form is composited over white:
    - an alpha channel: RGBA, LA, PA, and palettes with alpha (tRNS table, RGBA palette);
    - premultiplied alpha (RGBa, La, e.g. TIFF with associated alpha);
    - a colour key (PNG tRNS in L, RGB, 1-, 2-, 4- and 16-bit greyscale, 16-bit RGB, and a
      transparent palette index, as in GIF): matching pixels become white.
    16-bit alpha is used at 8 bits (its high byte), as Pillow decodes it.

    Load the image here rather than before: a 16-bit or low-bit-depth colour key is read
    at the file's own bit depth, which Pillow's decoded pixels do not keep.
    """
    key = image.info.get("transparency")
    if image.mode == "RGB" and key is None:
        return image
    if (
        isinstance(image, ImageFile.ImageFile)
        and image.mode in ("RGBA", "LA")
        and _rawmode(image) in ("RGBa", "La")
    ):
        return _premultiplied_over_white(_stored_premultiplied(image))
    if image.mode in ("RGBa", "La"):
        return _premultiplied_over_white(np.asarray(image))
    palette_alpha = image.mode == "P" and (
        key is not None or getattr(image.palette, "mode", "") == "RGBA"
    )
    if image.mode in ("RGBA", "LA", "PA") or palette_alpha:
        rgba = np.asarray(image if image.mode == "RGBA" else image.convert("RGBA"))
        return _over_white(rgba[..., :3], rgba[..., 3])
    if key is not None and image.mode in ("1", "L", "RGB", "I;16", "I;16B", "I;16L", "I"):
        transparent = _colour_key_transparent(image, key)
        rgb = np.asarray(_opaque_to_rgb(image))
        return Image.fromarray(np.where(transparent[..., None], np.uint8(255), rgb), "RGB")
    return _opaque_to_rgb(image)


# Above this many pixels the resized-but-uncropped image of rule 2 is not built: only an
# extreme aspect ratio gets there (a 1x100,000 image would need 32x3,200,000 pixels).
# 65,536 is a 32x2048 strip, i.e. aspect ratios up to 64:1 take the plain path.
_FULL_RESIZE_LIMIT = 32 * 2048
# Pillow's bicubic kernel reaches 2 samples either side, scaled by the step when shrinking.
_BICUBIC_SUPPORT = 2.0


def resize_and_crop(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Resize the short side to `size` (antialiased bicubic), then centre-crop (rule 2).

    Work and memory stay proportional to the input, whatever its aspect ratio. Up to an
    aspect ratio of 64:1 this is literally rule 2: Pillow's resize, then the crop. Beyond,
    the resized image would be huge (32 x 3.2 million pixels for a 1x100,000 image), so
    the crop comes first: the source region that the centre window reads (the window
    mapped back onto the source, plus the filter's reach) is cut out and resampled straight
    onto the window, with the same filter, scale and sample positions (Pillow's `box`).
    That is the same operation; it differs from rule 2 only in rounding (Pillow keeps a
    box in float32 and rounds its two passes to 8 bits in its own order): at most 2 levels
    on the smooth pictures of tests/model/test_preprocessing.py, which checks both paths.

    Args:
        image: any size; resampled in its own mode (`image_to_tensor` passes RGB).
        size: the side of the square output, in pixels.

    Returns:
        A `size` x `size` image of the same mode.
    """
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_width = max(size, round(width * scale))
    new_height = max(size, round(height * scale))
    left = (new_width - size) // 2
    top = (new_height - size) // 2
    if new_width * new_height <= _FULL_RESIZE_LIMIT:
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC, reducing_gap=None)
        return image.crop((left, top, left + size, top + size))
    # The output window in source coordinates (the sample positions of rule 2)...
    step_x, step_y = width / new_width, height / new_height
    x0, x1 = left * step_x, (left + size) * step_x
    y0, y1 = top * step_y, (top + size) * step_y
    # ...and every source pixel its samples read (one pixel of margin for rounding).
    reach_x = _BICUBIC_SUPPORT * max(step_x, 1.0) + 1
    reach_y = _BICUBIC_SUPPORT * max(step_y, 1.0) + 1
    region = (
        max(0, math.floor(x0 - reach_x)),
        max(0, math.floor(y0 - reach_y)),
        min(width, math.ceil(x1 + reach_x)),
        min(height, math.ceil(y1 + reach_y)),
    )
    box = (x0 - region[0], y0 - region[1], x1 - region[0], y1 - region[1])
    return image.crop(region).resize(
        (size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None
    )


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode and size -> uint8 tensor of shape (3, 32, 32)."""
    image = resize_and_crop(to_rgb(image))
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with the CIFAR-10 mean and std (rule 3).

    Runs on whatever device `images` is on, so training normalises on the GPU and the
    service on its engine's device.
    """
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean) / std
