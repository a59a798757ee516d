"""Calling plugin code: a crash inside a component or a hook implementation becomes a
``PluginError`` that names the plugin (or component) and the step, not a traceback."""

from __future__ import annotations

from ..errors import PluginError, TokenMDPError


def call_component(component, what: str, step: int, fn, *args):
    """``fn(*args)``, a method of ``component``; a crash names the component and the step."""
    try:
        return fn(*args)
    except TokenMDPError:
        raise
    except (Exception, SystemExit) as exc:  # sys.exit() in a plugin must not end the run as a success
        raise PluginError(
            f"{component.kind} {component.name!r} raised in {what} at step {step}: {type(exc).__name__}: {exc}"
        ) from exc


def call_hook(pm, hook_name: str, **kwargs):
    """Call a lifecycle hook; a crash is reported with the plugin's name (and the step)."""
    hook = getattr(pm.hook, hook_name)
    try:
        return hook(**kwargs)
    except TokenMDPError:
        raise
    except (Exception, SystemExit) as exc:
        where = f" at step {kwargs['step']}" if "step" in kwargs else ""
        raise PluginError(
            f"plugin {plugin_that_raised(hook, exc)} raised in {hook_name}{where}: {type(exc).__name__}: {exc}"
        ) from exc


def plugin_that_raised(hook, exc: BaseException) -> str:
    """The plugin whose implementation of ``hook`` is on ``exc``'s traceback (outermost first)."""
    owners = {}
    for impl in hook.get_hookimpls():
        code = getattr(impl.function, "__code__", None)
        if code is not None:
            owners[code] = impl.plugin_name
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in owners:
            return repr(owners[tb.tb_frame.f_code])
        tb = tb.tb_next
    names = ", ".join(repr(impl.plugin_name) for impl in hook.get_hookimpls())
    return f"(one of {names})"
