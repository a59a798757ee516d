"""Discovery, blocking, validation and the requires/provides check."""

import subprocess
import sys
import types

import pytest

import tokenmdp
from tokenmdp import AdvantageConstructor, CompositionError, PluginError, hookimpl
from tokenmdp.config import load_config
from tokenmdp.plugin.composition import compose
from tokenmdp.plugin.registry import Registry, plugin_manager


def registry(*extra):
    return Registry(plugin_manager(extra_plugins=extra))


def test_builtins_are_discovered_through_entry_points():
    pm = plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"reinforce", "loggers", "toy-envs"} <= names
    reg = Registry(pm)
    assert "reinforce" in reg.recipes
    assert {"Pattern", "SumMod", "Forbidden", "Bandit"} <= set(reg.envs)
    # The outside fixture package is installed with nothing but its entry point.
    assert reg.components["advantage"]["signed-return"].plugin == "outside-advantage"


def test_block_by_environment_variable(monkeypatch):
    monkeypatch.setenv("TOKENMDP_DISABLE_PLUGINS", "outside-advantage, reinforce")
    reg = registry()
    assert "signed-return" not in reg.components["advantage"]
    assert "reinforce" not in reg.recipes
    with pytest.raises(PluginError, match="unknown recipe 'reinforce'; available"):
        reg.recipe("reinforce")


def test_unknown_names_list_the_choices():
    reg = registry()
    with pytest.raises(PluginError, match=r"unknown advantage 'nope'; available: .*reward-to-go"):
        reg.component("advantage", "nope")
    with pytest.raises(PluginError, match=r"unknown env 'tokenmdp/Nope-v0'; available: .*tokenmdp/Pattern-v0"):
        reg.env("tokenmdp/Nope-v0")


def test_wrong_hookimpl_signature_is_reported_with_plugin_name():
    bad = types.ModuleType("bad_signature_plugin")

    @hookimpl
    def tokenmdp_on_step_end(step, metrics, extra_argument):
        pass

    bad.tokenmdp_on_step_end = tokenmdp_on_step_end
    with pytest.raises(PluginError, match="bad_signature_plugin.*extra_argument"):
        plugin_manager(extra_plugins=[bad])


def test_unknown_hook_name_is_rejected():
    bad = types.ModuleType("typo_plugin")

    @hookimpl
    def tokenmdp_advantage_constructorz():
        return []

    bad.tokenmdp_advantage_constructorz = tokenmdp_advantage_constructorz
    with pytest.raises(PluginError, match="typo_plugin.*known hooks"):
        plugin_manager(extra_plugins=[bad])


def _plugin_with(cls, name="extra_plugin"):
    mod = types.ModuleType(name)

    @hookimpl
    def tokenmdp_advantage_constructors():
        return [cls]

    mod.tokenmdp_advantage_constructors = tokenmdp_advantage_constructors
    return mod


def test_duplicate_component_name_names_both_plugins():
    class Clash(AdvantageConstructor):
        name = "reward-to-go"

        def construct(self, batch, signals, ctx):
            return {"advantages": signals["token_rewards"]}

    with pytest.raises(
        PluginError,
        match=r"duplicate name 'reward-to-go'.*'reinforce'.*'clash_plugin'"
        r"|duplicate name 'reward-to-go'.*'clash_plugin'.*'reinforce'",
    ):
        registry(_plugin_with(Clash, "clash_plugin"))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: setattr(c, "construct", lambda self, batch, ctx: None),
            r"parameters \(batch, ctx\); expected \(batch, signals, ctx\)",
        ),
        (lambda c: setattr(c, "Options", dict), "Options"),
        (lambda c: setattr(c, "requires", ["x"]), "requires"),
        (lambda c: setattr(c, "name", ""), "name"),
    ],
)
def test_malformed_component_is_rejected(mutate, message):
    class Bad(AdvantageConstructor):
        name = "bad-one"

        def construct(self, batch, signals, ctx):
            return {}

    mutate(Bad)
    with pytest.raises(PluginError, match=message):
        registry(_plugin_with(Bad))


