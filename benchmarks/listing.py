"""Listing an S3 prefix (issue 22): objects/s through fsspec, one recursive listing against folders listed side by
side (`pipeline.sources.find_files`), and the time projected for 100 million objects.

    python benchmarks/listing.py --objects 20000 --folders 40 --delay 0.05 --json benchmarks/results-...-listing.json

moto's S3 server answers on loopback in a few milliseconds, where S3 takes tens of milliseconds per LIST request of
1,000 keys; the fault proxy of the tests (`tests/faults.py`) adds ``--delay`` seconds to every request to stand for
that latency. Both the server's own cost and the added delay are in the numbers; runs with ``--delay 0`` show
moto alone. The projection divides 100M by the measured rate: a real bucket lists at the rate its request latency
and the number of prefixes listed at once allow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.sources import find_files  # noqa: E402
from tests.conftest import moto_server  # noqa: E402
from tests.faults import FaultProxyProcess  # noqa: E402

TARGET = 100_000_000
ROOT_PREFIX = "listing/photos"


def filesystem(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)


def timed(listing, repeat: int) -> dict:
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        found = listing()
        seconds.append(time.perf_counter() - started)
    best = min(seconds)
    return {
        "objects": len(found),
        "seconds": [round(s, 3) for s in seconds],
        "objects_per_second": round(len(found) / best),
        "projected_100m_minutes": round(TARGET / (len(found) / best) / 60, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--folders", type=int, default=40)
    parser.add_argument("--delay", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "objects": args.objects,
        "folders": args.folders,
        "runs": [],
    }
    with moto_server() as endpoint:
        fs = filesystem(endpoint)
        fs.mkdir("listing")
        per_folder = args.objects // args.folders
        started = time.perf_counter()
        for folder in range(args.folders):
            fs.pipe({f"{ROOT_PREFIX}/{folder:04d}/{index:06d}.jpg": b"" for index in range(per_folder)})
        report["upload_seconds"] = round(time.perf_counter() - started, 1)
        for delay in args.delay:
            with FaultProxyProcess(endpoint, delay=delay) as proxy:
                fs = filesystem(proxy.endpoint)
                run = {"delay_s": delay}
                run["one_listing"] = timed(
                    lambda fs=fs: (fs.invalidate_cache(), fs.find(ROOT_PREFIX, detail=True))[1], args.repeat
                )
                run["folders_side_by_side"] = timed(
                    lambda fs=fs: (
                        fs.invalidate_cache(),
                        [info for batch in find_files(fs, ROOT_PREFIX) for info in batch],
                    )[1],
                    args.repeat,
                )
                run["speedup"] = round(
                    run["folders_side_by_side"]["objects_per_second"] / run["one_listing"]["objects_per_second"], 2
                )
                report["runs"].append(run)
                print(json.dumps(run), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
