"""Signals are declared with shapes (issue 27, item 6): every built-in component's outputs
fit the declarations on a real step, a wrong shape is a one-line error naming the component
and the signal, a component may declare its own signals, and docs/hooks.md lists the table."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from helpers import TINY

import tokenmdp
from tokenmdp.config import load_config
from tokenmdp.errors import CompositionError, PluginError
from tokenmdp.plugin.batch import RolloutBatch
from tokenmdp.plugin.components import AdvantageConstructor, PolicyUpdater, TrajectoryEstimator
from tokenmdp.plugin.composition import check_signals
from tokenmdp.plugin.registry import Registry, plugin_manager
from tokenmdp.plugin.signals import BATCH_SIGNALS, SIGNALS, Signal, check_signal_shapes
from tokenmdp.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
B, T, P, V = 8, 5, 3, 6


def toy_batch() -> RolloutBatch:
    return RolloutBatch(
        prompt_ids=torch.zeros(B, P, dtype=torch.long),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        response_ids=torch.zeros(B, T, dtype=torch.long),
        response_mask=torch.ones(B, T),
        rewards=torch.zeros(B, T),
        prompt_index=torch.arange(B),
    )


class Mine(TrajectoryEstimator):
    name = "mine"
    provides = frozenset({"token_rewards"})

    def estimate(self, batch, ctx):
        return {"token_rewards": batch.rewards}


class Scores(TrajectoryEstimator):
    """Declares a signal of its own: one score per response."""

    name = "scores"
    provides = frozenset({"scores"})
    signal_shapes = (Signal("scores", ("batch",), "floating", "one score per response"),)

    def estimate(self, batch, ctx):
        return {"scores": batch.rewards.sum(1)}


def check(outputs, component=None):
    check_signal_shapes(outputs, toy_batch(), component or Mine(), step=3)


# --- the run-time check ----------------------------------------------------------------


def test_a_wrong_shape_is_one_line_naming_the_component_and_the_signal():
    with pytest.raises(PluginError) as err:
        check({"token_rewards": torch.zeros(B)})
    message = str(err.value)
    assert message == (
        "estimator 'mine' provided token_rewards of shape [8] at step 3; expected [batch, response_len] = [8, 5]"
    )
    assert "\n" not in message


def test_a_transposed_tensor_is_caught_by_its_sizes():
    with pytest.raises(PluginError, match=r"token_rewards of shape \[5, 8\] .* = \[8, 5\]$"):
        check({"token_rewards": torch.zeros(T, B)})


def test_the_right_shapes_pass():
    check({"token_rewards": torch.zeros(B, T), "values": torch.zeros(B, T, dtype=torch.float64)})
    check({"target_logprobs": torch.zeros(B, T), "target_logits": torch.zeros(B, T, V)})


class Biased(TrajectoryEstimator):
    """Declares a signal with the free dimension ``vocab``, as ``target_logits`` has."""

    name = "biased"
    provides = frozenset({"target_logits", "vocab_bias"})
    signal_shapes = (Signal("vocab_bias", ("vocab",), "floating", "a bias per vocabulary entry"),)

    def estimate(self, batch, ctx):
        return {}


def test_a_free_dimension_is_any_size_but_one_size_in_a_call():
    check({"target_logits": torch.zeros(B, T, V + 1), "vocab_bias": torch.zeros(V + 1)}, Biased())
    with pytest.raises(PluginError, match=r"vocab_bias of shape \[7\] at step 3; expected \[vocab\] = \[6\]$"):
        check({"target_logits": torch.zeros(B, T, V), "vocab_bias": torch.zeros(V + 1)}, Biased())
    with pytest.raises(PluginError, match=r"target_logits of shape \[8, 4, 6\] .* = \[8, 5, vocab\]$"):
        check({"target_logits": torch.zeros(B, T - 1, V)})


def test_a_wrong_dtype_or_a_non_tensor_is_named():
    with pytest.raises(PluginError, match=r"provided advantages of dtype torch.int64 at step 3; expected a floating"):
        check({"advantages": torch.zeros(B, T, dtype=torch.long)})
    with pytest.raises(PluginError, match=r"provided returns of type list at step 3; expected a floating tensor"):
        check({"returns": [0.0] * B})


def test_undeclared_names_and_non_tensor_signals_pass_unchecked():
    check({"my_own_thing": torch.zeros(3), "preference_pairs": object(), "stats": 1.0})


def test_a_components_own_declaration_is_checked():
    check({"scores": torch.zeros(B)}, Scores())
    with pytest.raises(PluginError, match=r"estimator 'scores' provided scores of shape \[8, 5\] .*\[batch\] = \[8\]$"):
        check({"scores": torch.zeros(B, T)}, Scores())


# --- the start-up check ------------------------------------------------------------------


class Reads(AdvantageConstructor):
    name = "reads"
    requires = frozenset({"scores"})
    signal_shapes = (Signal("scores", ("batch", "response_len"), "floating", "a score per token"),)

    def construct(self, batch, signals, ctx):
        return {"advantages": signals["scores"]}


class Plain(AdvantageConstructor):
    name = "plain"
    requires = frozenset({"token_rewards"})

    def construct(self, batch, signals, ctx):
        return {"advantages": signals["token_rewards"]}


class Noop(PolicyUpdater):
    name = "noop"

    def update(self, batch, signals, advantages, ctx):
        return {}


def test_components_that_declare_one_signal_two_ways_fail_at_start_up():
    with pytest.raises(CompositionError) as err:
        check_signals({"estimator": Scores(), "advantage": Reads(), "updater": Noop()})
    assert str(err.value) == (
        "advantage 'reads' declares signal scores as a floating tensor [batch, response_len], but estimator "
        "'scores' declares it as a floating tensor [batch]"
    )


def test_a_component_may_not_redeclare_a_core_signal_otherwise():
    class Flat(Mine):
        signal_shapes = (Signal("token_rewards", ("batch",), "floating", "one per response"),)

    with pytest.raises(CompositionError, match=r"declares signal token_rewards as .*\[batch\], but tokenmdp declares"):
        check_signals({"estimator": Flat(), "advantage": Plain(), "updater": Noop()})


def test_a_malformed_declaration_is_a_plugin_error():
    class Bad(Mine):
        signal_shapes = ("token_rewards",)

    with pytest.raises(PluginError, match="estimator 'mine': signal_shapes must hold tokenmdp.Signal"):
        check_signals({"estimator": Bad(), "advantage": Plain(), "updater": Noop()})
    with pytest.raises(ValueError, match="shape must be a tuple of dimension names"):
        Signal("x", "batch", "floating", "")


# --- the built-in components, on a real step --------------------------------------------


def builtin_registry() -> Registry:
    return Registry(plugin_manager())


def is_builtin(obj) -> bool:
    return Path(inspect.getfile(obj)).resolve().is_relative_to(ROOT)


def test_every_builtin_components_signals_are_declared():
    registry = builtin_registry()
    for kind, table in registry.components.items():
        for entry in table.values():
            if is_builtin(entry.obj):
                own = {s.name for s in entry.obj.signal_shapes}  # a plugin's own, declared with it
                undeclared = (entry.obj.requires | entry.obj.provides) - set(SIGNALS) - own
                assert not undeclared, f"{kind} {entry.name!r} uses undeclared signal(s) {sorted(undeclared)}"


#: What each recipe needs to train one step in a second.
RECIPE_OVERRIDES = {
    "dpo": ["estimator.num_pairs=16"],
    "dpo-online": ["estimator.num_pairs=16"],
    "tdpo": ["estimator.num_pairs=16"],
    "ppo-rm": ["estimator.reward_pairs=32", "estimator.reward_epochs=1"],
}
#: Options that change how a signal is computed, run besides each recipe's defaults.
VARIANTS = [("ppo", "estimator.critic=head"), ("inverse-q", "estimator.full_vocab=false")]
#: The built-in recipes (test_the_recipe_list_is_complete keeps this in step).
RECIPES = [
    "context-distill",
    "dpo",
    "dpo-online",
    "grpo",
    "inverse-q",
    "inverse-q-distill",
    "ppo",
    "ppo-rm",
    "reinforce",
    "rloo",
    "tdpo",
]


def test_the_recipe_list_is_complete():
    registry = builtin_registry()
    plugins = {entry.plugin for entry in registry.recipes.values()}
    builtin = {name for name in plugins if is_builtin(registry.pm.get_plugin(name))}
    assert sorted(e.name for e in registry.recipes.values() if e.plugin in builtin) == RECIPES


class ShapeChecks:
    """A plugin that checks, from the first lifecycle hook, what each component returns."""

    __name__ = "shape_checks"

    def __init__(self):
        self.checked: dict[str, set[str]] = {}

    @tokenmdp.hookimpl
    def tokenmdp_on_train_start(self, run):
        for component in run.composition.components[:2]:
            self.wrap(component, component.method)

    def wrap(self, component, method):
        call = getattr(component, method)

        def checked(batch, *args):
            outputs = call(batch, *args)
            check_signal_shapes(outputs, batch, component, step=0)
            self.checked.setdefault(component.kind, set()).update(outputs)
            return outputs

        setattr(component, method, checked)


def one_step(tmp_path, recipe: str, *overrides: str):
    common = [*TINY, f"algorithm.name={recipe}", "train.steps=1", "train.batch_size=8", "train.eval_every=1"]
    return load_config(None, [*common, *RECIPE_OVERRIDES.get(recipe, []), *overrides, f"run.dir={tmp_path / 'run'}"])


@pytest.mark.parametrize(("recipe", "option"), [*((r, None) for r in RECIPES), *VARIANTS])
def test_every_recipe_provides_its_signals_in_their_declared_shapes(recipe, option, tmp_path):
    config = one_step(tmp_path, recipe, *([option] if option else []))
    checks = ShapeChecks()
    trainer = Trainer(config, pm=plugin_manager(extra_plugins=[checks]))
    trainer.train()
    estimator, advantage, _ = trainer.composition.components
    # every signal the two components declare was returned, and checked, except one that no
    # later component reads (read_later: conditional-optimal's whole target_logits)
    for kind, component in (("estimator", estimator), ("advantage", advantage)):
        skipped = component.provides - checks.checked[kind]
        assert not skipped & component.read_later, (kind, skipped)
        assert skipped <= {"target_logits"}
    declared = set(SIGNALS) | {s.name for c in (estimator, advantage) for s in c.signal_shapes}
    assert all(name in declared for names in checks.checked.values() for name in names)


# --- the documentation -------------------------------------------------------------------


def signal_table() -> dict[str, list[str]]:
    """docs/hooks.md's "Signals" table: name -> its cells."""
    text = (ROOT / "docs" / "hooks.md").read_text()
    section = text.split("\n## Signals\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    return {re.sub(r"`", "", cells[0]).strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_the_docs_list_every_declared_signal_with_its_shape_and_dtype():
    table = signal_table()
    assert set(table) == set(SIGNALS)
    for name, signal in SIGNALS.items():
        shape, dtype = table[name][0].strip("`"), table[name][1].strip("`")
        assert (shape, dtype) == (signal.describe() if signal.is_tensor else "-", signal.dtype), name
    assert {name for name, cells in table.items() if "rollout batch" in cells[2]} == BATCH_SIGNALS


class FlatRewards(TrajectoryEstimator):
    """One reward per response, where token_rewards are one per token."""

    name = "flat-rewards"
    requires = frozenset({"rewards"})
    provides = frozenset({"token_rewards"})

    def estimate(self, batch, ctx):
        return {"token_rewards": batch.rewards.sum(1)}


class FlatPlugin:
    __name__ = "flat_plugin"

    @tokenmdp.hookimpl
    def tokenmdp_trajectory_estimators(self):
        return [FlatRewards]


def test_training_stops_at_a_wrong_shape_naming_the_component(tmp_path):
    """The trainer checks each estimate and construct (train_step, next to check_finite),
    before a later component reads the signal and fails with a message about itself."""
    config = one_step(tmp_path, "reinforce", "algorithm.estimator=flat-rewards")
    trainer = Trainer(config, pm=plugin_manager(extra_plugins=[FlatPlugin()]))
    with pytest.raises(PluginError) as err:
        trainer.train()
    assert str(err.value) == (
        "estimator 'flat-rewards' provided token_rewards of shape [8] at step 1; "
        "expected [batch, response_len] = [8, 3]"
    )