def test_impossible_composition_names_the_missing_signal():
    class NeedsValues(AdvantageConstructor):
        name = "needs-values"
        requires = frozenset({"token_rewards", "values"})

        def construct(self, batch, signals, ctx):
            return {"advantages": signals["values"]}

    reg = registry(_plugin_with(NeedsValues))
    config = load_config(None, ["algorithm.name=reinforce", "algorithm.advantage=needs-values"])
    with pytest.raises(CompositionError, match="advantage 'needs-values' requires signal\\(s\\) values"):
        compose(reg, config)


def test_recipe_options_and_overrides():
    reg = registry()
    config = load_config(None, ["algorithm.name=reinforce", "advantage.whiten=true"])
    comp = compose(reg, config)
    assert comp.advantage.options.whiten is True
    assert comp.needs_env_reward
    bad = load_config(None, ["algorithm.name=reinforce", "updater.lr=-1"])
    with pytest.raises(tokenmdp.ConfigError, match=r"\[updater\] \(policy-gradient\): lr must be a number > 0"):
        compose(reg, bad)
    unknown = load_config(None, ["algorithm.name=reinforce", "updater.learning_rate=1"])
    with pytest.raises(tokenmdp.ConfigError, match="unknown option.*learning_rate.*valid options: .*max_grad_norm.*lr"):
        compose(reg, unknown)


def test_cli_plugins_lists_every_component_with_source():
    out = subprocess.run(
        [sys.executable, "-m", "tokenmdp", "plugins"], capture_output=True, text=True, check=True
    ).stdout
    for name in [
        "kl-penalised-reward",
        "reward-to-go",
        "policy-gradient",
        "reinforce",
        "signed-return",
        "tokenmdp/Pattern-v0",
    ]:
        assert name in out
    assert "tokenmdp-outside-advantage 0.1.0" in out


def test_every_registration_hook_contributes():
    """A plugin can add a component of every kind, a recipe and an env through the five
    registration hooks, and each lands in the registry under the plugin's name."""
    from tokenmdp import EnvSpec, PolicyUpdater, Recipe, TrajectoryEstimator

    class Est(TrajectoryEstimator):
        name = "est-x"

        def estimate(self, batch, ctx):
            return {}

    class Adv(AdvantageConstructor):
        name = "adv-x"

        def construct(self, batch, signals, ctx):
            return {"advantages": batch.rewards}

    class Upd(PolicyUpdater):
        name = "upd-x"

        def update(self, batch, signals, advantages, ctx):
            return {}

    mod = types.ModuleType("every_hook_plugin")
    hooks = {
        "tokenmdp_trajectory_estimators": lambda: [Est],
        "tokenmdp_advantage_constructors": lambda: [Adv],
        "tokenmdp_policy_updaters": lambda: [Upd],
        "tokenmdp_algorithms": lambda: [Recipe(name="recipe-x", estimator="est-x", advantage="adv-x", updater="upd-x")],
        "tokenmdp_envs": lambda: [EnvSpec(name="X", entry_point="tokenmdp_envs:PatternTask")],
    }
    for name, fn in hooks.items():
        setattr(mod, name, hookimpl(fn))
    reg = registry(mod)
    for kind, name in [("estimator", "est-x"), ("advantage", "adv-x"), ("updater", "upd-x")]:
        assert reg.components[kind][name].plugin == "every_hook_plugin"
    assert reg.recipes["recipe-x"].plugin == "every_hook_plugin"
    assert reg.env("tokenmdp/X-v0").name == "X"
    comp = compose(reg, load_config(None, ["algorithm.name=recipe-x"]))
    assert (comp.estimator.name, comp.advantage.name, comp.updater.name) == ("est-x", "adv-x", "upd-x")
