"""A run directory: what tokenmdp writes there, and reads back on resume.

    config.toml          the resolved config
    reference.pt         the reference model's state_dict (empty for LoRA runs)
    metrics.jsonl        one JSON object per step, written by the core (loggers only add outputs)
    checkpoints/         step_XXXXXXXX.pt, the newest ``run.keep_checkpoints``
    summary.json         at the end
    tensorboard/         the loggers plugin's event files

Every file is written atomically (a temporary name, fsync, rename), so a crash never
leaves half a file under a final name. Only rank 0 of a distributed run calls the writing
methods.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError

CHECKPOINT_DIR = "checkpoints"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
REFERENCE = "reference.pt"
TEMP_MARK = ".tmp-"


class RunDir:
    """The files of one run, under ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._metrics = None  # the open metrics.jsonl while a run writes it

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def holds_run(self) -> bool:
        return (self.path / METRICS).exists()

    # --- a fresh run -----------------------------------------------------------------
    def start_fresh(self, config_text: str, reference_state: dict) -> None:
        """Remove what an earlier run left (metrics, summary, checkpoints, TensorBoard files)
        and write the config and the reference."""
        if self.path.exists():
            self.remove_stale_temp_files()
            for name in (METRICS, SUMMARY, CHECKPOINT_DIR, "tensorboard"):
                path = self.path / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG, config_text)
        atomic_save(reference_state, self.path / REFERENCE)

    def remove_stale_temp_files(self) -> None:
        """Temporary files a killed process left behind (never under a final name)."""
        for folder in (self.path, self.checkpoints):
            for stale in folder.glob(f".*{TEMP_MARK}*"):
                stale.unlink(missing_ok=True)

    # --- checkpoints ------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}.pt"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob("step_*.pt"))
        return found[-1] if found else None

    def save_checkpoint(self, step: int, state: dict, keep: int) -> Path:
        path = self.checkpoint_path(step)
        atomic_save(state, path)
        for old in sorted(self.checkpoints.glob("step_*.pt"))[:-keep]:
            old.unlink()
        return path

    def load_latest_checkpoint(self) -> dict:
        """The newest checkpoint (onto the CPU), for ``--resume``; metric lines written after
        it are dropped."""
        self.remove_stale_temp_files()
        latest = self.latest_checkpoint()
        if latest is None:
            raise ConfigError(f"--resume {str(self.path)!r}: no checkpoint to resume from")
        state = torch.load(latest, weights_only=False, map_location="cpu")
        self.truncate_metrics(state["step"])
        return state

    # --- metrics.jsonl ------------------------------------------------------------------
    def open_metrics(self) -> None:
        self._metrics = open(self.path / METRICS, "a")

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` (NaN and inf written as null), flushed."""
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def close_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def logged_values(self, key: str) -> list[float]:
        """Every logged value of ``key`` (null read as NaN)."""
        path = self.path / METRICS
        if not path.exists():
            return []
        rows = (json.loads(line) for line in path.read_text().splitlines() if line)
        return [row[key] if row[key] is not None else float("nan") for row in rows if key in row]

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metric lines written after the checkpoint a run resumes from."""
        path = self.path / METRICS
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return RunDir(run_dir).latest_checkpoint()


# --- atomic writes ---------------------------------------------------------------------------


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def _write_failed(path: Path, exc: BaseException) -> CheckpointError:
    reason = f"{exc.strerror} (errno {exc.errno})" if isinstance(exc, OSError) and exc.strerror else str(exc)
    kept = (
        f"the existing {path.name} is unchanged"
        if path.exists()
        else f"nothing was written there; the other files in {path.parent} are unchanged"
    )
    return CheckpointError(f"could not write {path}: {reason}; {kept}")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves half a file.
    A failed write (disk full, ...) removes the temporary file and raises CheckpointError."""
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        raise _write_failed(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
