"""The paths a run's config names, recorded so that its run directory works from any folder.

The paths (``env.prompts``, ``env.tokenizer``, ``policy.path``, ...: :data:`PATH_KEYS`) are
resolved once, from the folder the run starts in, and ``config.toml`` records them absolute,
with the values as typed in its leading comments (:func:`absolute_paths`,
:func:`config_header`), together with the folders its reward modules were imported from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import attrs

from ..config import Config
from ..errors import ConfigError
from .layout import CONFIG

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
    for line in leading_comments(Path(run_dir) / CONFIG).splitlines():
        if line.startswith(_REWARD_FOLDER):
            try:
                folders.append(Path(json.loads(line[len(_REWARD_FOLDER) :])))
            except (ValueError, TypeError):
                continue
    return folders


def leading_comments(path: Path) -> str:
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


def reward_entries(config: Config) -> list[str]:
    """The ``module:function`` entries of ``env.reward`` (not ``hf:DIR``, not objects)."""
    reward = config.env.get("reward")
    entries = reward if isinstance(reward, list) else [reward]
    return [e for e in entries if isinstance(e, str) and ":" in e and not e.startswith(("hf:", PYTHON_OBJECT))]


def reward_module_folders(config: Config) -> list[str]:
    """The folders the run's reward modules were imported from (their top-level module's
    place on the search path): ``config.toml`` records them for a resume from another folder."""
    folders = []
    for entry in reward_entries(config):
        module = sys.modules.get(entry.split(":")[0].split(".")[0])
        where = getattr(module, "__file__", None)
        if where is None:
            continue
        folder = Path(where).parent.parent if Path(where).name == "__init__.py" else Path(where).parent
        if str(folder.absolute()) not in folders:
            folders.append(str(folder.absolute()))
    return folders
