"""Plugin discovery (entry-point group ``tokenmdp``) and the component registry.

Built-in plugins and environments are loaded exactly like third-party ones. Set
``TOKENMDP_DISABLE_PLUGINS=name1,name2`` to block plugins by entry-point name.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import attrs
import gymnasium
import pluggy

from ..errors import PluginError
from . import hookspecs
from .components import (
    METHOD_PARAMETERS,
    AdvantageConstructor,
    Component,
    EnvSpec,
    PolicyUpdater,
    Recipe,
    TrajectoryEstimator,
)
from .entry_points import ENTRY_POINT_GROUP, InstalledEnv, blocked_plugin_names
from .sampling import SamplingBackend

PROJECT = "tokenmdp"

hookimpl = pluggy.HookimplMarker(PROJECT)

_COMPONENT_HOOKS = {
    "estimator": ("tokenmdp_trajectory_estimators", TrajectoryEstimator),
    "advantage": ("tokenmdp_advantage_constructors", AdvantageConstructor),
    "updater": ("tokenmdp_policy_updaters", PolicyUpdater),
}


def plugin_manager(extra_plugins: Iterable[Any] = ()) -> pluggy.PluginManager:
    """Load every plugin of the ``tokenmdp`` entry-point group and validate the hooks."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in blocked_plugin_names():
        pm.set_blocked(name)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # an outside plugin that cannot even import
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        _register(pm, plugin, ep.name)
    for plugin in extra_plugins:
        _register(pm, plugin, getattr(plugin, "__name__", None))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r}: {exc}; known hooks: {', '.join(_hook_names())}") from None
    return pm


def _hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("tokenmdp_"))


def _register(pm: pluggy.PluginManager, plugin: Any, name: str | None) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise PluginError(f"plugin {name!r} has a bad hook implementation: {detail}") from None
    except ValueError as exc:  # pluggy: name or object already registered
        raise PluginError(f"plugin {name!r} could not be registered: {exc}") from None


@attrs.frozen
class Entry:
    """One registered thing and the plugin it came from."""

    name: str
    obj: Any
    plugin: str
    source: str


class Registry:
    """Everything the plugins contribute, by kind, with duplicate and shape checks."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        # module -> distribution of each installed entry point, read once (reading entry
        # points scans every installed distribution)
        self._dists = {ep.value.split(":")[0]: ep.dist for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
        self.components: dict[str, dict[str, Entry]] = {}
        for kind, (hook_name, base) in _COMPONENT_HOOKS.items():
            self.components[kind] = self._collect(
                hook_name, lambda obj, plugin, b=base: _check_component(obj, b, plugin)
            )
        self.recipes = self._collect("tokenmdp_algorithms", lambda obj, plugin: _check_instance(obj, Recipe, plugin))
        self.envs = self._collect("tokenmdp_envs", lambda obj, plugin: _check_instance(obj, EnvSpec, plugin))
        self.sampling_backends = self._collect("tokenmdp_sampling_backends", _check_sampling_backend)

    def _collect(self, hook_name: str, check) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:
                items = impl.function() or []
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} raised in {hook_name}: {exc}") from exc
            for obj in items:
                check(obj, impl.plugin_name)
                name = obj.name
                if name in found:
                    raise PluginError(
                        f"duplicate name {name!r} from {hook_name}: provided by plugin "
                        f"{found[name].plugin!r} and by plugin {impl.plugin_name!r}"
                    )
                found[name] = Entry(name, obj, impl.plugin_name, _source_of(impl.plugin, self._dists))
        return found

    def component(self, kind: str, name: str) -> type[Component]:
        return self._lookup(self.components[kind], name, kind).obj

    def sampling_backend(self, name: str) -> type[SamplingBackend]:
        return self._lookup(self.sampling_backends, name, "train.sampling_backend").obj

    def recipe(self, name: str) -> Recipe:
        return self._lookup(self.recipes, name, "recipe").obj

    def env(self, name_or_id: str) -> EnvSpec:
        by_id = {e.obj.id: e for e in self.envs.values()}
        if name_or_id in by_id:
            return by_id[name_or_id].obj
        return self._lookup(self.envs, name_or_id, "env", choices=sorted(by_id)).obj

    @staticmethod
    def _lookup(table: dict[str, Entry], name: str, what: str, choices=None) -> Entry:
        if name not in table:
            valid = choices if choices is not None else sorted(table)
            raise PluginError(f"unknown {what} {name!r}; available: {', '.join(valid) or '(none)'}")
        return table[name]

    def register_envs(self) -> None:
        """Register every env spec with Gymnasium (idempotent). An id that ``import
        tokenmdp`` registered from the catalog gets the plugin's own entry point, now
        that the plugins are loaded."""
        for entry in self.envs.values():
            spec = entry.obj
            known = gymnasium.registry.get(spec.id)
            if known is not None and not isinstance(known.entry_point, InstalledEnv):
                continue
            gymnasium.registry.pop(spec.id, None)
            gymnasium.register(
                id=spec.id,
                entry_point=spec.entry_point,
                vector_entry_point=spec.vector_entry_point,
                kwargs=dict(spec.kwargs),
                disable_env_checker=True,
            )

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(kind, name, plugin, source) for every contribution, for ``tokenmdp plugins``."""
        out = []
        for kind, table in [*self.components.items(), ("recipe", self.recipes), ("env", self.envs)]:
            for entry in table.values():
                out.append((kind, entry.obj.id if kind == "env" else entry.name, entry.plugin, entry.source))
        return out


