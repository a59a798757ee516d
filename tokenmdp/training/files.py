"""Writing a run's files safely: atomically (a temporary name, fsync, rename), so that a
crash never leaves half a file under a final name, and under an exclusive lock, so that two
processes never write the same folder. A failed write is a one-line ``CheckpointError``
naming the file and the reason."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, RunDirInUse

TEMP_MARK = ".tmp-"
#: Temporary files of an atomic write that a killed process left behind: group 1 is the final name.
TEMP = re.compile(r"\.(.+)\.tmp-\d+")


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def write_failed(path: Path, exc: BaseException) -> CheckpointError:
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
    tmp = temp_name(path)
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
        raise write_failed(path, exc) from exc
    finally:
        _remove_quietly(tmp)


def _caused_by(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s chain of context (``exc`` included)."""
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__context__
    return exc


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_failed(path, exc) from exc
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
