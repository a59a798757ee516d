"""A run directory: what tokenmdp writes there, and reads back on resume.

    config.toml          the resolved config; the paths it names are absolute (see below)
    reference.pt         the reference model's state_dict (empty for LoRA runs)
    base_model/          a run of ``tokenmdp.train(model=...)``: the model as given (save_pretrained)
    tokenizer/           ... and ``tokenizer=...``: the tokenizer as given (save_pretrained)
    metrics.jsonl        one JSON object per step, written by the core (loggers only add outputs)
    checkpoints/         step_XXXXXXXX.pt, the newest ``run.keep_checkpoints``
    summary.json         at the end
    tensorboard/         the loggers plugin's event files

Every file is written atomically (a temporary name, fsync, rename), so a crash never
leaves half a file under a final name. Only rank 0 of a distributed run calls the writing
methods.

A folder is tokenmdp's only when it holds the ``.tokenmdp-run`` marker: in a folder without
it, every file is the user's whatever its name (a ``config.toml`` of their own included), so
tokenmdp never rewrites or deletes it, ``run.overwrite`` or not.

A run directory works from any folder: the paths its config names (``env.prompts``,
``env.tokenizer``, ``policy.path``, ...: :data:`PATH_KEYS`) are resolved once, from the folder
the run starts in, and ``config.toml`` records them absolute, with the values as typed in its
leading comments (:func:`absolute_paths`, :func:`config_header`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, RunDirInUse

CHECKPOINT_DIR = "checkpoints"
METRICS = "metrics.jsonl"
COMPLETIONS = "completions.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
REFERENCE = "reference.pt"
TEMP_MARK = ".tmp-"
#: Written into every run directory tokenmdp starts: the folder is tokenmdp's.
MARKER = ".tokenmdp-run"
LOCK = ".tokenmdp.lock"
#: Files and folders of a run directory that tokenmdp writes (``compare.json``: compare's
#: cache of a cell; ``explain/``: ``tokenmdp explain``'s default output).
OWN_FILES = (CONFIG, REFERENCE, METRICS, COMPLETIONS, SUMMARY, MARKER, LOCK, "compare.json", "wandb_id.txt")
OWN_FOLDERS = {
    CHECKPOINT_DIR: r"step_\d{8}\.pt(\.sha256)?",
    "tensorboard": r"events\.out\.tfevents\..*",
    "explain": r"(response_\d+\.png|index\.html)",
}
#: Folders a run of ``tokenmdp.train`` writes for the objects it was given (the model, the
#: tokenizer), so that the run can be resumed and exported without them: the files
#: ``save_pretrained`` writes there. In a marked folder they are tokenmdp's, as OWN_FOLDERS'
#: are; in a folder without the marker an existing one refuses a run that would save there
#: (``RunDir.saves``).
SAVED_FOLDERS = {
    "base_model": r"(config|generation_config)\.json|model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?",
    "tokenizer": r"[\w.-]+\.(json|txt|model|jinja)",
}
BASE_MODEL, TOKENIZER = SAVED_FOLDERS
#: Temporary files of an atomic write that a killed process left behind.
_TEMP = re.compile(r"\.(.+)\.tmp-\d+")


class RunDir:
    """The files of one run, under ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._metrics = None  # the open metrics.jsonl while a run writes it
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
            if entry.name in (LOCK, MARKER) and entry.is_file() or _is_temp_of(entry, (MARKER,)):
                continue
            if marked and (entry.name in OWN_FILES and entry.is_file() or _is_own_temp(entry) or _is_saved_temp(entry)):
                continue
            pattern = OWN_FOLDERS.get(entry.name) or SAVED_FOLDERS.get(entry.name)
            if pattern is not None and entry.is_dir():
                found += [
                    f"{entry.name}/{f.name}"
                    for f in sorted(entry.iterdir())
                    if not (marked and f.is_file() and (re.fullmatch(pattern, f.name) or _is_own_temp(f)))
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
            if entry.name == LOCK and entry.is_file() or _is_temp_of(entry, (MARKER,)):
                continue
            if entry.name in OWN_FILES or pattern is not None and not entry.is_dir() or _is_own_temp(entry):
                found.append(entry.name + ("/" if entry.is_dir() else ""))
            elif pattern is not None:
                found += [
                    f"{entry.name}/{f.name}"
                    for f in sorted(entry.iterdir())
                    if re.fullmatch(pattern, f.name) or _is_own_temp(f)
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
                raise _write_failed(self.path / name, exc) from exc
        atomic_write_text(self.path / CONFIG, config_text)
        atomic_save(reference_state, self.path / REFERENCE)

    def stage(self, name: str, write) -> Path:
        """Write folder ``name`` of SAVED_FOLDERS under a temporary name (``write(folder)``,
        e.g. a model's ``save_pretrained``); :meth:`start_fresh` moves it into place, so it is
        there whole or not at all. Staged before the run builds its models (peft wraps a
        given model in place)."""
        tmp = _temp_name(self.path / name)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_failed(self.path / name, exc) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def record_resume(self, config_text: str, reference_state: dict) -> None:
        """A resumed run's config.toml holds its ``--set`` overrides (so a later plain
        resume continues the same run), and a deleted reference.pt is written again (the
        reference is rebuilt exactly: the same seed, the same SFT). A run made before the
        marker existed is adopted (its checkpoint shows it is tokenmdp's)."""
        if not self.is_marked():
            self._write_marker()
        # the comments the run started with (how its paths were typed) stay on top
        atomic_write_text(self.path / CONFIG, _leading_comments(self.path / CONFIG) + config_text)
        if not (self.path / REFERENCE).exists():
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
                    if _is_own_temp(stale):
                        stale.unlink(missing_ok=True)
                    elif _is_saved_temp(stale):
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

    def save_checkpoint(self, step: int, state: dict, keep: int) -> Path:
        """The checkpoint, then its checksum (``step_X.pt.sha256``): a checkpoint is whole
        only when its checksum file exists and matches."""
        path = self.checkpoint_path(step)

        def write_checksum(written: Path) -> None:  # before the rename: a checkpoint never lacks one
            atomic_write_text(checksum_path(path), hashlib.sha256(written.read_bytes()).hexdigest() + "\n")

        atomic_save(state, path, before_rename=write_checksum)
        for old in sorted(self.checkpoints.glob("step_*.pt"))[:-keep]:
            old.unlink()
            checksum_path(old).unlink(missing_ok=True)
        return path

    def load_latest_checkpoint(self) -> dict:
        """The newest good checkpoint (onto the CPU), for ``--resume``. A corrupt one (bad
        checksum, truncated, not loadable, non-finite weights) is reported and skipped for
        the one before it. Metric lines written after the checkpoint used are dropped."""
        self.remove_stale_temp_files()
        found = sorted(self.checkpoints.glob("step_*.pt"))
        if not found:
            raise ConfigError(self.no_checkpoint_message())
        for path in reversed(found):
            try:
                state = read_checkpoint(path)
            except CheckpointError as exc:
                print(f"tokenmdp: {exc}; trying the checkpoint before it", file=sys.stderr)
                continue
            if path != found[-1]:
                print(f"tokenmdp: resuming from {path.name}, the newest good checkpoint", file=sys.stderr)
            self.truncate_metrics(state["step"])
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

    def metric_lines(self) -> list[tuple[str, dict]]:
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
        return [row[key] if row[key] is not None else float("nan") for _, row in self.metric_lines() if key in row]

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metric (and completion) lines written after the checkpoint a run resumes
        from (and a torn last line). Every step up to the checkpoint's must have its row
        (step 0 is the evaluation before training): a deleted or shortened file is a one-line
        error, never a resumed run with a silent hole in its metrics."""
        path = self.path / METRICS
        rows = [(line, row) for line, row in self.metric_lines() if row["step"] <= last_step]
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

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2))


def clash_message(path: Path, clashes: list[str]) -> str:
    shown = ", ".join(clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3 else "")
    return (
        f"run.dir {str(path)!r} holds {shown}, which tokenmdp did not write (the folder has no {MARKER} marker); "
        "a run there would replace them, which tokenmdp never does, run.overwrite or not: use another run.dir"
    )


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


def _is_temp_of(path: Path, names: tuple[str, ...]) -> bool:
    found = _TEMP.fullmatch(path.name)
    return bool(found) and found.group(1) in names and path.is_file()


def _is_saved_temp(path: Path) -> bool:
    """A folder :meth:`RunDir.stage` was writing."""
    found = _TEMP.fullmatch(path.name)
    return bool(found) and found.group(1) in SAVED_FOLDERS and path.is_dir() and not path.is_symlink()


def _is_own_temp(path: Path) -> bool:
    found = _TEMP.fullmatch(path.name)
    return (
        bool(found)
        and path.is_file()
        and (found.group(1) in OWN_FILES or re.fullmatch(OWN_FOLDERS[CHECKPOINT_DIR], found.group(1)) is not None)
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


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :meth:`RunDir.save_checkpoint`, onto the CPU, **never
    unpickled**: ``torch.load(weights_only=True)`` accepts tensors and plain containers
    only, so a file that smuggles in code fails to load instead of running it. Its
    checksum must match (when it has one: older runs' do not), and every weight must be
    finite. Any problem is a one-line ``CheckpointError`` naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} could not be read: {exc}") from None
    checksum = checksum_path(path)
    if checksum.is_file() and checksum.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} is corrupt: its sha256 does not match {checksum.name}")
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated, empty, not a checkpoint, or a forbidden (code-carrying) object
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {type(exc).__name__}: {first}") from None
    if not isinstance(state, dict) or not {"step", "env_tokens", "policy", "components"} <= set(state):
        raise CheckpointError(
            f"checkpoint {path} is not a tokenmdp checkpoint (keys step, env_tokens, policy, components)"
        )
    bad = [name for name, t in _tensors(state["policy"]) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({bad[0]}, ...)")
    return state


def read_weights(path: str | Path) -> dict:
    """A ``state_dict`` file (reference.pt), loaded with ``weights_only=True``."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be loaded safely: {type(exc).__name__}: {first}") from None


def _tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [pair for k, v in tree.items() for pair in _tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    return []


# --- paths a config names ---------------------------------------------------------------------

#: The value a config holds for an input given to ``tokenmdp.train`` as a Python object.
PYTHON_OBJECT = "python:object"
#: Options of the component sections that name a file or folder: the built-in components'
#: (preference-pairs' ``path``, conditional-optimal's ``teacher``, ppo-rewards'
#: ``reward_pairs_file``), and options of the same names of any other component.
COMPONENT_PATH_KEYS = ("path", "teacher", "reward_pairs_file")
#: The config keys that name files or folders. ``env.reward`` names one only in an ``hf:DIR``
#: entry (it is one entry or a list of them); ``module:function`` entries are code, not paths.
PATH_KEYS = {
    "env": ("prompts", "eval_prompts", "tokenizer", "reward"),
    "policy": ("path",),
    **{section: COMPONENT_PATH_KEYS for section in ("estimator", "advantage", "updater")},
}
_REWARD_FOLDER = "# reward module folder: "


def _map_paths(config, change) -> tuple[Any, dict[str, Any]]:
    """``config`` with each path of :data:`PATH_KEYS` replaced by ``change(key, path)``, and
    ``{key: value as it was}`` of the keys that changed. Placeholders of objects and values
    that are not strings (a config error reported elsewhere) are left alone."""
    import attrs

    def one(key: str, value: Any) -> Any:
        if not isinstance(value, str) or not value or value == PYTHON_OBJECT:
            return value
        if key == "env.reward":
            return "hf:" + change(key, value[3:]) if value.startswith("hf:") and value[3:] else value
        return change(key, value)

    sections, typed = {}, {}
    for section, keys in PATH_KEYS.items():
        table = dict(getattr(config, section))
        for name in keys:
            if name not in table:
                continue
            key, value = f"{section}.{name}", table[name]
            new = [one(key, v) for v in value] if isinstance(value, list) and key == "env.reward" else one(key, value)
            if new != value:
                table[name], typed[key] = new, value
        sections[section] = table
    return (attrs.evolve(config, **sections) if typed else config), typed


def absolute_paths(config, base: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """The config a run records: every relative path of :data:`PATH_KEYS` that exists from
    ``base`` (default: the current folder, where the run starts) made absolute, so that the
    run directory works from any folder later; and ``{key: value as typed}`` of those it
    changed. A relative path that does not exist stays as typed: the run then stops with the
    error of the option that reads it (or the option is not a path after all)."""
    base = os.path.abspath(base if base is not None else os.getcwd())

    def absolute(key: str, path: str) -> str:
        if os.path.isabs(path) or not os.path.exists(os.path.join(base, path)):
            return path
        # abspath, not resolve: a symlinked folder stays the link the user named
        return os.path.abspath(os.path.join(base, path))

    return _map_paths(config, absolute)


def path_values(config) -> list[tuple[str, str]]:
    """``(key, path)`` of every path :data:`PATH_KEYS` finds in ``config``."""
    found: list[tuple[str, str]] = []
    _map_paths(config, lambda key, path: found.append((key, path)) or path)
    return found


def check_recorded_paths(config, what: str, skip: set[str] = frozenset(), only: set[str] | None = None) -> None:
    """Every absolute path ``config`` names (of the keys in ``only``, default all) must still
    exist (the keys in ``skip`` are given otherwise, e.g. as objects); else a one-line error
    naming the key and the path. Relative paths (runs recorded before paths were made
    absolute) are left to the option's own check."""
    for key, path in path_values(config):
        if key in skip or only is not None and key not in only:
            continue
        if os.path.isabs(path) and not os.path.exists(path):
            raise ConfigError(
                f"{what}: {key} = {path!r}, recorded when the run started, no longer exists; put it back there "
                "(a run always reads the same files)"
            )


def config_header(started_in: str, typed: dict[str, Any], notes: list[str] = (), reward_folders=()) -> str:
    """The comments on top of a run's ``config.toml``: where the run started, the paths as
    typed there, what the run saved for the objects it was given, and the folders its reward
    modules were imported from (:func:`recorded_reward_folders`). Empty when there is nothing
    to say."""
    if not (typed or notes or reward_folders):
        return ""
    lines = [
        f"# Recorded by tokenmdp; the run started in {json.dumps(started_in)}. Paths below are absolute",
        "# (relative ones were resolved from there), so this run directory works from any folder.",
        *(f"# as typed: {key} = {json.dumps(value)}" for key, value in typed.items()),
        *(f"# {note}" for note in notes),
        *(_REWARD_FOLDER + json.dumps(str(folder)) for folder in reward_folders),
    ]
    return "\n".join(lines) + "\n\n"


def recorded_reward_folders(run_dir: str | Path) -> list[Path]:
    """The folders the run's ``module:function`` rewards were imported from when it started
    (from :func:`config_header`'s comments), so that a resume from another folder finds them."""
    folders = []
    for line in _leading_comments(Path(run_dir) / CONFIG).splitlines():
        if line.startswith(_REWARD_FOLDER):
            try:
                folders.append(Path(json.loads(line[len(_REWARD_FOLDER) :])))
            except (ValueError, TypeError):
                continue
    return folders


def _leading_comments(path: Path) -> str:
    """The comment lines on top of the file at ``path`` (with the blank line after them), or ""."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines) + "\n\n" if lines else ""


# --- atomic writes ---------------------------------------------------------------------------


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def _write_failed(path: Path, exc: BaseException) -> CheckpointError:
    # torch.save's writer reports a failed write of the file (ENOSPC) as its own RuntimeError
    # ("unexpected pos ..."); the OSError behind it, when there is one, is the reason to give
    cause = _caused_by(exc, OSError)
    if cause is not None and cause.strerror:
        reason = f"{cause.strerror} (errno {cause.errno})"
    elif isinstance(exc, RuntimeError):
        said = (str(exc).strip() or type(exc).__name__).splitlines()[-1][:120]
        reason = f"the write failed{_free_space(path.parent)} (torch: {said})"
    else:
        reason = str(exc)
    kept = (
        f"the existing {path.name} is unchanged"
        if path.exists()
        else f"nothing was written there; the other files in {path.parent} are unchanged"
    )
    return CheckpointError(f"could not write {path}: {reason}; {kept}")


def _free_space(folder: Path) -> str:
    """The hint of a write that failed without saying why: the free space, where it can be read."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "; is the disk full?"
    return f"; is the disk full? ({free:,} bytes free there)"


@contextlib.contextmanager
def _stop_signals_held():
    """SIGINT/SIGTERM wait until the block ends, then take effect. A KeyboardInterrupt raised
    inside torch.save's writer (a third Ctrl-C aborts the run) would end the process with
    ``std::terminate`` instead of an exception, so the abort comes once the file is whole
    (and its temporary file is then removed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    stops = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in held:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def _remove_quietly(tmp: Path) -> None:
    """Clean-up after a failed write must not hide why it failed (e.g. EROFS again on a
    read-only file system)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_save(obj: Any, path: Path, before_rename=None) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves half a file.
    A failed write (disk full, ...) removes the temporary file and raises CheckpointError.
    ``before_rename(tmp)`` runs on the complete temporary file, before it takes the name."""
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _stop_signals_held(), open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if _caused_by(exc, KeyboardInterrupt):  # torch.save's writer wraps a Ctrl-C in its RuntimeError
            raise KeyboardInterrupt from None
        raise _write_failed(path, exc) from exc
    finally:
        _remove_quietly(tmp)


def _caused_by(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s chain of context (``exc`` included)."""
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__context__
    return exc


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    finally:
        _remove_quietly(tmp)


@contextlib.contextmanager
def exclusive_lock(path: Path, who: str, what: str, instead: str):
    """Hold an exclusive ``fcntl.flock`` on the file ``path`` while the block runs, with
    ``"<who> pid N"`` written in it; a second holder gets a one-line :class:`RunDirInUse`
    that names the first (``"<what> is in use by ...; wait for it to finish, or <instead>"``).
    The operating system releases the lock when the process ends, however it ends, so a
    lock file a killed process left behind is simply taken over."""
    import fcntl

    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirInUse(f"{what} is in use by {holder}; wait for it to finish, or {instead}") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{who} pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