def _source_of(plugin: Any, dists: dict[str, Any]) -> str:
    """Where a plugin comes from: its distribution and version (if installed by an entry
    point) and its file."""
    module = inspect.getmodule(plugin) if not inspect.ismodule(plugin) else plugin
    dist = dists.get(module.__name__) if module is not None else None
    where = getattr(module, "__file__", None) or "?"
    if dist is not None:
        return f"{dist.name} {dist.version} ({where})"
    return where


def _check_instance(obj: Any, cls: type, plugin: str) -> None:
    if not isinstance(obj, cls):
        raise PluginError(f"plugin {plugin!r} returned {obj!r}; expected a {cls.__name__}")


def _check_sampling_backend(obj: Any, plugin: str) -> None:
    what = f"plugin {plugin!r} sampling backend {getattr(obj, 'name', obj)!r}"
    if not (isinstance(obj, type) and issubclass(obj, SamplingBackend)):
        raise PluginError(f"{what}: expected a subclass of tokenmdp.SamplingBackend, got {obj!r}")
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        raise PluginError(f"{what}: class attribute `name` must be a non-empty string")
    if obj.sample is SamplingBackend.sample:
        raise PluginError(f"{what}: must implement sample()")


def _check_component(obj: Any, base: type, plugin: str) -> None:
    what = f"plugin {plugin!r} component {getattr(obj, 'name', obj)!r}"
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise PluginError(f"{what}: expected a subclass of tokenmdp.{base.__name__}, got {obj!r}")
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        raise PluginError(f"{what}: class attribute `name` must be a non-empty string")
    if not attrs.has(obj.Options):
        raise PluginError(f"{what}: `Options` must be an attrs class (use @attrs.frozen)")
    for attr, of in (("requires", "signal"), ("provides", "signal"), ("shares", "resource"), ("uses", "resource")):
        if not isinstance(getattr(obj, attr), (set, frozenset)):
            raise PluginError(f"{what}: `{attr}` must be a set of {of} names")
    method = getattr(obj, base.method)
    if method is getattr(base, base.method):
        raise PluginError(f"{what}: does not implement `{base.method}`")
    expected = METHOD_PARAMETERS[base]
    params = [p.name for p in inspect.signature(method).parameters.values()][1:]
    if tuple(params) != expected:
        raise PluginError(
            f"{what}: `{base.method}` has parameters ({', '.join(params)}); expected ({', '.join(expected)})"
        )
