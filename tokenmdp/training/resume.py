"""Resuming a run from its run directory: the config it continues with (``config.toml`` plus
the overrides that may extend it, never change what it trains), and its reward modules
found again when it is resumed from another folder."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import attrs

from ..config import Config, load_config
from ..errors import ConfigError
from ..options import to_dict
from ..plugin.composition import DEFAULT_BETA
from .paths import PYTHON_OBJECT, absolute_paths, check_recorded_paths, recorded_reward_folders, reward_entries

#: The keys a ``--resume --set`` may change: how long and how the run goes on, never what it trains.
RESUME_MAY_CHANGE = frozenset(
    {
        "train.steps",
        "train.eval_every",
        "train.target_regret_frac",
        "train.progress",
        "train.device",
        "train.sharding",
        "train.simulate_world_size",
        "train.max_memory_gb",
        "run.checkpoint_every",
        "run.keep_checkpoints",
    }
)

_MISSING = object()  # a key one of two configs lacks


def given_keys(objects: dict) -> set[str]:
    """The config keys whose values ``objects`` (``tokenmdp.train``'s) give."""
    keys = {f"env.{key}" for key in objects.get("env") or {}}
    return keys | ({"policy.path"} if objects.get("model") is not None else set())


def checked_for_resume(config: Config, objects: dict) -> Config:
    """The config of a resumed run (``config.toml`` as :func:`resumed_config` read it), once
    every path it recorded is checked to be still there."""
    check_recorded_paths(config, f"--resume {str(config.run.dir)!r}", skip=given_keys(objects))
    # config.toml records every default the run started with; one written by hand without
    # train.beta takes the plain default, never today's LM defaults
    return attrs.evolve(config, train=attrs.evolve(config.train, beta=config.train.beta or DEFAULT_BETA))


def resumed_config(run_dir: str | Path, overrides: list[str] = (), objects: dict | None = None) -> Config:
    """The config the run in ``run_dir`` (wherever it now lives) goes on with: its
    ``config.toml`` with ``overrides`` that extend it (e.g. ``train.steps=500``); an override
    that would change what the run trains is a one-line error naming the keys. Its reward
    modules are made importable as when it started (:func:`find_reward_modules`)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: no config.toml there, so it is not a run directory")
    stored = load_config(path, [f"run.dir={Path(run_dir)}"])
    config = load_config(path, [*overrides, f"run.dir={Path(run_dir)}"])
    # Paths compare as the files they name: a path typed relative to this folder (an
    # override, or a run recorded before paths were absolute) is the same file.
    stored, config = absolute_paths(stored)[0], absolute_paths(config)[0]
    # An input given as an object again (tokenmdp.train(..., resume=True)) keeps the folder
    # the run saved it to, which config.toml goes on naming.
    given = given_keys(objects or {})
    for key in sorted(given):
        section, name = key.split(".")
        table, recorded = dict(getattr(config, section)), getattr(stored, section).get(name)
        if table.get(name) == PYTHON_OBJECT and recorded is not None:
            config = attrs.evolve(config, **{section: {**table, name: recorded}})
    now, before = _flat(to_dict(config)), _flat(to_dict(stored))
    changed = {key for key in now.keys() | before.keys() if now.get(key, _MISSING) != before.get(key, _MISSING)}
    fixed = sorted(changed - RESUME_MAY_CHANGE)
    if fixed:
        raise ConfigError(
            f"--resume can extend a run ({', '.join(sorted(RESUME_MAY_CHANGE))}), not change what it trains: "
            f"{', '.join(fixed)} differ from {path}; start a new run for that"
        )
    find_reward_modules(run_dir, config, given)
    return config


def find_reward_modules(run_dir: str | Path, config: Config, given: set[str]) -> None:
    """A resume from another folder imports the run's reward modules from where they were
    imported when it started (recorded in ``config.toml``), as that start did: the folder goes
    last on the search path, only when the module is not found otherwise. The run directory
    itself stays barred (``code_barrier``)."""
    if "env.reward" in given:
        return
    for entry in reward_entries(config):
        top = entry.split(":")[0].split(".")[0]
        if top in sys.modules or importlib.util.find_spec(top) is not None:
            continue
        for folder in recorded_reward_folders(run_dir):
            if (folder / f"{top}.py").is_file() or (folder / top).is_dir():
                if str(folder) not in sys.path:
                    sys.path.append(str(folder))
                break


def resume_overrides(data: dict, run_dir: Path) -> list[str]:
    """The values ``data`` (``tokenmdp.train``'s config, with the objects' placeholders) sets
    differently from the run's own ``config.toml``, as overrides for the resume, which
    accepts those that extend the run and names the rest."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return []  # resumed_config says it is not a run directory
    stored = _flat(to_dict(load_config(path)))
    given = _flat({k: v for k, v in data.items() if k != "run" or set(v) - {"dir"}})
    given.pop("run.dir", None)
    changed = {key: value for key, value in given.items() if stored.get(key, _MISSING) != value}
    return [f"{key}={json.dumps(value)}" for key, value in sorted(changed.items())]


def _flat(tree: Mapping, prefix: str = "") -> dict:
    """``{"section.key": value}`` of nested tables."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
