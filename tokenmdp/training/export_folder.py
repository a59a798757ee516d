"""The folder ``tokenmdp export`` writes: which folders it may replace, and the atomic swap.

Export deletes only what an earlier export wrote. Every export folder holds a
``.tokenmdp-export`` marker listing its files; a folder is replaced only when it is empty
or holds that marker and nothing else, and never a folder that is or contains the run
directory or the current folder. The folder is written whole in a hidden sibling
(``.NAME.export-PID``), the old one renamed aside (``.NAME.old-PID``), the new one renamed
into place, then the old deleted. What a killed export leaves there is tidied up by the
next export to the same folder (:func:`recover`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import ConfigError

#: Written into every export folder (last: a hidden folder holding it is complete).
MARKER = ".tokenmdp-export"


def checked_destination(run_dir: Path, out: Path) -> Path:
    """``out`` made absolute, refused (before anything is written) where an export could
    delete or hide something that is not an export: a link, a file, the run directory or a
    folder around it, the current folder or a folder around it."""
    if out.is_symlink():
        raise ConfigError(
            f"export: {str(out)!r} is a symbolic link (to {os.readlink(out)!r}); export replaces the folder "
            "it is given, so name a real folder"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {str(out)!r} is a file, not a folder")
    target, run, cwd = out.resolve(), run_dir.resolve(), Path.cwd().resolve()
    if target == run or target in run.parents:
        raise ConfigError(
            f"export: {str(out)!r} is or contains the run directory {str(run_dir)!r}; export into a new folder"
        )
    if run in target.parents:
        raise ConfigError(f"export: {str(out)!r} is inside the run directory; choose a folder outside it")
    if target == cwd or target in cwd.parents:
        raise ConfigError(
            f"export: {str(out)!r} is or contains the current folder {str(cwd)!r}; export into a new folder "
            "(e.g. ./model)"
        )
    return target


def check_contents(out: Path, target: Path, overwrite: bool) -> None:
    """A non-empty ``out`` is replaced only with ``overwrite`` and only when it is an earlier
    export: its marker lists every file in it."""
    if not target.is_dir():
        return
    names = sorted(p.name for p in target.iterdir())
    if not names:
        return
    foreign = [n for n in names if n != MARKER and n not in _exported_files(target)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(
            f"export: {str(out)!r} holds files an export did not write ({shown}); export into an empty or new "
            "folder (--overwrite replaces only an earlier export)"
        )
    if not overwrite:
        raise ConfigError(f"export: {str(out)!r} exists and is not empty; pass --overwrite to replace it")


def write_marker(folder: Path) -> None:
    """The marker listing every file in ``folder``, written last (it marks the folder complete)."""
    files = sorted(p.name for p in folder.iterdir())
    (folder / MARKER).write_text(json.dumps({"tokenmdp": "export", "version": 1, "files": files}) + "\n")


def _exported_files(folder: Path) -> set[str]:
    """The files the export in ``folder`` wrote, from its marker (none without one)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    files = marker.get("files") if isinstance(marker, dict) and marker.get("tokenmdp") == "export" else None
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def _hidden(target: Path, kind: str, pid: int | None = None) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process exports one folder at a time: its own leftovers are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False
    return True


def recover(target: Path) -> None:
    """Tidy what a killed export to ``target`` left beside it: only hidden folders of this
    module's naming whose process is gone. A kill between the two renames leaves no
    ``target`` but the previous export renamed aside: it is put back (the interrupted
    export never finished, so the folder is as it was before it); the rest is deleted."""
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(export|old)-(\d+)")
    stale = {"export": [], "old": []}
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match[2])):
            stale[match[1]].append(entry)
    old = sorted(stale["old"], key=lambda p: p.stat().st_mtime)
    if old and not os.path.lexists(target):
        try:
            os.rename(old[-1], target)
            old.pop()
        except OSError:
            pass  # left for the next export; this one reports what it cannot write
    for entry in [*stale["export"], *old]:
        shutil.rmtree(entry, ignore_errors=True)


def make_hidden(out: Path, target: Path) -> tuple[Path, list[Path]]:
    """The hidden sibling the export is written in, made before any model is loaded, so an
    unwritable destination is reported at once; and the parent folders it had to make."""
    existing = next((p for p in [target.parent, *target.parent.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"export: {str(out)!r}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"export: {str(out)!r}: {existing} is not writable; choose a folder you can write to")
    tmp = _hidden(target, "export")
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise ConfigError(f"export: cannot create {str(out)!r}: {exc.strerror or exc} ({exc.filename})") from None
    return tmp, created


def swap_in(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the complete folder ``tmp``: at every moment either the old
    export or the new one is there under ``target`` (or, between the two renames, the old
    one beside it, which :func:`recover` puts back)."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = _hidden(target, "old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    # a failure here leaves only tokenmdp's hidden .NAME.old-PID, which the next export removes
    shutil.rmtree(old, ignore_errors=True)
