"""The three component kinds every algorithm is composed of, plus recipes and env specs.

A component class has a ``name``, a frozen attrs ``Options`` class, and ``requires`` /
``provides`` sets of signal names, whose shapes ``signals.py`` declares. Instances may
narrow or widen those sets from their options (e.g. an estimator that only provides
``target_logits`` when asked to).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import attrs
from torch import Tensor

from .signals import Signal


@attrs.frozen
class NoOptions:
    """Options class for components that have no settings."""


class Component:
    """Shared base: holds validated options and the signal contract."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    #: Shapes of the signals of its own this component provides or requires, that
    #: ``signals.SIGNALS`` does not declare: checked like the declared ones. Optional; an
    #: undeclared name is passed on unchecked.
    signal_shapes: ClassVar[tuple[Signal, ...]] = ()
    #: Resources this component puts in ``ctx.extras`` for later components (e.g. PPO's
    #: estimator shares its ``critic``), and those it reads there: a composition whose
    #: component uses a resource no earlier component shares fails at start-up.
    shares: ClassVar[frozenset[str]] = frozenset()
    uses: ClassVar[frozenset[str]] = frozenset()
    #: Metrics (cumulative, in ``metrics.jsonl``) counting the supervision data's tokens
    #: this component consumed, apart from the rollouts (e.g. DPO's preference pairs):
    #: ``tokenmdp compare`` adds them to the env tokens.
    data_token_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        # fixed at construction, never changed after: a component whose signals depend on
        # its options says how in requires_for / provides_for
        self.requires = frozenset(self.requires_for(self.options))
        self.provides = frozenset(self.provides_for(self.options))
        #: The signals the later components of its composition require (set when composed;
        #: None outside one): a component may skip making an expensive signal it provides
        #: that nothing later reads (``conditional-optimal``'s whole ``target_logits``).
        self.read_later: frozenset[str] | None = None

    @classmethod
    def requires_for(cls, options: Any) -> frozenset[str]:
        """The signals an instance with ``options`` reads: ``requires`` unless overridden
        (e.g. no ``ref_logprobs`` when a KL coefficient of 0 never reads the reference)."""
        return cls.requires

    @classmethod
    def provides_for(cls, options: Any) -> frozenset[str]:
        """The signals an instance with ``options`` provides: ``provides`` unless overridden."""
        return cls.provides

    def check(self, config, task) -> None:
        """Called at start-up, before any model is built or any file is written: raise a
        ``ConfigError`` naming the key for a run this component cannot train (its options
        against ``config``, the resolved run config, and ``task``, the env's task)."""

    def setup(self, ctx) -> None:
        """Called once before training (create optimisers, move buffers)."""

    def report(self) -> dict:
        """Extra keys for ``summary.json`` (e.g. the ceiling of a target policy)."""
        return {}

    def guide(self) -> str | tuple[int, ...] | None:
        """The guide ``c`` this component conditions the reference on (its ``[estimator]
        guide`` as text or token ids), or None. On a text env the trainer scores the guided
        reference ``pi_ref(.|c + x)`` on the held-out prompts once, at the end, as
        ``guided_reference`` in ``summary.json``: the row every guide method is read against
        (what distilling the guide can reach at best)."""
        return None

    def state_dict(self) -> dict:
        """Extra state to checkpoint (optimiser, KL controller, ...)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} {self.options}>"


class TrajectoryEstimator(Component):
    """Scores the sampled responses and returns per-token signals."""

    kind = "estimator"
    method = "estimate"

    def estimate(self, batch, ctx) -> Mapping[str, Tensor]:
        raise NotImplementedError


class AdvantageConstructor(Component):
    """Turns signals into per-token ``advantages`` (and optionally ``returns``)."""

    kind = "advantage"
    method = "construct"
    provides = frozenset({"advantages"})

    def construct(self, batch, signals, ctx) -> Mapping[str, Tensor]:
        raise NotImplementedError


class PolicyUpdater(Component):
    """Runs the optimisation step(s) on the policy and returns scalar metrics."""

    kind = "updater"
    method = "update"

    def update(self, batch, signals, advantages, ctx) -> Mapping[str, float]:
        raise NotImplementedError


#: The positional parameters each component's method must accept, after ``self``.
METHOD_PARAMETERS = {
    TrajectoryEstimator: ("batch", "ctx"),
    AdvantageConstructor: ("batch", "signals", "ctx"),
    PolicyUpdater: ("batch", "signals", "advantages", "ctx"),
}


#: The learning rate of the built-in recipes' ``lm_options``: a pretrained LM fine-tuned in
#: full (TRL's trainers default to 1e-6..3e-6, tuned for models of a billion parameters and
#: more), and a LoRA adapter's, 10x as PEFT's and TRL's LoRA examples take.
LM_LR = 1e-5
LORA_LR = 1e-4

#: The sections a recipe gives defaults for, and the only ``[train]`` key among them (the
#: objective's KL weight; the rest of ``[train]`` is the run's, not the algorithm's).
RECIPE_SECTIONS = ("estimator", "advantage", "updater", "train")
RECIPE_TRAIN_KEYS = ("beta",)


def _recipe_options(instance, attribute, value):
    for section, options in value.items():
        if section not in RECIPE_SECTIONS:
            raise ValueError(
                f"recipe {instance.name!r}: {attribute.name} section {section!r} is not one of "
                f"{', '.join(RECIPE_SECTIONS)}"
            )
        extra = sorted(set(options) - set(RECIPE_TRAIN_KEYS)) if section == "train" else []
        if extra:
            raise ValueError(
                f"recipe {instance.name!r}: {attribute.name}['train'] may only set {', '.join(RECIPE_TRAIN_KEYS)} "
                f"(got {', '.join(extra)})"
            )


@attrs.frozen
class Recipe:
    """A named algorithm: which estimator, advantage and updater, with default options.

    ``options`` are the defaults for every policy; a pretrained language model
    (``policy.kind = "hf"``) takes ``lm_options`` over them, and one training a LoRA adapter
    ``lora_options`` over those: a real LM does not survive the learning rates and update
    counts that suit the toy networks (docs/text.md, "Defaults for real LMs")."""

    name: str
    estimator: str
    advantage: str
    updater: str
    options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, validator=_recipe_options)
    description: str = ""
    #: What supervision the recipe consumes: "reward", "pairs" or "none".
    supervision: str = "reward"
    #: Defaults for HF policies, over ``options``, by section ("estimator", "advantage",
    #: "updater", and "train" for ``beta`` only).
    lm_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, validator=_recipe_options)
    #: Defaults for HF policies with ``policy.lora``, over ``lm_options``.
    lora_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, validator=_recipe_options)

    def lm_defaults_for(self, policy: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The LM defaults (``lm_options``, with LoRA's over them) for a ``[policy]`` table,
        by section; none for a toy policy."""
        if policy.get("kind") != "hf":
            return {}
        merged: dict[str, dict[str, Any]] = {}
        for layer in [self.lm_options, self.lora_options] if policy.get("lora") else [self.lm_options]:
            for section, options in layer.items():
                merged.setdefault(section, {}).update(options)
        return merged


