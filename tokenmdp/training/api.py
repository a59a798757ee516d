"""``tokenmdp.train(...)``: a run from Python objects (a model, a tokenizer, a reward
function, a list or ``datasets.Dataset`` of prompts), as short as TRL's::

    result = tokenmdp.train({"algorithm": {"name": "grpo"}}, model=model, tokenizer=tokenizer,
                            reward=my_reward, prompts=["Write a haiku.", ...])
    result.model.save_pretrained("tuned")

Objects are never pickled into ``config.toml``. A model and a tokenizer are saved in the
run directory (``save_pretrained`` into ``base_model/`` and ``tokenizer/``) and recorded by
path, so ``tokenmdp export`` needs no objects; prompts and a reward function are recorded as
``"python:object"``, so a run started this way is resumed from Python, with the same objects
(``resume=True``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..config import Config, load_config
from ..errors import ConfigError
from ..options import to_dict
from .paths import PYTHON_OBJECT
from .resume import resume_overrides
from .trainer import Trainer


@attrs.frozen
class TrainResult:
    """What :func:`train` returns: the summary (as in ``summary.json``), the run directory
    and the trained policy (None after a sharded run, whose ranks drop their shards at the
    end: ``tokenmdp.load_policy(run_dir)`` loads it whole from the last checkpoint)."""

    summary: dict
    run_dir: Path
    policy: Any

    @property
    def model(self):
        """The trained transformers model (a toy run: its network)."""
        return getattr(self.policy, "model", self.policy)


def train(
    config: str | Path | Mapping | Config | None = None,
    *,
    model=None,
    tokenizer=None,
    reward=None,
    prompts=None,
    eval_prompts=None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    pm=None,
) -> TrainResult:
    """Train, from a config (a TOML path, a dict of sections, a :class:`Config`, or None for
    the defaults) plus ``overrides`` (``"section.key=value"``), with any of the inputs
    given as objects:

    - ``model``: a transformers causal LM (``policy.kind = "hf"``; it becomes the frozen
      reference, ``reference.init = "init"``, and a copy of it trains; with
      ``policy.lora`` it is wrapped by peft in place) or a model folder;
    - ``tokenizer``: a loaded Hugging Face tokenizer, or a path (``env.tokenizer``);
    - ``reward``: a function (either signature of docs/text.md), ``"module:function"``,
      ``"hf:DIR"``, or a list of them (weights: ``env.reward_weights``);
    - ``prompts`` / ``eval_prompts``: a list of strings or conversations, a
      ``datasets.Dataset``, or a path; they make the env ``tokenmdp/Text-v0`` unless the
      config names one.

    ``run_dir`` sets ``run.dir``; ``resume`` continues that run from its last checkpoint
    (pass the same objects again). With ``resume``, ``config`` and ``overrides`` may extend
    the run (``train.steps``, ... as ``tokenmdp train --resume --set`` may); a value that would
    change what the run trains is a one-line :class:`ConfigError` naming it."""
    data = _sections(config)
    env, objects = data.setdefault("env", {}), {}
    for key, value in (("prompts", prompts), ("eval_prompts", eval_prompts), ("tokenizer", tokenizer)):
        if value is None:
            continue
        if isinstance(value, (str, Path)):
            env[key] = str(value)
        else:
            env[key], objects[key] = PYTHON_OBJECT, value
    if reward is not None:
        listed = list(reward) if isinstance(reward, (list, tuple)) else [reward]
        if all(isinstance(r, str) for r in listed):
            env["reward"] = listed if isinstance(reward, (list, tuple)) else reward
        else:
            env["reward"], objects["reward"] = PYTHON_OBJECT, reward
    if prompts is not None:
        env.setdefault("id", "tokenmdp/Text-v0")
    policy = data.setdefault("policy", {})
    if model is not None:
        policy["kind"] = "hf"
        if isinstance(model, (str, Path)):
            policy["path"], model = str(model), None
        else:
            policy["path"] = PYTHON_OBJECT
        data.setdefault("reference", {}).setdefault("init", "init")
    if run_dir is not None:
        data.setdefault("run", {})["dir"] = str(run_dir)
    run = load_config(None, list(overrides), base=data)
    inputs = {"env": objects, "model": model}
    if resume:
        extend = resume_overrides(data, Path(run.run.dir)) if config is not None else []
        trainer = Trainer.from_run_dir(run.run.dir, [*extend, *overrides], pm=pm, objects=inputs)
    else:
        trainer = Trainer(run, pm=pm, objects=inputs)
    summary = trainer.train()
    return TrainResult(summary=summary, run_dir=trainer.run_dir, policy=trainer.policy)


def _sections(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, Config):
        return to_dict(config)
    if isinstance(config, (str, Path)):
        from ..config import read_toml

        return read_toml(config)
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    raise ConfigError(f"tokenmdp.train: config must be a TOML path, a dict of sections or a Config (got {config!r})")
