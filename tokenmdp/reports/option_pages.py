"""``tokenmdp options NAME``: every option of a config section, an env, a policy kind, a
recipe or a component, with its type, default and doc comment.

Sections, recipes and components document themselves through their attrs ``Options``
classes; an env's options are its task's ``Options`` class or its constructor parameters
(the ``[env]`` table is passed to it), and a policy kind's are its constructor's
(``[policy]``)."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import TokenMDPError

#: ``[policy]`` options of ``kind = "hf"`` (read by ``tokenmdp.policies.build_policy``).
HF_POLICY_OPTIONS = {
    "path": ("str", None, "a local transformers model folder (AutoModelForCausalLM); docs/text.md"),
    "config": ("table", None, "instead of path: a model config to build from scratch (model_type, sizes)"),
    "lora": ("table", None, "LoRA adapter, e.g. {r = 8, alpha = 16, dropout = 0.0, target_modules = [...]}"),
    "fast_path": ("bool", True, "tokenmdp's own GPT-2 forward and KV-cached decoder where it applies"),
}

#: Sections that are not attrs classes: where their options come from.
FREE_SECTIONS = {
    "env": "the env's own options: `id` names it; the rest go to its task (tokenmdp options ENV_ID)",
    "policy": "`kind` picks the network; the rest go to it (tokenmdp options KIND)",
}


def _attrs_lines(title: str, cls: type, overrides=None) -> list[str]:
    from ..options import option_docs

    lines = [title]
    for option in option_docs(cls, overrides):
        lines.append(f"  {option.name}: {option.type} = {option.default!r}")
        if option.doc:
            lines.append(f"      {option.doc}")
    if len(lines) == 1:
        lines.append("  (no options)")
    return lines


def _signature_lines(title: str, cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    """A constructor's parameters, following ``**kwargs`` up the class hierarchy (a toy
    task passes them on to ``ToyTask``, and that to ``TokenTask``)."""
    lines, seen = [title], set(skip)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in seen:
                continue
            seen.add(p.name)
            kind = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            default = "(required)" if p.default is p.empty else repr(p.default)
            lines.append(f"  {p.name}: {kind or 'any'} = {default}")
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    if len(lines) == 1:
        lines.append("  (no options)")
    return lines


def _env_lines(spec: Any) -> list[str]:
    task = spec.entry_point.task_cls
    title = f"[env] id = {spec.id!r} ({spec.description or task.__name__})"
    options = getattr(task, "Options", None)  # the text task documents its options in an attrs class
    lines = _attrs_lines(title, options) if options is not None else _signature_lines(title, task)
    if task.__name__ == "TextTask":
        lines.append("  (each is explained in docs/text.md, 'The environment')")
    return lines


def _policy_lines(kind: str) -> list[str]:
    from ..policies import TOY_POLICIES

    if kind == "hf":
        lines = ['[policy] kind = "hf" (a Hugging Face causal LM)']
        for name, (type_, default, doc) in HF_POLICY_OPTIONS.items():
            lines += [f"  {name}: {type_} = {default!r}", f"      {doc}"]
        return lines
    cls = TOY_POLICIES[kind]
    return _signature_lines(
        f"[policy] kind = {kind!r} ({(cls.__doc__ or cls.__name__).strip().splitlines()[0]})",
        cls,
        skip=("input_vocab_size", "vocab_size"),
    )


def _lm_default_lines(recipe: Any) -> list[str]:
    """What changes when the recipe's policy is a Hugging Face model (``Recipe.lm_options``)."""
    lines = []
    for title, policy in (("an HF policy", {"kind": "hf"}), ("with policy.lora", {"kind": "hf", "lora": {"r": 8}})):
        values = recipe.lm_defaults_for(policy)
        if values:
            shown = ", ".join(f"{s}.{k} = {v!r}" for s, table in values.items() for k, v in table.items())
            lines.append(f"  {title}: {shown}")
    if not lines:
        return []
    return [
        "",
        'Defaults for real LMs (policy.kind = "hf"), over the above; set any of them to override '
        "(docs/text.md, 'Defaults for real LMs'); train.beta unset = 1.0 otherwise:",
        *lines,
    ]


def options_text(name: str) -> str:
    """The page ``tokenmdp options NAME`` prints (see the module's docstring)."""
    from ..config import OPTION_SECTIONS as sections
    from ..plugin.registry import Registry, plugin_manager
    from ..policies import TOY_POLICIES

    if name in sections:
        return "\n".join(_attrs_lines(f"[{name}]", sections[name]))
    kinds = [*TOY_POLICIES, "hf"]
    if name == "policy":
        blocks = [[f"[policy]: {FREE_SECTIONS['policy']}; kinds: {', '.join(kinds)}"]]
        return "\n\n".join("\n".join(b) for b in [*blocks, *(_policy_lines(k) for k in kinds)])
    if name in kinds:
        return "\n".join(_policy_lines(name))
    registry = Registry(plugin_manager())
    envs = sorted((entry.obj for entry in registry.envs.values()), key=lambda s: s.id)
    if name == "env":
        blocks = [[f"[env]: {FREE_SECTIONS['env']}; ids: {', '.join(s.id for s in envs)}"]]
        return "\n\n".join("\n".join(b) for b in [*blocks, *(_env_lines(s) for s in envs)])
    env = next((s for s in envs if name in (s.id, s.id.split("/")[-1], s.name)), None)
    if env is not None:
        return "\n".join(_env_lines(env))
    if name in registry.recipes:
        recipe = registry.recipes[name].obj
        lines = [
            f"recipe {name!r}: estimator {recipe.estimator}, advantage {recipe.advantage}, updater {recipe.updater}"
            f" (set them in [estimator], [advantage], [updater]; values shown are this recipe's defaults)"
        ]
        for kind in ("estimator", "advantage", "updater"):
            cls = registry.component(kind, getattr(recipe, kind))
            lines += ["", *_attrs_lines(f"[{kind}] {cls.name}", cls.Options, recipe.options.get(kind))]
        return "\n".join(lines + _lm_default_lines(recipe))
    found = [(kind, table[name]) for kind, table in registry.components.items() if name in table]
    if not found:
        components = sorted({n for table in registry.components.values() for n in table})
        raise TokenMDPError(
            f"options: unknown name {name!r}; valid: the sections {', '.join([*sections, *FREE_SECTIONS])}, "
            f"the envs {', '.join(s.id for s in envs)}, the policy kinds {', '.join(kinds)}, the recipes "
            f"{', '.join(sorted(registry.recipes))}, or a component: {', '.join(components)}"
        )
    blocks = [_attrs_lines(f"[{kind}] {name} (plugin {entry.plugin})", entry.obj.Options) for kind, entry in found]
    return "\n\n".join("\n".join(block) for block in blocks)
