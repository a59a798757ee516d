"""``metrics.jsonl`` (one row per step, written by the core) and ``completions.jsonl`` (the
sampled responses of ``train.log_completions``): appended while a run goes, read back and
cut to the checkpoint a run resumes from."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .files import atomic_write_text
from .layout import COMPLETIONS, METRICS


class MetricsFile:
    """The metrics and completions files of the run directory ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None  # the open metrics.jsonl while a run writes it

    def open(self) -> None:
        """Open ``metrics.jsonl`` for the run's rows (appended: a resumed run goes on)."""
        self._file = open(self.path / METRICS, "a")

    def append(self, metrics: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` (NaN and inf written as null), flushed."""
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def lines(self) -> list[tuple[str, dict]]:
        """``(line, row)`` of every line of ``metrics.jsonl``. A torn last line (a crash in
        the middle of writing it) is dropped with a message; a bad line anywhere else (not
        JSON, or not an object with an integer ``step``) is a one-line error naming it."""
        path = self.path / METRICS
        if not path.exists():
            return []
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} cannot be read: {exc}") from None
        lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        out = []
        for k, (number, line) in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if k == len(lines):
                    print(
                        f"tokenmdp: {path} ends in a torn line (a crash while it was written); it is dropped",
                        file=sys.stderr,
                    )
                    break
                raise CheckpointError(f"{path} line {number} is not JSON; the file is damaged") from None
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                got = "an object without an integer step" if isinstance(row, dict) else f"a JSON {_json_kind(row)}"
                raise CheckpointError(
                    f'{path} line {number} is {got}, not a metrics row (an object with "step"); the file is damaged'
                )
            out.append((line, row))
        return out

    def logged_values(self, key: str) -> list[float]:
        """Every logged value of ``key`` (null read as NaN)."""
        return [row[key] if row[key] is not None else float("nan") for _, row in self.lines() if key in row]

    def truncate(self, last_step: int) -> None:
        """Drop metric (and completion) lines written after the checkpoint a run resumes
        from (and a torn last line). Every step up to the checkpoint's must have its row
        (step 0 is the evaluation before training): a deleted or shortened file is a one-line
        error, never a resumed run with a silent hole in its metrics."""
        path = self.path / METRICS
        rows = [(line, row) for line, row in self.lines() if row["step"] <= last_step]
        present = {row["step"] for _, row in rows}
        missing = [step for step in range(last_step + 1) if step not in present]
        if missing:
            state = "is missing" if not path.exists() else f"lacks {len(missing)} of its {last_step + 1} rows"
            raise CheckpointError(
                f"{path} {state} (steps {_ranges(missing)}; the checkpoint is at step {last_step}); restore the "
                "file, or start the run again with --set run.overwrite=true"
            )
        if path.exists():
            atomic_write_text(path, "".join(line + "\n" for line, _ in rows))
        completions = self.path / COMPLETIONS
        if completions.exists():
            kept = []
            for line in completions.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= last_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    break  # a torn last line
            atomic_write_text(completions, "".join(line + "\n" for line in kept))

    def append_completions(self, step: int, rows: list[dict]) -> None:
        """One line of ``completions.jsonl`` per sampled response of ``step``."""
        with open(self.path / COMPLETIONS, "a") as fh:
            for row in rows:
                fh.write(json.dumps({"step": step, **row}) + "\n")


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _ranges(steps: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"`` (at most four ranges, then "...")."""
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    text = [f"{a}-{b}" if b > a else str(a) for a, b in spans[:4]]
    return ", ".join(text) + (", ..." if len(spans) > 4 else "")
