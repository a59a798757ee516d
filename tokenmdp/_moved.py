"""Old module paths of tokenmdp, kept working for one release with a DeprecationWarning.

The core was split into layers (``tokenmdp.plugin``, ``.mdp``, ``.train``, ``.text``,
``.reports``; docs/architecture.md). An outside plugin that still writes ``from
tokenmdp.ops import suffix_sums`` gets the module at its new place (the same module object,
so monkeypatching either name patches both) and a warning naming the public import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module -> new module
MOVED = {
    "tokenmdp.hookspecs": "tokenmdp.plugin.hookspecs",
    "tokenmdp.plugins": "tokenmdp.plugin.registry",
    "tokenmdp.components": "tokenmdp.plugin.components",
    "tokenmdp.composition": "tokenmdp.plugin.composition",
    "tokenmdp.context": "tokenmdp.plugin.context",
    "tokenmdp.updaters": "tokenmdp.plugin.updaters",
    "tokenmdp.ops": "tokenmdp.plugin.ops",
    "tokenmdp.env": "tokenmdp.mdp.env",
    "tokenmdp.solver": "tokenmdp.mdp.solver",
    "tokenmdp.trainer": "tokenmdp.training.trainer",
    "tokenmdp.evaluation": "tokenmdp.training.evaluation",
    "tokenmdp.sft": "tokenmdp.training.sft",
    "tokenmdp.preferences": "tokenmdp.training.preferences",
    "tokenmdp.rollout": "tokenmdp.training.rollout",
    "tokenmdp.bridge": "tokenmdp.text.bridge",
    "tokenmdp.models": "tokenmdp.text.gemma",
    "tokenmdp.compare": "tokenmdp.reports.compare",
    "tokenmdp.explain": "tokenmdp.reports.explain",
    "tokenmdp.plots": "tokenmdp.reports.plots",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        warnings.warn(
            f"{self.old} is deprecated and will be removed in the next release: import the public "
            f"names from tokenmdp (e.g. `from tokenmdp import ...`), or use {self.new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module):
        """Nothing to run: the module is the new one, already executed."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        new = MOVED.get(fullname)
        return importlib.util.spec_from_loader(fullname, _Alias(fullname, new)) if new else None


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
