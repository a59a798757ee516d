"""Start-up checks of a run's set-up that no single option can make alone (the policy's kind
against the precision, the task against the policy, a launch against its options): each is
a one-line ``ConfigError`` naming the keys, raised before any model is built or any file is
written."""

from __future__ import annotations

import importlib.util
import sys

from .. import distributed, host_memory
from ..config import Config
from ..devices import PRECISIONS
from ..errors import ConfigError


def check_text_setup(config: Config, task) -> None:
    """Tasks without an exact solver are scored by sampling. A text task's has no base
    distribution to fine-tune a reference on, and only HF causal LMs handle its padded
    prompts; a toy task with a Python reward (``env.reward``) keeps both."""
    if task.exact:
        return
    env_id = config.env["id"]
    if task.tokenizer is not None:
        if config.policy.get("kind", "gru") != "hf":
            raise ConfigError(
                f'env {env_id} needs policy.kind = "hf" (with policy.path = a model directory); '
                f"got policy.kind = {config.policy.get('kind', 'gru')!r}"
            )
        if config.reference.init != "init":
            raise ConfigError(
                f"env {env_id} has no base distribution to fine-tune a reference on; set "
                'reference.init = "init" (the loaded model is the reference)'
            )
    if config.train.target_regret_frac is not None:
        raise ConfigError(f"train.target_regret_frac needs an exact solver, which env {env_id} does not have")


def check_model_options(config: Config) -> None:
    """``train.precision`` and ``train.gradient_checkpointing`` apply to HF models only;
    ``train.release_memory`` needs glibc."""
    kind = config.policy.get("kind", "gru")
    if PRECISIONS[config.train.precision] is not None and kind != "hf":
        raise ConfigError(
            f"train.precision = {config.train.precision!r} applies to HF models (policy.kind = "
            f'"hf"); policy.kind = {kind!r} trains in "fp32"'
        )
    if config.train.gradient_checkpointing and kind != "hf":
        raise ConfigError(f'train.gradient_checkpointing applies to HF models (policy.kind = "hf"), not {kind!r}')
    if config.train.release_memory and host_memory.glibc() is None:
        raise ConfigError(
            f"train.release_memory needs glibc's malloc (Linux); this process runs on {sys.platform} "
            "without it: unset train.release_memory"
        )


def check_launch(config: Config) -> None:
    """What the process was launched with agrees with the config: no simulated world size
    under torchrun, and wandb installed for ``run.wandb_project``."""
    simulate = config.train.simulate_world_size
    if simulate is not None and simulate > 1 and distributed.requested_world_size() > 1:
        raise ConfigError(
            "train.simulate_world_size stands in for a distributed run in one process; "
            "unset it when launching with torchrun"
        )
    if config.run.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError('run.wandb_project needs wandb: pip install "torch==2.13.0" -e ".[wandb]"')
