"""tokenmdp: token-level RL for language models, scored against the exact optimum.

This namespace is the one public API for plugin and environment authors: everything an
estimator, advantage constructor, updater or environment needs is importable from
``tokenmdp`` itself, and the built-in plugins import nothing else. The submodules
(``tokenmdp.plugin``, ``.mdp``, ``.policies``, ``.train``, ``.text``, ``.reports``) are the
implementation; docs/architecture.md draws them.
"""

from . import _moved, distributed
from .devices import module_device
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
from .mdp.env import TokenMDPEnv, TokenTask, TokenVectorEnv
from .mdp.solver import Solution, solve, tree_logprobs
from .options import non_negative, non_negative_int, one_of, optional, positive, positive_int, probability
from .plugin.batch import RolloutBatch, concat_batches, response_logits, token_logprobs
from .plugin.components import (
    AdvantageConstructor,
    Component,
    CreditView,
    EnvSpec,
    NoOptions,
    PolicyUpdater,
    Recipe,
    TrajectoryEstimator,
)
from .plugin.context import TrainContext
from .plugin.hookspecs import hookspec
from .plugin.ops import (
    at_least_float32,
    check_finite,
    masked_correlation,
    masked_mean,
    masked_sum,
    masked_whiten,
    suffix_sums,
    zero_padding,
)
from .plugin.registry import Registry, hookimpl, plugin_manager
from .plugin.sampling import Samples, SamplingBackend, SamplingParams
from .plugin.updaters import GradientOptions, GradientUpdater, MicroBatch, OptimizerOptions, entropy_of
from .policies import GRUPolicy, TaskBasePolicy, TokenPolicy, build_policy
from .text import TextTask
from .train.export import export_run, load_exported
from .train.preferences import PairBatch, load_pair_file, sample_pairs, sequence_rewards
from .train.rollout import generate, generate_samples
from .train.trainer import load_policy

_moved.install()

__version__ = "0.1.0"

__all__ = [
    "AdvantageConstructor",
    "CheckpointError",
    "Component",
    "CreditView",
    "CompositionError",
    "ConfigError",
    "EnvSpec",
    "GRUPolicy",
    "GradientOptions",
    "GradientUpdater",
    "InvalidActionError",
    "MicroBatch",
    "NoOptions",
    "NonFiniteError",
    "OptimizerOptions",
    "PairBatch",
    "PluginError",
    "PolicyUpdater",
    "RankFailure",
    "Recipe",
    "Registry",
    "RewardError",
    "RunDirInUse",
    "RolloutBatch",
    "Samples",
    "SamplingBackend",
    "SamplingParams",
    "Solution",
    "TaskBasePolicy",
    "TextTask",
    "TokenMDPEnv",
    "TokenMDPError",
    "TokenPolicy",
    "TokenTask",
    "TokenVectorEnv",
    "TrainContext",
    "TrainingInterrupted",
    "TrajectoryEstimator",
    "at_least_float32",
    "build_policy",
    "check_finite",
    "concat_batches",
    "distributed",
    "entropy_of",
    "export_run",
    "generate",
    "generate_samples",
    "hookimpl",
    "hookspec",
    "load_exported",
    "load_pair_file",
    "load_policy",
    "masked_correlation",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "module_device",
    "non_negative",
    "non_negative_int",
    "one_of",
    "optional",
    "plugin_manager",
    "positive",
    "positive_int",
    "probability",
    "response_logits",
    "sample_pairs",
    "sequence_rewards",
    "solve",
    "suffix_sums",
    "token_logprobs",
    "tree_logprobs",
    "zero_padding",
]


def _register_gymnasium_envs() -> None:
    """Gymnasium's convention: importing the package registers its envs, so that
    ``gymnasium.make("tokenmdp/Pattern-v0")`` (and ``make_vec``) work after ``import
    tokenmdp``, and ``gymnasium.register_envs(tokenmdp)`` is the documented no-op that
    keeps the import. Every installed plugin's envs are registered; a plugin that cannot
    be loaded is a warning here (``tokenmdp plugins`` names the error), not a failed import."""
    import warnings

    try:
        Registry(plugin_manager()).register_envs()
    except TokenMDPError as exc:
        warnings.warn(f"tokenmdp: no envs registered with Gymnasium: {exc}", stacklevel=2)


_register_gymnasium_envs()
