"""tokenmdp: token-level RL for language models, scored against the exact optimum.

This namespace is the one public API for plugin and environment authors: everything an
estimator, advantage constructor, updater or environment needs is importable from
``tokenmdp`` itself, and the built-in plugins import nothing else. The submodules
(``tokenmdp.plugin``, ``.mdp``, ``.policies``, ``.training``, ``.text``, ``.reports``) are the
implementation; docs/architecture.md draws them.
"""

import importlib
import warnings

from .errors import (
    CheckpointError,
    CompositionError,
    ConfigError,
    InvalidActionError,
    NonFiniteError,
    PluginError,
    RankFailure,
    RewardError,
    RunDirInUse,
    TokenMDPError,
    TrainingInterrupted,
)

__version__ = "0.2.0"

#: public name -> the module it lives in. Imported on first use (PEP 562), so that
#: ``import tokenmdp`` (and every ``tokenmdp`` command) does not import torch until a
#: name that needs it is read; ``from tokenmdp import X`` works as usual.
_LAZY = {
    **dict.fromkeys(["module_device"], ".devices"),
    **dict.fromkeys(["TokenMDPEnv", "TokenVectorEnv"], ".mdp.env"),
    **dict.fromkeys(["TokenTask"], ".mdp.task"),
    **dict.fromkeys(["Solution", "solve", "tree_logprobs"], ".mdp.solver"),
    **dict.fromkeys(
        ["non_negative", "non_negative_int", "one_of", "optional", "positive", "positive_int", "probability"],
        ".options",
    ),
    **dict.fromkeys(
        [
            "RolloutBatch",
            "TokenDistribution",
            "concat_batches",
            "prompts_with_prefix",
            "response_logits",
            "token_distribution",
            "token_kl",
            "token_logprobs",
        ],
        ".plugin.batch",
    ),
    **dict.fromkeys(
        [
            "AdvantageConstructor",
            "Component",
            "CreditView",
            "EnvSpec",
            "LM_LR",
            "LORA_LR",
            "NoOptions",
            "PolicyUpdater",
            "Recipe",
            "TrajectoryEstimator",
        ],
        ".plugin.components",
    ),
    **dict.fromkeys(["TrainContext"], ".plugin.context"),
    **dict.fromkeys(["SIGNALS", "Signal", "check_signal_shapes"], ".plugin.signals"),
    **dict.fromkeys(["hookspec"], ".plugin.hookspecs"),
    **dict.fromkeys(
        [
            "at_least_float32",
            "check_finite",
            "correlation_interval",
            "masked_correlation",
            "masked_mean",
            "masked_sum",
            "masked_whiten",
            "suffix_sums",
            "zero_padding",
        ],
        ".plugin.ops",
    ),
    **dict.fromkeys(["Registry", "hookimpl", "plugin_manager"], ".plugin.registry"),
    **dict.fromkeys(["Samples", "SamplingBackend", "SamplingParams"], ".plugin.sampling"),
    **dict.fromkeys(
        ["GradientOptions", "GradientUpdater", "MicroBatch", "OptimizerOptions", "entropy_of"], ".plugin.updaters"
    ),
    **dict.fromkeys(["GRUPolicy", "TaskBasePolicy", "TokenPolicy", "build_policy"], ".policies"),
    **dict.fromkeys(["TextTask"], ".text"),
    **dict.fromkeys(["RewardSet"], ".text.rewards"),
    **dict.fromkeys(["export_run", "load_exported"], ".training.export"),
    **dict.fromkeys(["PairBatch", "load_pair_file", "sample_pairs", "sequence_rewards"], ".training.preferences"),
    **dict.fromkeys(["generate", "generate_samples"], ".training.rollout"),
    **dict.fromkeys(["load_policy"], ".training.models"),
    **dict.fromkeys(["train", "TrainResult"], ".training.api"),
}
#: public subpackages and modules, imported on first use like the names above
_SUBMODULES = {"distributed", "mdp", "plugin", "policies", "reports", "text", "training"}

__all__ = [
    "CheckpointError",
    "CompositionError",
    "ConfigError",
    "InvalidActionError",
    "NonFiniteError",
    "PluginError",
    "RankFailure",
    "RewardError",
    "RunDirInUse",
    "TokenMDPError",
    "TrainingInterrupted",
    "distributed",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module 'tokenmdp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # read once; later reads are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})


def _register_gymnasium_envs() -> None:
    """Gymnasium's convention: importing the package registers its envs, so that
    ``gymnasium.make("tokenmdp/Pattern-v0")`` (and ``make_vec``) work after ``import
    tokenmdp``, and ``gymnasium.register_envs(tokenmdp)`` is the documented no-op that
    keeps the import. Every installed plugin's envs are registered; a plugin that cannot
    be loaded is a warning here (``tokenmdp plugins`` names the error), not a failed import."""
    from .plugin.catalog import register_installed_envs

    try:
        register_installed_envs()
    except TokenMDPError as exc:
        warnings.warn(f"tokenmdp: no envs registered with Gymnasium: {exc}", stacklevel=2)


_register_gymnasium_envs()
