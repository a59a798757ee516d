"""What a fresh run records: its ``config.toml`` (the paths it names absolute, the model and
tokenizer given to ``tokenmdp.train`` named by the folders the run saves them to, under
comments that say how it all was typed) and those folders, so that ``export`` and
``--resume`` from the command line need no objects."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import attrs

from ..config import Config, dump_config
from ..errors import ConfigError
from ..plugin.composition import lm_defaults_line
from .layout import BASE_MODEL, TOKENIZER
from .paths import PYTHON_OBJECT, absolute_paths, config_header, reward_module_folders
from .rundir import RunDir


@attrs.frozen
class Recording:
    """A fresh run's config as ``config.toml`` records it, and the objects it saves."""

    config: Config
    #: What the run saves for the objects it was given: folder name -> object (save_pretrained).
    saving: dict[str, Any]
    #: The folder the run started in, ``{key: value as typed}`` of the paths made absolute,
    #: and notes for the comments on top of ``config.toml``.
    started_in: str
    typed: dict[str, Any]
    notes: list[str]

    def config_text(self) -> str:
        """``config.toml``: the config, under comments that say where the run started, how
        its paths were typed, and where its reward modules were imported from (read now: the
        env imported them)."""
        header = config_header(self.started_in, self.typed, self.notes, reward_module_folders(self.config))
        return header + dump_config(self.config)


def record_fresh(config: Config, objects: dict, lm_defaults: dict[str, object]) -> Recording:
    """A fresh run's config as ``config.toml`` records it: the paths it names absolute
    (resolved from the folder the run starts in), and a model or tokenizer given as an
    object named by the folder the run saves it to (``RUN/base_model``, ``RUN/tokenizer``:
    ``save_pretrained``). An object that cannot be saved stays ``"python:object"``."""
    started_in = os.getcwd()
    config, typed = absolute_paths(config, started_in)
    root = Path(config.run.dir).absolute()
    notes, saving = [], {}
    model, tokenizer = objects.get("model"), (objects.get("env") or {}).get("tokenizer")
    # a peft model (or one peft wrapped in an earlier run) would save its adapter only
    if config.policy.get("path") == PYTHON_OBJECT and _saveable(model) and not getattr(model, "peft_config", None):
        saving[BASE_MODEL] = model
        config = attrs.evolve(config, policy={**config.policy, "path": str(root / BASE_MODEL)})
        notes.append(f"policy.path: the model given to tokenmdp.train, saved in {BASE_MODEL}/ (save_pretrained)")
    if config.env.get("tokenizer") == PYTHON_OBJECT and _saveable(tokenizer):
        saving[TOKENIZER] = tokenizer
        config = attrs.evolve(config, env={**config.env, "tokenizer": str(root / TOKENIZER)})
        notes.append(f"env.tokenizer: the tokenizer given to tokenmdp.train, saved in {TOKENIZER}/")
    line = lm_defaults_line(config, lm_defaults)
    if line:
        notes.append(line)
    return Recording(config=config, saving=saving, started_in=started_in, typed=typed, notes=notes)


def stage_given_objects(rundir: RunDir, saving: dict[str, Any]) -> dict[str, Path]:
    """Save the objects a run records as folders of its own under temporary names
    (:meth:`RunDir.stage`); the run directory's preparation moves them into place. Done before
    the models are built: with ``policy.lora``, peft wraps the given model in place."""
    staged = {}
    for name, obj in saving.items():
        try:
            staged[name] = rundir.stage(name, functools.partial(_save_quietly, obj))
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as exc:  # save_pretrained refused (what was staged goes with the failed run)
            what = "model" if name == BASE_MODEL else "tokenizer"
            raise ConfigError(
                f"could not save the {what} given to tokenmdp.train into {rundir.path / name} "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                "export and --resume from the command line need it"
            ) from None
    return staged


def _saveable(obj) -> bool:
    """A transformers model or tokenizer, which ``save_pretrained`` writes to a folder."""
    return obj is not None and callable(getattr(obj, "save_pretrained", None))


def _save_quietly(obj, folder: Path) -> None:
    """``obj.save_pretrained(folder)`` without transformers' progress bar (stderr stays for errors)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        obj.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
