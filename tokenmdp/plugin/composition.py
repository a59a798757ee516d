"""Turn ``[algorithm]`` + component option tables into three checked component instances.

Everything here runs before any run directory is created or any model is built, so a
composition that cannot work fails at start-up with the missing signal named.
"""

from __future__ import annotations

import attrs

from ..config import Config
from ..errors import CompositionError, PluginError
from ..options import build
from .components import Component
from .registry import Registry
from .signals import BATCH_SIGNALS, SIGNALS, Signal

KINDS = ("estimator", "advantage", "updater")
#: ``train.beta`` when neither the config nor its recipe sets it.
DEFAULT_BETA = 1.0


@attrs.frozen
class Composition:
    estimator: Component
    advantage: Component
    updater: Component
    recipe: str | None

    @property
    def components(self) -> tuple[Component, Component, Component]:
        return self.estimator, self.advantage, self.updater

    @property
    def needs_env_reward(self) -> bool:
        """Whether any component reads the environment's reward."""
        return any("rewards" in c.requires for c in self.components)

    def describe(self) -> dict:
        return {c.kind: c.name for c in self.components} | {"recipe": self.recipe}


def compose(registry: Registry, config: Config) -> Composition:
    algo = config.algorithm
    recipe = registry.recipe(algo.name) if algo.name else None
    parts = {}
    for kind in KINDS:
        name = getattr(algo, kind) or (getattr(recipe, kind) if recipe else None)
        if name is None:
            raise CompositionError(
                f"algorithm.{kind} is not set; set algorithm.name to a recipe "
                f"({', '.join(sorted(registry.recipes)) or 'none installed'}) or name the {kind}"
            )
        cls = registry.component(kind, name)
        defaults = dict(recipe.options.get(kind, {})) if recipe and getattr(recipe, kind) == name else {}
        options = build(cls.Options, defaults | getattr(config, kind), f"[{kind}] ({name})")
        parts[kind] = cls(options)
    check_signals(parts)
    for i, kind in enumerate(KINDS):
        parts[kind].read_later = frozenset().union(*(parts[later].requires for later in KINDS[i + 1 :]))
    return Composition(**parts, recipe=recipe.name if recipe else None)


def with_recipe_defaults(registry: Registry, config: Config) -> tuple[Config, dict[str, object]]:
    """``config`` as a fresh run records it: its recipe's LM defaults (an HF policy's:
    ``Recipe.lm_options``, LoRA's over them) written into the sections that do not set them,
    and ``train.beta`` resolved (unset: the recipe's, else 1.0). Also returns the LM values
    written, as ``{"section.key": value}``, for the start-up line.

    The LM values go into the config rather than into :func:`compose`, so that ``config.toml``
    says what the run trained with and a resume never picks up defaults that changed since."""
    algo = config.algorithm
    recipe = registry.recipe(algo.name) if algo.name else None
    lm = recipe.lm_defaults_for(config.policy) if recipe else {}
    applied: dict[str, object] = {}
    changes = {}
    for kind in KINDS:
        if getattr(algo, kind) not in (None, getattr(recipe, kind, None)):
            continue  # the recipe's defaults are for its own component, not a replacement
        table = dict(getattr(config, kind))
        for key, value in lm.get(kind, {}).items():
            if key not in table:
                table[key] = applied[f"{kind}.{key}"] = value
        changes[kind] = table
    beta = config.train.beta
    if beta is None and "beta" in lm.get("train", {}):
        beta = applied["train.beta"] = lm["train"]["beta"]
    elif beta is None:
        beta = (recipe.options.get("train", {}) if recipe else {}).get("beta", DEFAULT_BETA)
    changes["train"] = attrs.evolve(config.train, beta=beta)
    return attrs.evolve(config, **changes), applied


def lm_defaults_line(config: Config, applied: dict[str, object]) -> str:
    """One line naming the LM defaults a run took (:func:`with_recipe_defaults`); "" if none."""
    if not applied:
        return ""
    lora = " with LoRA" if config.policy.get("lora") else ""
    values = ", ".join(f"{key} = {value!r}" for key, value in applied.items())
    return (
        f"recipe {config.algorithm.name!r} on an HF policy{lora}: LM defaults {values} (set any of them to "
        f"override; tokenmdp options {config.algorithm.name})"
    )


def check_signals(parts: dict[str, Component]) -> None:
    available = set(BATCH_SIGNALS)
    origin = {s: "the rollout batch" for s in BATCH_SIGNALS}
    for kind in KINDS:
        component = parts[kind]
        missing = sorted(component.requires - available)
        if missing:
            have = ", ".join(f"{s} (from {origin[s]})" for s in sorted(available - BATCH_SIGNALS)) or "none"
            raise CompositionError(
                f"{kind} {component.name!r} requires signal(s) {', '.join(missing)}, which no earlier "
                f"component provides; signals from components: {have}"
            )
        for signal in component.provides:
            origin.setdefault(signal, f"{kind} {component.name!r}")
        available |= component.provides
    shared: dict[str, str] = {}
    for kind in KINDS:
        component = parts[kind]
        missing = sorted(component.uses - set(shared))
        if missing:
            have = ", ".join(f"{r} (from {shared[r]})" for r in sorted(shared)) or "none"
            raise CompositionError(
                f"{kind} {component.name!r} uses resource(s) {', '.join(missing)} (ctx.extras), which no "
                f"earlier component shares; shared resources: {have}"
            )
        for resource in component.shares:
            shared.setdefault(resource, f"{kind} {component.name!r}")
    if "advantages" not in parts["advantage"].provides:
        raise CompositionError(f"advantage {parts['advantage'].name!r} must provide 'advantages'")
    check_declarations(parts)


def check_declarations(parts: dict[str, Component]) -> None:
    """The signals the components declare themselves (``signal_shapes``) agree with
    ``signals.SIGNALS`` and with one another, so that each name has one shape in a run."""
    declared = {name: (signal, "tokenmdp") for name, signal in SIGNALS.items()}
    for kind in KINDS:
        component = parts[kind]
        for signal in component.signal_shapes:
            if not isinstance(signal, Signal):
                raise PluginError(
                    f"{kind} {component.name!r}: signal_shapes must hold tokenmdp.Signal declarations, got {signal!r}"
                )
            known, where = declared.setdefault(signal.name, (signal, f"{kind} {component.name!r}"))
            if not known.agrees_with(signal):
                raise CompositionError(
                    f"{kind} {component.name!r} declares signal {signal.name} as {signal.in_words()}, but {where} "
                    f"declares it as {known.in_words()}"
                )