@attrs.frozen
class EnvSpec:
    """An environment a plugin contributes; registered as ``tokenmdp/<name>-v0``."""

    name: str
    entry_point: Any
    vector_entry_point: Any = None
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    description: str = ""

    @property
    def id(self) -> str:
        return f"tokenmdp/{self.name}-v0"


@attrs.frozen
class CreditView:
    """A block of rows in ``tokenmdp explain``'s heat maps, contributed by a plugin through
    the ``tokenmdp_credit_views`` hook: one way of giving each sampled token credit.

    ``rows(explain)`` yields ``(label, note, credit)`` with ``credit`` a ``[B, T]`` tensor
    (0 on padding), for the batch ``explain.batch``; ``explain`` also builds components
    like the run (``explain.like_run``), turns an estimator and an advantage constructor
    into credit (``explain.credit_of``) and gives exact values (``explain.exact_values``).
    A ``TokenMDPError`` raised there records the view as skipped for that run."""

    #: Recorded under this name when the view cannot be built for a run.
    name: str
    rows: Callable[[Any], Iterable[tuple[str, str, Tensor]]]
    #: Where the block goes among the rows (smaller first; the built-in views use 10 to 50).
    order: int = 100
    #: The ``(estimator, advantage)`` pairs the view shows. A run whose own pair no view
    #: shows gets a generic row of its own.
    shows: tuple[tuple[str, str], ...] = ()
