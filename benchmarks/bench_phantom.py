"""Phantom generation speed: images/s at several sizes, and store size on disk per 1000 images.

python benchmarks/bench_phantom.py [--patients 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from edmcli.data.phantom import generate_patient
from edmcli.data.prepare import prepare_phantom
from edmcli.data.store import directory_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=25)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        generate_patient(0, 0, size)  # warm caches
        start = time.perf_counter()
        for p in range(args.patients):
            generate_patient(0, p, size)
        generate_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "p.zarr"
            start = time.perf_counter()
            prepare_phantom(out, args.patients, size, 0, (0.8, 0.1, 0.1))
            prepare_s = time.perf_counter() - start
            disk = directory_size(out)
        n = 4 * args.patients
        rows.append(
            {
                "size": size,
                "images": n,
                "generate_images_per_s": n / generate_s,
                "prepare_images_per_s": n / prepare_s,
                "mib_per_1000_images": disk / 2**20 * 1000 / n,
            }
        )
    print(f"{'size':>6} {'generate img/s':>15} {'prepare img/s':>14} {'MiB/1000 img':>13}")
    for r in rows:
        print(
            f"{r['size']:>6} {r['generate_images_per_s']:>15.1f} "
            f"{r['prepare_images_per_s']:>14.1f} {r['mib_per_1000_images']:>13.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
