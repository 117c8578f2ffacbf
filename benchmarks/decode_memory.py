"""Peak memory and time of decoding one image of `max_pixels`, as the service decodes it.

    python -m benchmarks.decode_memory                 # 5000x5000: RGB PNG, RGB JPEG, RGBA PNG
    python -m benchmarks.decode_memory --side 2000

Each case runs `service.images.decode_image` in a fresh process (so that one case's peak
does not hide the next one's), on a file written beforehand by another process, and prints
the growth of the process's peak resident memory (ru_maxrss) across the call: what one
decode thread holds at most for such an image. docs/api.md's Limits section quotes it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

_WRITE = """
import sys
import numpy as np
from PIL import Image
kind, side, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if kind == "RGBA PNG":  # alpha in every value 0..255, so compositing does real work
    pixels = np.zeros((side, side, 4), np.uint8)
    pixels[..., 0] = 200
    pixels[..., 3] = (np.arange(side) % 256).astype(np.uint8)
    Image.fromarray(pixels, "RGBA").save(path, "PNG")
else:
    Image.new("RGB", (side, side), (10, 120, 200)).save(path, kind.split()[1])
"""

_MEASURE = """
import resource, sys, time
from pathlib import Path
from service.images import Upload, decode_image
data = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
decode_image(Upload("x", data), 10**9)
seconds = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(data), (after - before) // 1024, f"{seconds:.2f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=5000, help="width = height, pixels")
    args = parser.parse_args()
    print(f"{args.side}x{args.side} = {args.side**2:,} pixels")
    print(f"{'image':<10} {'file bytes':>12} {'peak MiB':>9} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("RGB PNG", "RGB JPEG", "RGBA PNG"):
            path = Path(folder) / kind.replace(" ", ".")
            subprocess.run([sys.executable, "-c", _WRITE, kind, str(args.side), path], check=True)
            out = subprocess.run(
                [sys.executable, "-c", _MEASURE, path], check=True, capture_output=True, text=True
            ).stdout.split()
            print(f"{kind:<10} {int(out[0]):>12,} {int(out[1]):>9} {out[2]:>8}")


if __name__ == "__main__":
    main()
