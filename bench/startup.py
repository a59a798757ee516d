"""Start-up of the quick commands: wall seconds of ``tokenmdp --help``, ``plugins``, ``envs``
and ``python -c "import tokenmdp"``, with the plugin catalog current (what a user sees from
the second command on) beside the catalog turned off (``TOKENMDP_CACHE_DIR=off``: every
command loads the plugins, hence torch, as before the catalog), interleaved, as ratios.

    python bench/startup.py               # 5 rounds, the median of each

Each command is a fresh process; the catalog lives in a temporary folder written once
before the first round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "tokenmdp --help": ["--help"],
    "tokenmdp plugins": ["plugins"],
    "tokenmdp envs": ["envs"],
    "import tokenmdp": None,
}


def command_line(args: list[str] | None) -> list[str]:
    if args is None:
        return [sys.executable, "-c", "import tokenmdp"]
    script = Path(sys.executable).with_name("tokenmdp")  # the installed console script
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "tokenmdp", *args]


def seconds(args: list[str] | None, cache: str) -> float:
    env = {**os.environ, "TOKENMDP_CACHE_DIR": cache}
    started = time.perf_counter()
    subprocess.run(command_line(args), env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        seconds(["plugins"], cache)  # writes the catalog
        times = {(name, mode): [] for name in COMMANDS for mode in ("catalog", "off")}
        for _ in range(args.rounds):
            for name, argv in COMMANDS.items():
                times[name, "catalog"].append(seconds(argv, cache))
                times[name, "off"].append(seconds(argv, "off"))
    print(f"median wall seconds of {args.rounds} rounds, each a fresh process ({os.cpu_count()} cores)")
    print(f"{'command':<18} {'catalog':>8} {'off':>8} {'off/catalog':>12}")
    for name in COMMANDS:
        fast, slow = statistics.median(times[name, "catalog"]), statistics.median(times[name, "off"])
        print(f"{name:<18} {fast:>8.3f} {slow:>8.3f} {slow / fast:>11.2f}x")


if __name__ == "__main__":
    main()
