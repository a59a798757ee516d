"""The env factory: a config's training env (a torch vector env), and its task for the tools
that read a run or a config without training (``solve``, ``export``, ``explain``, compare)."""

from __future__ import annotations

import inspect

import gymnasium
from gymnasium.vector import AutoresetMode

from ..config import Config
from ..errors import ConfigError
from ..mdp.env import TokenVectorEnv
from ..plugin.registry import Registry, plugin_manager
from ..text.callables import code_barrier
from .paths import PYTHON_OBJECT


def _task_parameters(task_cls: type) -> list[str]:
    """The keyword arguments a task class takes: its own ``__init__``'s, and its parents'
    as long as each passes ``**kwargs`` on."""
    names = []
    for cls in task_cls.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return sorted(set(names))


def make_vector_env(
    registry: Registry, config: Config, num_envs: int, compute_rewards: bool, objects: dict | None = None
) -> TokenVectorEnv:
    """The training env of ``config``; ``objects`` replace the ``[env]`` values that were
    given as Python objects (``tokenmdp.train``: prompts, tokenizer, reward)."""
    spec = registry.env(config.env["id"])
    kwargs = {**config.env_kwargs, **(objects or {})}
    missing = sorted(k for k, v in kwargs.items() if v == PYTHON_OBJECT)
    if missing:
        raise ConfigError(
            f"env.{missing[0]} was given to tokenmdp.train as a Python object; this run can only be "
            "resumed from Python, with the same objects: tokenmdp.train(..., run_dir=RUN_DIR, resume=True)"
        )
    if spec.vector_entry_point is None:
        raise ConfigError(f"env.id {spec.id!r} has no torch vector form; training needs one")
    try:
        # the run directory is data: no reward module from there, for whoever makes the env
        # (training, resuming, compare's cells, export, explain)
        with code_barrier(config.run.dir):
            env = gymnasium.make_vec(
                spec.id,
                num_envs=num_envs,
                autoreset_mode=AutoresetMode.DISABLED,
                compute_rewards=compute_rewards,
                **kwargs,
            )
    except TypeError as exc:
        valid = _task_parameters(getattr(spec.vector_entry_point, "task_cls", object))
        raise ConfigError(f"[env] ({spec.id}): {exc}; valid options: {', '.join(valid)}") from None
    except (ValueError, OverflowError, RuntimeError) as exc:  # RuntimeError: torch rejecting a value
        raise ConfigError(f"[env] ({spec.id}): {exc}") from None
    return env


def load_task(config: Config, compute_rewards: bool = True, registry: Registry | None = None):
    """``(registry, task)`` of ``config``'s env, for the tools that read a run or a config
    without training (``solve``, ``export``, ``explain``, compare's frontiers): the
    installed plugins (or ``registry``), their envs registered, and a one-env instance's task."""
    registry = registry if registry is not None else Registry(plugin_manager())
    registry.register_envs()
    return registry, make_vector_env(registry, config, 1, compute_rewards=compute_rewards).task
