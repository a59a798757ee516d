"""User-facing errors. The CLI prints these as one line, without a traceback."""


class TokenMDPError(Exception):
    """A problem the user can fix: bad config, unknown name, impossible composition."""


class ConfigError(TokenMDPError):
    """A config value, TOML file or ``--set`` override is invalid."""


class PluginError(TokenMDPError):
    """A plugin is malformed, duplicated, unknown or failed inside a hook."""


class CompositionError(TokenMDPError):
    """The chosen estimator/advantage/updater cannot work together."""


class NonFiniteError(TokenMDPError):
    """A loss, advantage or signal became NaN or infinite; the run is stopped."""


class RewardError(TokenMDPError):
    """A reward callable (text envs) raised or returned something that is not a finite number."""


class InvalidActionError(TokenMDPError, ValueError):
    """An action outside ``Discrete(vocab_size)``."""


class CheckpointError(TokenMDPError):
    """A checkpoint or run file could not be written (disk full, no permission, ...); the
    file it would have replaced is unchanged."""


class TrainingInterrupted(TokenMDPError):
    """SIGINT or SIGTERM arrived; the step in flight was finished and checkpointed.
    ``signum`` is the signal (the CLI exits with 128 + signum: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum


class RankFailure(TokenMDPError):
    """Another rank of a distributed run failed; this one stops at the same point."""


class RankLost(TokenMDPError):
    """Another rank of a distributed run died or stopped answering (a collective failed);
    this one stops too, keeping its newest checkpoint."""


class RunDirInUse(TokenMDPError):
    """Another tokenmdp process holds the run directory's lock."""
