"""What the installed plugins contribute, remembered between processes.

Loading the plugins imports them, and they import torch: about 2 s of every ``tokenmdp``
command, and of ``import tokenmdp`` (which registers the plugins' envs with Gymnasium).
The listings that need only names (``tokenmdp --help``, ``plugins``, ``envs`` and that
registration) read them from a catalog instead: a JSON file written the first time the
plugins are loaded, and valid while nothing it was built from changed. Its fingerprint
covers the entry points of the group ``tokenmdp`` (names, targets, distributions and
versions), the size and modification time of every ``.py`` file of each plugin's top-level
package and of tokenmdp itself, ``TOKENMDP_DISABLE_PLUGINS``, the Python and the
environment (``sys.prefix``). Any change rebuilds it on the next command, by loading the
plugins as before. Plugins that fail to load are never catalogued: the error shows every
time, until it is fixed.

The file lives in ``$TOKENMDP_CACHE_DIR`` (default ``$XDG_CACHE_HOME/tokenmdp`` or
``~/.cache/tokenmdp``), one per Python environment; ``TOKENMDP_CACHE_DIR=off`` turns the
catalog off. A folder that cannot be written only costs the speed.

The file is a cache of names, never trusted for more: it holds only strings to list and,
per env, whether the plugin gives it a vector form. What an env is built from (its entry
point and its default kwargs) always comes from the plugin itself when the env is made.
Anything but a regular file of at most ``MAX_BYTES`` whose every field has the expected
type (a FIFO, a device, a symlink to one, a malformed or foreign file) is stale: rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import stat
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from .entry_points import ENTRY_POINT_GROUP, InstalledEnv, blocked_plugin_names

CACHE_ENV_VAR = "TOKENMDP_CACHE_DIR"
#: 2: env entries no longer carry kwargs (the plugin's spec gives them when the env is made)
_FORMAT = 2
#: A catalog is a few kB; a bigger file is not one (and is never read whole into memory).
MAX_BYTES = 1 << 20
_ENV_KEYS = {"id", "plugin", "description", "vector"}
#: What Gymnasium accepts as an env id ([namespace/]name[-vN]); anything else is not one.
_ENV_ID = re.compile(r"(?:[\w:-]+/)?[\w:.-]+(?:-v\d+)?")


def cache_dir() -> Path | None:
    """Where catalogs are kept; ``None`` when ``TOKENMDP_CACHE_DIR=off`` (or no folder can
    be named: no variable set and no home directory)."""
    chosen = os.environ.get(CACHE_ENV_VAR)
    if chosen:
        return None if chosen.lower() == "off" else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no home directory (a bare container): no catalog, only slower
            return None
    return Path(base) / "tokenmdp"


def catalog_path() -> Path | None:
    """This Python environment's catalog file."""
    folder = cache_dir()
    if folder is None:
        return None
    where = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:16]
    return folder / f"plugins-{where}.json"


