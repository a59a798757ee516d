"""What both the plugin catalog and the registry need, kept apart from both so that neither
imports the other back: the entry-point group plugins register under, the variable that
blocks some of them, and the deferred Gymnasium entry point the catalog registers."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

ENTRY_POINT_GROUP = "tokenmdp"
DISABLE_ENV_VAR = "TOKENMDP_DISABLE_PLUGINS"


def blocked_plugin_names() -> list[str]:
    """The entry-point names ``TOKENMDP_DISABLE_PLUGINS`` blocks."""
    return [n.strip() for n in os.environ.get(DISABLE_ENV_VAR, "").split(",") if n.strip()]


class InstalledEnv:
    """A Gymnasium entry point that loads the plugins only when an env is made: what
    ``import tokenmdp`` registers from the catalog. ``make(env_id, vector, kwargs)`` (the
    catalog's) loads them and builds the env; the first env made this way (or the
    trainer's ``Registry.register_envs``) replaces every such entry with the plugin's own
    entry point, so the plugins are loaded once per process."""

    def __init__(self, env_id: str, make: Callable[[str, bool, dict], Any], vector: bool = False):
        self.env_id, self.make, self.vector = env_id, make, vector

    def __call__(self, **kwargs):
        return self.make(self.env_id, self.vector, kwargs)

    def __repr__(self) -> str:
        return f"InstalledEnv({self.env_id!r}{', vector=True' if self.vector else ''})"
