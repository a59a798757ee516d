"""A run directory: what tokenmdp writes there (``layout``), and reads back on resume.

Every file is written atomically (``files``), so a crash never leaves half a file under a
final name. Only rank 0 of a distributed run calls the writing methods.

A folder is tokenmdp's only when it holds the ``.tokenmdp-run`` marker: in a folder without
it, every file is the user's whatever its name (a ``config.toml`` of their own included), so
tokenmdp never rewrites or deletes it, ``run.overwrite`` or not.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import sys
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from .checkpoints import checksum_path, read_checkpoint, shard_checksums, write_checkpoint
from .files import atomic_save, atomic_write_bytes, atomic_write_text, exclusive_lock, temp_name, write_failed
from .layout import (
    CHECKPOINT_DIR,
    COMPLETIONS,
    CONFIG,
    EVAL_COMPLETIONS,
    LOCK,
    MARKER,
    METRICS,
    OWN_FILES,
    OWN_FOLDERS,
    REFERENCE,
    SAVED_FOLDERS,
    SUMMARY,
    is_own_shards,
    is_own_temp,
    is_saved_temp,
    is_temp_of,
    shards_of,
)
from .metrics_file import MetricsFile
from .paths import leading_comments


class RunDir:
    """The files of one run, under ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        #: ``metrics.jsonl`` and ``completions.jsonl``.
        self.metrics = MetricsFile(self.path)
        #: The folders of SAVED_FOLDERS this run writes (objects given to tokenmdp.train): in a
        #: folder without the marker, an existing one is the user's, so the run is refused.
        self.saves: tuple[str, ...] = ()

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def is_marked(self) -> bool:
        """Whether tokenmdp started a run here (the folder holds the ``.tokenmdp-run`` marker)."""
        return (self.path / MARKER).is_file()

    def holds_run(self) -> bool:
        """Whether the folder holds a run worth keeping: tokenmdp's, with a checkpoint or a
        summary. A marked folder with neither (a run killed before its first checkpoint)
        has nothing to resume, so a fresh run simply replaces its files."""
        return self.is_marked() and (self.latest_checkpoint() is not None or (self.path / SUMMARY).is_file())

    # --- start-up checks --------------------------------------------------------------
    def check_usable(self, resume: bool, overwrite: bool) -> None:
        """The folder can take the run, checked before anything is built: its nearest existing
        folder is writable, it is not a file, and a resumed run has a checkpoint there while a
        fresh one has nothing to lose (:meth:`check_fresh`)."""
        where = str(self.path)
        parent = next((p for p in [self.path, *self.path.absolute().parents] if p.exists()), None)
        if parent is not None and parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"run.dir {where!r}: {parent} is not writable, so the run could not be saved")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run.dir {where!r} is a file, not a folder; name a folder for the run")
        if resume:
            if self.latest_checkpoint() is None:
                raise ConfigError(self.no_checkpoint_message())
        else:
            self.check_fresh(overwrite)

    def check_fresh(self, overwrite: bool) -> None:
        """A fresh run needs a folder with nothing to lose: new, empty, or tokenmdp's own
        (the marker) without a run worth keeping; ``run.overwrite`` replaces such a run. In a
        folder without the marker every file is the user's: a name the run would write is
        refused even with ``run.overwrite``, and any other file needs it."""
        where = str(self.path)
        if self.holds_run() and not overwrite:
            raise ConfigError(
                f"run.dir {where!r} already holds a run; use --resume {self.path}, "
                "--set run.overwrite=true, or another run.dir"
            )
        clashes = self.clashes()
        if clashes:
            raise ConfigError(clash_message(self.path, clashes))
        foreign = [] if overwrite else self.foreign()
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ConfigError(
                f"run.dir {where!r} holds files tokenmdp did not write ({shown}); use an empty or new "
                "folder, or --set run.overwrite=true (which never removes or rewrites a file tokenmdp did not write)"
            )

    # --- a fresh run -----------------------------------------------------------------
    def foreign(self) -> list[str]:
        """What is in the folder that tokenmdp did not write (relative paths, sorted). In a
        folder without the marker that is everything, whatever the names (only the lock
        file, which a run takes before it writes the marker, is tokenmdp's)."""
        if not self.path.is_dir():
            return []
        found = []
        marked = self.is_marked()
        for entry in sorted(self.path.iterdir()):
            if entry.name in (LOCK, MARKER) and entry.is_file() or is_temp_of(entry, (MARKER,)):
                continue
            if marked and (entry.name in OWN_FILES and entry.is_file() or is_own_temp(entry) or is_saved_temp(entry)):
                continue
            pattern = OWN_FOLDERS.get(entry.name) or SAVED_FOLDERS.get(entry.name)
            if pattern is not None and entry.is_dir():
                found += [
                    f"{entry.name}/{f.name}"
                    for f in sorted(entry.iterdir())
                    if not (
                        marked
                        and (f.is_file() and (re.fullmatch(pattern, f.name) or is_own_temp(f)) or is_own_shards(f))
                    )
                ]
                continue
            found.append(entry.name + ("/" if entry.is_dir() else ""))
        return found

    def clashes(self) -> list[str]:
        """Files of a folder without the marker under names a run writes (``config.toml``,
        ``metrics.jsonl``, ``checkpoints/step_*.pt``, ...): a run there would replace the
        user's files, so it is refused, ``run.overwrite`` or not."""
        if not self.path.is_dir() or self.is_marked():
            return []
        found = []
        for entry in sorted(self.path.iterdir()):
            pattern = OWN_FOLDERS.get(entry.name)
            if entry.name == LOCK and entry.is_file() or is_temp_of(entry, (MARKER,)):
                continue
            if entry.name in OWN_FILES or pattern is not None and not entry.is_dir() or is_own_temp(entry):
                found.append(entry.name + ("/" if entry.is_dir() else ""))
            elif pattern is not None:
                found += [
                    f"{entry.name}/{f.name}"
                    for f in sorted(entry.iterdir())
                    if re.fullmatch(pattern, f.name) or is_own_temp(f)
                ]
            elif entry.name in self.saves:  # the run would put the given model/tokenizer there
                found.append(entry.name + ("/" if entry.is_dir() else ""))
        return found

    def _write_marker(self) -> None:
        atomic_write_text(self.path / MARKER, json.dumps({"tokenmdp": "run directory", "version": 1}) + "\n")

    def claim(self) -> None:
        """Write the marker, so that the folder is tokenmdp's from the start of a fresh run
        (a run killed at any point after this can be rerun without ``overwrite``). Refused
        where a file of the user's has a name the run writes."""
        clashes = self.clashes()
        if clashes:
            raise ConfigError(clash_message(self.path, clashes))
        self._write_marker()

    def start_fresh(self, config_text: str, reference_state: dict, staged: dict[str, Path] | None = None) -> None:
        """Remove what an earlier run left, only files tokenmdp writes (metrics, summary,
        checkpoints, TensorBoard events, explain pages, saved models and tokenizers), then
        write the marker, the config and the reference, and move the ``staged`` folders
        (:meth:`stage`: the objects given to ``tokenmdp.train``) into place. Anything else in
        the folder is left as it is; in a folder without the marker nothing is removed (and a
        file under a name the run writes refuses it)."""
        staged = dict(staged or {})
        if not self.is_marked():
            self.claim()
        else:
            self.remove_stale_temp_files(keep=set(staged.values()))
            for name in (METRICS, COMPLETIONS, SUMMARY, "compare.json"):
                (self.path / name).unlink(missing_ok=True)
            self._remove_own_folder_files()
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        for name, folder in staged.items():
            try:
                os.replace(folder, self.path / name)
            except OSError as exc:
                raise write_failed(self.path / name, exc) from exc
        atomic_write_text(self.path / CONFIG, config_text)
        atomic_save(reference_state, self.path / REFERENCE)

    def stage(self, name: str, write) -> Path:
        """Write folder ``name`` of SAVED_FOLDERS under a temporary name (``write(folder)``,
        e.g. a model's ``save_pretrained``); :meth:`start_fresh` moves it into place, so it is
        there whole or not at all. Staged before the run builds its models (peft wraps a
        given model in place)."""
        tmp = temp_name(self.path / name)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_failed(self.path / name, exc) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def record_resume(self, config_text: str, reference_state: dict | None) -> None:
        """A resumed run's config.toml holds its ``--set`` overrides (so a later plain
        resume continues the same run), and a deleted reference.pt is written again (the
        reference is rebuilt exactly: the same seed, the same SFT; the caller computes
        ``reference_state`` only then, else None). A run made before the marker existed is
        adopted (its checkpoint shows it is tokenmdp's)."""
        if not self.is_marked():
            self._write_marker()
        # the comments the run started with (how its paths were typed) stay on top
        atomic_write_text(self.path / CONFIG, leading_comments(self.path / CONFIG) + config_text)
        if not (self.path / REFERENCE).exists() and reference_state is not None:
            atomic_save(reference_state, self.path / REFERENCE)

    def discard(self, remove_folder: bool) -> None:
        """Undo a run that failed before its first checkpoint: remove every file tokenmdp
        wrote there (so the folder can be rerun without ``overwrite``) and, when the run
        created the folder, the folder itself if nothing else is left in it. A folder without
        the marker holds nothing of tokenmdp's but the lock file."""
        if not self.is_marked():
            (self.path / LOCK).unlink(missing_ok=True)
            if remove_folder and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()
            return
        self.remove_stale_temp_files()
        for name in OWN_FILES:
            (self.path / name).unlink(missing_ok=True)
        self._remove_own_folder_files()
        if remove_folder and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def _remove_own_folder_files(self) -> None:
        """The files tokenmdp wrote in its own folders (checkpoints, TensorBoard, explain,
        a given model or tokenizer), and each folder once it is empty; anything else in them
        stays."""
        for folder, pattern in {**OWN_FOLDERS, **SAVED_FOLDERS}.items():
            if (self.path / folder).is_dir():
                for f in (self.path / folder).iterdir():
                    if f.is_file() and re.fullmatch(pattern, f.name):
                        f.unlink()
                    elif folder == CHECKPOINT_DIR and is_own_shards(f):
                        shutil.rmtree(f)
                if not any((self.path / folder).iterdir()):
                    (self.path / folder).rmdir()

    def checkpoint_steps(self) -> list[int]:
        """The steps that have a checkpoint, in order."""
        return sorted(int(p.stem.split("_")[1]) for p in self.checkpoints.glob("step_*.pt"))

    def remove_stale_temp_files(self, keep: set[Path] = frozenset()) -> None:
        """Temporary files a killed tokenmdp process left behind (never under a final name;
        only names tokenmdp's atomic writes use), and folders it staged; not those in ``keep``."""
        for folder in (self.path, self.checkpoints):
            if folder.is_dir():
                for stale in folder.iterdir():
                    if stale in keep:
                        continue
                    if is_own_temp(stale):
                        stale.unlink(missing_ok=True)
                    elif is_saved_temp(stale):
                        shutil.rmtree(stale, ignore_errors=True)
                    elif is_own_shards(stale) and not stale.with_suffix(".pt").is_file():
                        # shards being written, or renamed just before the kill took their .pt
                        shutil.rmtree(stale, ignore_errors=True)

    @contextlib.contextmanager
    def locked(self):
        """Hold the run directory's exclusive lock (``fcntl.flock`` on ``.tokenmdp.lock``)
        while the block runs: a second trainer, resume or compare cell on it is a one-line
        error. The operating system releases the lock when the process ends, however it
        ends, so a lock file left by a killed process is stale and simply taken over."""
        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.path / LOCK, "tokenmdp", f"run.dir {str(self.path)!r}", "use another run.dir"):
            yield

    # --- checkpoints ------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}.pt"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob("step_*.pt"))
        return found[-1] if found else None

    def new_shards_folder(self, step: int) -> Path:
        """An empty folder, under a temporary name, for the shards of step ``step``'s checkpoint."""
        folder = temp_name(shards_of(self.checkpoint_path(step)))
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise write_failed(folder, exc) from exc
        return folder

    def save_checkpoint(self, step: int, state: dict, keep: int, shards: Path | None = None) -> Path:
        """The checkpoint of ``step`` (with its checksum), then only the newest ``keep``. A
        sharded run's ``shards`` folder (:meth:`new_shards_folder`, written by every rank)
        takes its final name first, and the ``.pt`` file records its files' checksums: the
        checkpoint is whole once the ``.pt`` file and its checksum exist, as for any run."""
        path = self.checkpoint_path(step)
        if shards is not None:
            final = shards_of(path)
            shutil.rmtree(final, ignore_errors=True)  # a killed save of the same step
            os.replace(shards, final)
            state = {**state, "shards": {"dir": final.name, "files": shard_checksums(final)}}
        write_checkpoint(path, state)
        for old in sorted(self.checkpoints.glob("step_*.pt"))[:-keep]:
            old.unlink()
            checksum_path(old).unlink(missing_ok=True)
            shutil.rmtree(shards_of(old), ignore_errors=True)
        return path

    def load_latest_checkpoint(self, whole: bool = True) -> dict:
        """The newest good checkpoint (onto the CPU), for ``--resume``. A corrupt one (bad
        checksum, truncated, not loadable, non-finite weights) is reported and skipped for
        the one before it. Metric lines written after the checkpoint used are dropped."""
        self.remove_stale_temp_files()
        found = sorted(self.checkpoints.glob("step_*.pt"))
        if not found:
            raise ConfigError(self.no_checkpoint_message())
        for path in reversed(found):
            try:
                state = read_checkpoint(path, whole=whole)
            except CheckpointError as exc:
                print(f"tokenmdp: {exc}; trying the checkpoint before it", file=sys.stderr)
                continue
            if path != found[-1]:
                print(f"tokenmdp: resuming from {path.name}, the newest good checkpoint", file=sys.stderr)
            self.metrics.truncate(state["step"])
            return state
        raise CheckpointError(f"--resume {str(self.path)!r}: every checkpoint in {self.checkpoints} is corrupt")

    def no_checkpoint_message(self) -> str:
        where = str(self.path)
        if not self.is_marked():
            return f"--resume {where!r}: no checkpoint to resume from, and no {MARKER} marker: not a tokenmdp run"
        return (
            f"--resume {where!r}: no checkpoint to resume from (the run stopped before its first one); start it "
            f"again, which replaces its files: tokenmdp train {where}/config.toml --set run.dir={where}"
        )

    def write_summary(self, summary: dict, samples: list[dict] = ()) -> None:
        """``summary.json``, and a text run's held-out samples (:attr:`SampledEvaluator.samples`)
        as ``eval_completions.jsonl.gz`` (gzip with no timestamp: the same run, the same bytes)."""
        if samples:
            lines = "".join(json.dumps(row) + "\n" for row in samples).encode("utf-8")
            atomic_write_bytes(self.path / EVAL_COMPLETIONS, gzip.compress(lines, mtime=0))
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2))


def clash_message(path: Path, clashes: list[str]) -> str:
    shown = ", ".join(clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3 else "")
    return (
        f"run.dir {str(path)!r} holds {shown}, which tokenmdp did not write (the folder has no {MARKER} marker); "
        "a run there would replace them, which tokenmdp never does, run.overwrite or not: use another run.dir"
    )


def check_run_dir_value(value: str) -> None:
    """``run.dir`` must name a folder of its own: never the current folder, its parent, the
    root, or a ``~`` path the shell did not expand."""
    norm = os.path.normpath(value)
    if value.startswith("~"):
        raise ConfigError(f"run.dir = {value!r} starts with '~', which is not expanded here; give the full path")
    if norm in (".", os.sep) or all(part == ".." for part in Path(norm).parts):
        raise ConfigError(
            f"run.dir = {value!r} is not a folder of its own (the current folder, a parent, or the "
            "root); name a new folder, e.g. runs/my_run"
        )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return RunDir(run_dir).latest_checkpoint()
