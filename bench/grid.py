"""Wall time of a whole `tokenmdp compare` grid, serial against parallel, and whether the
tables agree.

    python bench/grid.py                                  # the demo grid: --jobs 1, then --jobs 2
    python bench/grid.py --grid configs/compare.toml --jobs 2 --skip-serial

Each run writes into its own temporary folder, so nothing is resumed or shared between
them (the reference cache included). Cells run with 1 torch thread each in both modes
(the serial run pins it in its process), so their numbers are the same floats.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(grid: Path, out: Path, jobs: int) -> tuple[float, list[dict]]:
    from tokenmdp.reports.compare import load_grid, run_grid

    started = time.perf_counter()
    run_grid(load_grid(grid, out=str(out)), progress=False, jobs=jobs, threads=1)
    seconds = time.perf_counter() - started
    with open(out / "results.csv") as fh:
        rows = [{k: v for k, v in row.items() if "wall" not in k} for row in csv.DictReader(fh)]
    return seconds, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=ROOT / "configs" / "compare_demo.toml")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-serial", action="store_true", help="time the parallel run only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, grid {args.grid.name}, 1 thread per cell")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parallel_s, parallel_rows = run(args.grid, tmp / "parallel", args.jobs)
        print(f"--jobs {args.jobs}: {parallel_s:.1f} s ({parallel_s / 60:.1f} min)", flush=True)
        if args.skip_serial:
            return 0
        serial_s, serial_rows = run(args.grid, tmp / "serial", 1)
        print(f"--jobs 1: {serial_s:.1f} s ({serial_s / 60:.1f} min)")
        print(
            f"speed-up {serial_s / parallel_s:.2f}x; tables identical but wall seconds: {serial_rows == parallel_rows}"
        )
        for serial, parallel in zip(serial_rows, parallel_rows):
            if serial != parallel:  # what differs, cell by cell
                print({k: (serial.get(k), parallel.get(k)) for k in serial if serial.get(k) != parallel.get(k)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
