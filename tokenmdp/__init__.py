"""tokenmdp: token-level RL for language models, scored against the exact optimum."""

from .components import (
    AdvantageConstructor,
    EnvSpec,
    NoOptions,
    PolicyUpdater,
    Recipe,
    TrajectoryEstimator,
)
from .errors import CompositionError, ConfigError, NonFiniteError, PluginError, TokenMDPError
from .hookspecs import hookspec
from .plugins import Registry, hookimpl, plugin_manager

__version__ = "0.1.0"

__all__ = [
    "AdvantageConstructor",
    "CompositionError",
    "ConfigError",
    "EnvSpec",
    "NoOptions",
    "NonFiniteError",
    "PluginError",
    "PolicyUpdater",
    "Recipe",
    "Registry",
    "TokenMDPError",
    "TrajectoryEstimator",
    "hookimpl",
    "hookspec",
    "plugin_manager",
]
