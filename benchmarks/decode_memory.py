"""Peak memory of decoding one large image, by mode, as a multiple of its 8-bit RGB size (width x height x 3 bytes).

    python benchmarks/decode_memory.py [--size 8000] [--json benchmarks/results-...-decode-memory.json]

Each image is written once (mostly flat, so a 9400x9400 16-bit PNG is a few hundred KB, as in issue 18) and then
decoded by `pipeline.decode.decode` (crop preprocessing) in a fresh Python process of its own, which reports its
peak resident memory (Linux's VmHWM; not ``ru_maxrss``, which Linux carries over from the parent across exec) after
decoding minus the same before: the file's bytes, numpy, Pillow and its plugins are loaded before. Pillow keeps RGB,
RGBA, CMYK and the 32-bit modes at 4 bytes a pixel, so an RGB image's own decoded buffer is already 1.33x, and
Pillow's decoded pixels plus one RGB copy are 2.67x for those modes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

CHILD = """
import re, sys, time
from pathlib import Path
from PIL import Image
from pipeline.decode import decode

def peak():
    return int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024

Image.init()
data = open(sys.argv[1], "rb").read()
before = peak()
started = time.perf_counter()
decode(data, "crop")
seconds = time.perf_counter() - started
print(peak() - before, seconds)
"""


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def picture(mode: str, size: tuple[int, int], background, foreground) -> Image.Image:
    """A flat image with a rectangle in the middle: compresses to almost nothing, decodes to full size."""
    image = Image.new(mode, size, background)
    width, height = size
    image.paste(foreground, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image


def palette_transparent(size: tuple[int, int]) -> bytes:
    image = picture("P", size, 0, 1)
    image.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    return encode(image, "PNG", transparency=0)


def png48(size: tuple[int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow writes none), written row by row."""
    width, height = size
    flat = b"\0" + struct.pack(">HHH", 50000, 30000, 10000) * width
    body = zlib.compressobj(9)
    idat = b"".join(body.compress(flat) for _ in range(height)) + body.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rotated_16_bit(size: tuple[int, int]) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(picture("I;16", size, 20000, 50000), "PNG", exif=exif)


def cases(side: int) -> dict[str, tuple[tuple[int, int], Callable[[tuple[int, int]], bytes]]]:
    square = (side, side)
    deflate = {"compression": "tiff_deflate"}
    return {
        "RGB JPEG (reference)": (square, lambda s: encode(picture("RGB", s, (20, 120, 220), (240, 200, 0)), "JPEG")),
        "RGB PNG (reference)": (square, lambda s: encode(picture("RGB", s, (20, 120, 220), (240, 200, 0)), "PNG")),
        "I;16 PNG 9400x9400 (issue 18)": ((9400, 9400), lambda s: encode(picture("I;16", s, 20000, 50000), "PNG")),
        "I;16 PNG": (square, lambda s: encode(picture("I;16", s, 20000, 50000), "PNG")),
        "I;16 PNG, EXIF-rotated": (square, rotated_16_bit),
        "I TIFF (32-bit)": (square, lambda s: encode(picture("I", s, 20000, 50000), "TIFF", **deflate)),
        "F TIFF (32-bit float)": (square, lambda s: encode(picture("F", s, 20.5, 200.5), "TIFF", **deflate)),
        "RGB PNG, 16 bits a channel": (square, png48),
        "RGBA PNG": (square, lambda s: encode(picture("RGBA", s, (20, 120, 220, 255), (240, 200, 0, 100)), "PNG")),
        "LA PNG": (square, lambda s: encode(picture("LA", s, (20, 255), (240, 100)), "PNG")),
        "PA TIFF": (square, lambda s: encode(picture("PA", s, (0, 255), (1, 100)), "TIFF", **deflate)),
        "P PNG with transparency": (square, palette_transparent),
        "P PNG": (square, lambda s: encode(picture("P", s, 0, 1), "PNG")),
        "L PNG": (square, lambda s: encode(picture("L", s, 20, 240), "PNG")),
        "1 PNG": (square, lambda s: encode(picture("1", s, 0, 1), "PNG")),
        "CMYK JPEG": (square, lambda s: encode(picture("CMYK", s, (200, 20, 0, 10), (0, 50, 250, 0)), "JPEG")),
        "CMYK TIFF": (square, lambda s: encode(picture("CMYK", s, (200, 20, 0, 10), (0, 50, 250, 0)), "TIFF")),
        "YCbCr TIFF": (square, lambda s: encode(picture("YCbCr", s, (100, 120, 140), (200, 90, 60)), "TIFF")),
        "LAB TIFF": (square, lambda s: encode(picture("LAB", s, (100, 120, 140), (200, 90, 60)), "TIFF")),
    }


def measure(path: Path) -> tuple[int, float]:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    extra, seconds = done.stdout.split()
    return int(extra), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8000, help="side of the square test images (default 8000)")
    parser.add_argument("--only", nargs="*", help="case names that contain any of these words")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    print(f"{'image':32} {'size':>11} {'file':>9} {'peak extra':>11} {'x WxHx3':>8} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for name, (size, make) in cases(args.size).items():
            if args.only and not any(word.lower() in name.lower() for word in args.only):
                continue
            path = Path(folder) / "image"
            path.write_bytes(make(size))
            extra, seconds = measure(path)
            ratio = extra / (size[0] * size[1] * 3)
            row = {"image": name, "size": list(size), "file_bytes": path.stat().st_size, "peak_extra_bytes": extra}
            results.append({**row, "times_rgb": round(ratio, 2), "seconds": round(seconds, 2)})
            print(
                f"{name:32} {size[0]:>5}x{size[1]:<5} {path.stat().st_size / 1e6:>7.2f}MB "
                f"{extra / 2**20:>8.0f}MiB {ratio:>8.2f} {seconds:>8.2f}"
            )
    if args.json:
        machine = {"python": platform.python_version(), "pillow": Image.__version__, "machine": platform.machine()}
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
