"""Policies: one interface for toy networks, exact tree policies and HF causal LMs."""

from __future__ import annotations

import torch

from .base import ExactPolicy, TaskBasePolicy, TokenPolicy
from .toy import TOY_POLICIES, GRUPolicy, MLPPolicy, TabularPolicy, TransformerPolicy

__all__ = [
    "ExactPolicy",
    "GRUPolicy",
    "MLPPolicy",
    "TOY_POLICIES",
    "TabularPolicy",
    "TaskBasePolicy",
    "TokenPolicy",
    "TransformerPolicy",
]


def build_policy(spec: dict, task, seed: int) -> TokenPolicy:
    """Build the policy named by the ``[policy]`` table for ``task`` (seeded init)."""
    import inspect

    from ..errors import ConfigError
    from .hf import HFCausalLMPolicy

    spec = dict(spec)
    kind = spec.pop("kind", "gru")
    torch.manual_seed(seed)
    if kind == "hf":
        valid = {"path", "config", "lora", "fast_path"}
        unknown = sorted(set(spec) - valid)
        if unknown:
            raise ConfigError(
                f"policy: unknown option(s) {', '.join(unknown)} for kind 'hf'; valid: {', '.join(sorted(valid))}"
            )
        lora = spec.get("lora")
        if lora is not None and not isinstance(lora, dict):
            raise ConfigError(f"policy.lora must be a table, e.g. lora = {{r = 8, alpha = 16}} (got {lora!r})")
        # policy.fast_path: tokenmdp's own forward and KV-cached decoder for the model
        # families it reproduces exactly (GPT-2; docs/performance.md); false = always the
        # transformers forward and its DynamicCache.
        fast_path = spec.get("fast_path", True)
        if not isinstance(fast_path, bool):
            raise ConfigError(f"policy.fast_path must be true or false (got {fast_path!r})")
        if spec.get("path") == "python:object":
            raise ConfigError(
                "policy.path: this run's model was given to tokenmdp.train as a Python object that the run did "
                "not save (a peft model, or a run from before runs saved it in RUN/base_model), so this run "
                "directory cannot rebuild it; to resume, pass the model again: tokenmdp.train(..., model=model, "
                "resume=True); to keep the trained policy, save it from Python: result.model.save_pretrained(DIR)"
            )
        if "path" in spec:
            return HFCausalLMPolicy.from_pretrained(
                spec["path"], vocab_size=task.vocab_size, lora=lora, fast_path=fast_path
            )
        eos = task.eos_token if task.eos_token is not None else task.bos_token
        hf_config = {
            "vocab_size": task.input_vocab_size,
            "bos_token_id": task.bos_token,
            "eos_token_id": eos,
            **spec.get("config", {}),
        }
        return HFCausalLMPolicy.from_config(
            hf_config, vocab_size=task.vocab_size, seed=seed, lora=lora, fast_path=fast_path
        )
    if kind not in TOY_POLICIES:
        raise ConfigError(f"policy.kind {kind!r} is unknown; valid kinds: {', '.join([*TOY_POLICIES, 'hf'])}")
    cls = TOY_POLICIES[kind]
    params = [p for p in inspect.signature(cls).parameters if p not in ("input_vocab_size", "vocab_size")]
    unknown = sorted(set(spec) - set(params))
    if unknown:
        raise ConfigError(
            f"policy: unknown option(s) {', '.join(unknown)} for kind {kind!r}; valid: {', '.join(params)}"
        )
    try:
        return cls(task.input_vocab_size, task.vocab_size, **spec)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: torch rejecting a size
        raise ConfigError(f"policy ({kind}): {exc}") from None
