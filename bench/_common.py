"""Shared by the bench scripts: run a config in a throwaway directory, summarise over seeds."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from tokenmdp.config import load_config
from tokenmdp.trainer import Trainer

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