def _package_files(module_name: str) -> list[tuple[str, int, int]]:
    """(path, mtime_ns, size) of every .py file of a top-level module, without importing it."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return [("missing:" + module_name, 0, 0)]
    if spec is None:
        return [("missing:" + module_name, 0, 0)]
    paths = []
    for folder in spec.submodule_search_locations or ():
        paths += sorted(str(p) for p in Path(folder).rglob("*.py"))
    if not paths and spec.origin:
        paths = [spec.origin]
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.append((path, st.st_mtime_ns, st.st_size))
    return out


def fingerprint() -> str:
    """A digest of everything the catalog is built from (see the module's doc)."""
    parts: list[Any] = [_FORMAT, sys.version, os.path.realpath(sys.prefix), blocked_plugin_names()]
    modules = {"tokenmdp"}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = ep.dist
        parts.append([ep.name, ep.value, dist.name if dist else None, dist.version if dist else None])
        modules.add(ep.value.split(":")[0].split(".")[0])
    for module in sorted(modules):
        parts.append([module, _package_files(module)])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _build(stamp: str) -> dict:
    """Load the plugins (this imports them) and list what they contribute."""
    from .registry import Registry, plugin_manager

    registry = Registry(plugin_manager())
    envs = [
        {
            "id": entry.obj.id,
            "plugin": entry.plugin,
            "description": entry.obj.description,
            "vector": entry.obj.vector_entry_point is not None,
        }
        for entry in registry.envs.values()
    ]
    return {"format": _FORMAT, "fingerprint": stamp, "rows": [list(r) for r in registry.rows()], "envs": envs}


def _read(path: Path, stamp: str) -> dict | None:
    """The catalog at ``path`` if it is current and well-formed, else None (rebuilt). Only
    a regular file is opened, without blocking (a FIFO put there cannot hang every
    command), and at most ``MAX_BYTES`` of it are read (nor can ``/dev/zero``)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped after the stat
                return None
            data = f.read(MAX_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_BYTES:
        return None
    try:
        found = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep to parse
        return None
    return found if _well_formed(found, stamp) else None


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _well_formed(found: Any, stamp: str) -> bool:
    """Every field of a catalog of this format and fingerprint, with the type it must have:
    what reads the catalog (the listings, the Gymnasium registration) can then not fail."""
    if not isinstance(found, dict) or set(found) != {"format", "fingerprint", "rows", "envs"}:
        return False
    if type(found["format"]) is not int or found["format"] != _FORMAT or found["fingerprint"] != stamp:
        return False
    rows, envs = found["rows"], found["envs"]
    if not isinstance(rows, list) or not all(
        isinstance(row, list) and len(row) == 4 and all(map(_is_str, row)) for row in rows
    ):
        return False
    if not isinstance(envs, list) or not all(isinstance(env, dict) and set(env) == _ENV_KEYS for env in envs):
        return False
    ids = [env["id"] for env in envs]
    return (
        all(_is_str(i) and _ENV_ID.fullmatch(i) for i in ids)
        and len(set(ids)) == len(ids)
        and all(_is_str(env["plugin"]) and _is_str(env["description"]) for env in envs)
        and all(type(env["vector"]) is bool for env in envs)
    )


def _write(path: Path, catalog: dict) -> None:
    """Atomically (a reader sees the old file or the new one), and never an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(catalog, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def installed() -> dict:
    """The catalog of the installed plugins: ``rows`` as ``tokenmdp plugins`` prints them
    (kind, name, plugin, source) and ``envs`` (id, plugin, description, vector). Read from the
    cache when it is current; otherwise the plugins are loaded (a ``PluginError`` if one
    cannot be) and the cache rewritten."""
    path = catalog_path()
    stamp = fingerprint() if path is not None else ""
    found = _read(path, stamp) if path is not None else None
    if found is None:
        found = _build(stamp)
        if path is not None:
            _write(path, found)
    return found


def _make_with_plugins(env_id: str, vector: bool, kwargs: dict):
    """What an :class:`InstalledEnv` entry point does when an env is made: load the plugins,
    register their envs (replacing every catalog entry), and build the env from the
    plugin's own spec: its entry point and default kwargs (the catalog registered none),
    then the caller's."""
    from .registry import Registry, plugin_manager

    registry = Registry(plugin_manager())
    registry.register_envs()
    spec = registry.env(env_id)
    if vector and spec.vector_entry_point is None:
        # the catalog said it has a vector form and the plugin gives none: Gymnasium's
        # own vectorisation of the plugin's env, as make_vec does for such an env
        import gymnasium

        return gymnasium.make_vec(env_id, vectorization_mode="sync", **kwargs)
    make = spec.vector_entry_point if vector else spec.entry_point
    return make(**{**dict(spec.kwargs), **kwargs})


def register_installed_envs() -> None:
    """Register every installed plugin's envs with Gymnasium, from the catalog (idempotent)."""
    import gymnasium

    for env in installed()["envs"]:
        if env["id"] in gymnasium.registry:
            continue
        try:
            gymnasium.register(
                id=env["id"],
                entry_point=InstalledEnv(env["id"], _make_with_plugins),
                vector_entry_point=InstalledEnv(env["id"], _make_with_plugins, vector=True) if env["vector"] else None,
                disable_env_checker=True,
            )
        except gymnasium.error.Error:  # an id Gymnasium refuses next to one it has: the plugin's own
            continue  # registration (Registry.register_envs) reports it once the plugins are loaded
