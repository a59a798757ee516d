"""Shared by the bench scripts: run a config in a throwaway directory, summarise over seeds."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tokenmdp.config import load_config
from tokenmdp.training.trainer import Trainer

#: 64 responses of 5 tokens: the full-size toy target of issues 3 and 4.
TOKENS_PER_STEP = 64 * 5


def run(config_path: str, overrides: list[str]) -> tuple[dict, object, list[dict]]:
    """Train ``config_path`` with ``overrides``; returns (summary, config, evaluation rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(config_path, [*overrides, f"run.dir={tmp}", "train.progress=false"])
        summary = Trainer(config).train()
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        return summary, config, [r for r in rows if "regret_frac" in r]


def spread(values: list[float | None], fmt: str = "{:.3f}") -> str:
    """``median [min, max]`` of the values that exist; ``-`` when none do."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def threshold_parser(doc: str, parts: list[str]) -> argparse.ArgumentParser:
    """The options every threshold bench shares: --seeds, --part (one of ``parts`` or all),
    --envs (unset: each part's own) and --threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--part", choices=[*parts, "all"], default="all")
    parser.add_argument("--envs", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def start(args: argparse.Namespace) -> float:
    """Pin torch's thread count, print it with the seeds, and return the start time."""
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, seeds: {args.seeds}")
    return time.perf_counter()
