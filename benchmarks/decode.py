"""Decoding on one CPU core: images per second by source size, where the time goes, and what it means for GPUs.

    python benchmarks/decode.py --json benchmarks/results-...-decode.json

For each source size (JPEG, quality 90, made from the sample photographs) it times `pipeline.decode.decode` (crop
preprocessing to 224) on one core, then the steps one by one: open the header, decode the pixels (with and without
libjpeg's draft scaling), orientation and RGB, resize and crop. The decode-workers-per-GPU rule in
`benchmarks/RESULTS.md` divides a GPU's model rate by the per-core rate measured here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time

from PIL import Image

from pipeline.decode import _draft, decode, fit, open_image, upright_rgb
from pipeline.samples import PHOTOS, photo

SIZES = [(640, 480), (1280, 960), (1920, 1080), (4032, 3024)]


def jpeg(width: int, height: int, index: int) -> bytes:
    image = photo(PHOTOS[index % len(PHOTOS)]).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def rate(function, items: list, seconds: float) -> float:
    """Calls per second of ``function`` over ``items``, cycled for at least ``seconds``."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < len(items):
        function(items[done % len(items)])
        done += 1
    return done / (time.perf_counter() - started)


def steps(data: bytes, use_draft: bool) -> dict[str, float]:
    """Seconds per step for one image."""
    marks = [time.perf_counter()]
    image = open_image(data)
    marks.append(time.perf_counter())
    if use_draft:
        _draft(image, "crop", 224)
    image.load()
    marks.append(time.perf_counter())
    image = upright_rgb(image)
    marks.append(time.perf_counter())
    fit(image, "crop", 224)
    marks.append(time.perf_counter())
    names = ["open header", "decode pixels", "orientation + RGB", "resize + crop"]
    return {name: marks[i + 1] - marks[i] for i, name in enumerate(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    results = {}
    for width, height in SIZES:
        images = [jpeg(width, height, i) for i in range(2)]
        per_image = rate(lambda data: decode(data), images, args.seconds)
        profile = {}
        for use_draft in (True, False):
            totals: dict[str, float] = {}
            runs = 20
            for i in range(runs):
                for name, seconds in steps(images[i % 2], use_draft).items():
                    totals[name] = totals.get(name, 0.0) + seconds / runs
            profile["with draft" if use_draft else "without draft"] = {k: round(v * 1000, 2) for k, v in totals.items()}
        results[f"{width}x{height}"] = {
            "bytes": len(images[0]),
            "images_per_second_per_core": round(per_image, 1),
            "milliseconds_per_step": profile,
        }
        print(f"{width}x{height}: {per_image:.0f} images/s per core; {json.dumps(profile)}", flush=True)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (one used)",
        "command": "python benchmarks/decode.py",
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
