"""Every hook of tokenmdp. Plugins implement them with ``@tokenmdp.hookimpl``.

Registration hooks return lists that are concatenated across plugins; lifecycle hooks
are called by keyword, so an implementation may accept any subset of the arguments.
"""

import pluggy

hookspec = pluggy.HookspecMarker("tokenmdp")


@hookspec
def tokenmdp_trajectory_estimators():
    """Return a list of TrajectoryEstimator classes this plugin provides."""


@hookspec
def tokenmdp_advantage_constructors():
    """Return a list of AdvantageConstructor classes this plugin provides."""


@hookspec
def tokenmdp_policy_updaters():
    """Return a list of PolicyUpdater classes this plugin provides."""


@hookspec
def tokenmdp_algorithms():
    """Return a list of Recipe objects: named estimator + advantage + updater compositions."""


@hookspec
def tokenmdp_envs():
    """Return a list of EnvSpec objects, registered with Gymnasium as ``tokenmdp/<Name>-v0``."""


@hookspec
def tokenmdp_sampling_backends():
    """Return a list of SamplingBackend classes (``train.sampling_backend`` names one)."""


@hookspec
def tokenmdp_on_train_start(run):
    """Called once after set-up and before the first step; ``run`` exposes dir, config, resources."""


@hookspec
def tokenmdp_on_step_end(run, step, metrics):
    """Called after every training step with that step's metrics dict."""


@hookspec
def tokenmdp_on_completions(run, step, completions):
    """Called every ``train.log_completions`` steps, after ``tokenmdp_on_step_end``, with a
    sample of that step's responses (also written to ``completions.jsonl``): a list of
    ``{"prompt", "completion", "reward"}`` dicts (text for text tasks, token-id lists for
    toy tasks; ``reward`` None for a reward-free run)."""


@hookspec
def tokenmdp_on_train_end(run, summary, outcome):
    """Called once when training ends, however it ends, if ``tokenmdp_on_train_start`` was
    called: ``outcome`` is ``"completed"`` (``summary`` is the final summary dict),
    ``"interrupted"`` (Ctrl-C; the last step was checkpointed) or ``"failed"`` (``summary``
    is None). Close files and release resources here."""


@hookspec
def tokenmdp_credit_views(explain):
    """Return a list of ``CreditView`` rows for ``tokenmdp explain``: this plugin's ways of
    assigning per-token credit, computed on ``explain.batch`` beside the true A*."""
