"""Time building the plugin Registry (every Trainer, `tokenmdp plugins` and compare cell does).

    python bench/registry.py [--repeats 7]

Prints the median wall time of ``Registry(plugin_manager())`` over ``--repeats`` builds
(after one warm-up build), one torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmdp.plugin.registry import Registry, plugin_manager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pm = plugin_manager()
    Registry(pm)  # warm-up: imports and the entry-point metadata cache
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        Registry(pm)
        times.append(time.perf_counter() - started)
    print(
        f"Registry build: median {statistics.median(times):.3f} s over {args.repeats} "
        f"(min {min(times):.3f}, max {max(times):.3f}), 1 thread"
    )


if __name__ == "__main__":
    main()
