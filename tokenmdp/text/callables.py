"""``module:function`` -> the callable, for ``env.reward`` and every other key that names
code, and the barrier that keeps code in a run directory from ever being imported (a run
directory is data: docs/reliability.md)."""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.machinery
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: Folders code is never imported from (run directories are data): see :func:`code_barrier`.
_BARRIERS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("tokenmdp_code_barriers", default=())


@contextlib.contextmanager
def code_barrier(folder: str | Path):
    """While held, :func:`resolve_callable` refuses a module found in ``folder``, and any
    module the import of its module would load from there (the trainer, ``explain`` and
    every tool that makes a run's env hold it for the run directory, which is data)."""
    token = _BARRIERS.set((*_BARRIERS.get(), Path(folder).resolve()))
    try:
        yield
    finally:
        _BARRIERS.reset(token)


def _barrier_of(location: str | None) -> Path | None:
    """The barrier folder ``location`` (a file or a package folder) lies in, if any."""
    if not location:
        return None
    try:
        resolved = Path(location).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return next((f for f in _BARRIERS.get() if resolved == f or resolved.is_relative_to(f)), None)


def _locations(found) -> list[str]:
    """Where a module spec (or an imported module) lives: its file, and a package's folders."""
    if isinstance(found, importlib.machinery.ModuleSpec):
        origin = found.origin if found.has_location else None
        return [origin, *(found.submodule_search_locations or [])]
    return [getattr(found, "__file__", None), *(getattr(found, "__path__", None) or [])]


def _refuse_inside_barrier(found, name: str, spec: str, what: str, via: str = "") -> None:
    for location in _locations(found):
        folder = _barrier_of(location)
        if folder is not None:
            raise ConfigError(
                f"{what} {spec!r}: module {name!r}{via} is {location}, inside the run directory {folder}; "
                "tokenmdp never imports code from a run directory (it is data): move the module elsewhere"
            )


def _find_spec(name: str, path) -> importlib.machinery.ModuleSpec | None:
    """The spec the import system would use for ``name`` (a submodule: under its parent's
    ``path``), found by asking each finder of ``sys.meta_path`` (PathFinder among them);
    finders locate modules without running them."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None or isinstance(finder, _BarrierFinder):
            continue
        try:
            found = find(name, path)
        except (ImportError, ValueError):
            return None
        if found is not None:
            return found
    return None


def _check_barriers(module_name: str, spec: str, what: str) -> None:
    """Refuse ``module_name`` if it, or a package above it, lies in a barrier folder,
    before anything is imported: the dotted name is walked part by part (a package's
    ``__init__`` is code too), each part found where the import system would find it (the
    search path, then the parent package's folders); a part already imported is checked by
    its ``__file__`` and ``__path__``."""
    if not _BARRIERS.get():
        return
    parts = module_name.split(".")
    path = None  # sys.path for the top-level package
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        found = sys.modules.get(name)
        if found is None:
            found = _find_spec(name, path)
            if found is None:
                return  # not importable: import_module reports it
            path = found.submodule_search_locations
        else:
            path = getattr(found, "__path__", None)
        _refuse_inside_barrier(found, name, spec, what)
        if path is None and i < len(parts) - 1:
            return  # a module, not a package, with a dotted name under it: import_module reports it


class _BarrierFinder:
    """On ``sys.meta_path`` while a named module is imported: any module that import pulls
    in (``import helper`` inside the reward module) is refused if it lies in a barrier
    folder, before it runs."""

    def __init__(self, spec: str, what: str):
        self.spec, self.what = spec, what

    def find_spec(self, name, path=None, target=None):
        found = _find_spec(name, path)
        if found is not None:
            _refuse_inside_barrier(found, name, self.spec, self.what, via=" (imported by it)")
        return found


def resolve_callable(spec: str, what: str = "env.reward") -> Callable:
    """``module:function`` (dots allowed after the colon) -> the callable. The module is
    imported, so the config that names it is as trusted as code; a module inside a run
    directory (:func:`code_barrier`), or a package above it there, is refused before
    anything is imported, and so is any module its import would load from there."""
    if not isinstance(spec, str) or not re.fullmatch(r"[\w.]+:[\w.]+", spec):
        raise ConfigError(f"{what} must be 'module:function' (got {spec!r})")
    module_name, attr = spec.split(":")
    _check_barriers(module_name, spec, what)
    guard = _BarrierFinder(spec, what) if _BARRIERS.get() else None
    if guard is not None:
        sys.meta_path.insert(0, guard)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {spec!r}: cannot import module {module_name!r}: {exc}") from None
    finally:
        if guard is not None:
            sys.meta_path.remove(guard)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{what} {spec!r} is not callable")
    return obj
