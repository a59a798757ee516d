"""Run configuration: frozen attrs classes read from TOML, with ``--set`` overrides.

``[env]`` and ``[policy]`` take free keys beyond their fixed ones; those are passed to the
environment / policy constructor and checked against its signature there.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from .devices import PRECISIONS, check_device_spec
from .errors import ConfigError
from .options import build, non_negative, non_negative_int, one_of, optional, positive, positive_int, to_dict


def _optional_str(instance, attribute, value):
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{attribute.name} must be a non-empty string (got {value!r})")


def _name(instance, attribute, value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{attribute.name} must be a non-empty string (got {value!r})")


def _optional_name(instance, attribute, value):
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{attribute.name} must be a non-empty string or unset (got {value!r})")


def _boolean(instance, attribute, value):
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be true or false (got {value!r})")


def _credit_check(instance, attribute, value):
    if not isinstance(value, bool) and not (isinstance(value, int) and value >= 1):
        raise ValueError(
            f"{attribute.name} must be true, false, or a number of responses >= 1 (text runs; got {value!r})"
        )


def _logit_chunk(instance, attribute, value):
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f'{attribute.name} must be "auto", 0 (off) or a number of positions >= 1 (got {value!r})')


def _at_least_two(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"{attribute.name} must be an integer >= 2 (a standard error needs two; got {value!r})")


def _path(instance, attribute, value):
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError(f"{attribute.name} must be a non-empty path string (got {value!r})")


def _seed(instance, attribute, value):
    non_negative_int(instance, attribute, value)
    if value >= 2**63:
        raise ValueError(f"{attribute.name} must be below 2**63 (got {value!r})")


def _strings(value):
    """A TOML array (a list) as the tuple a frozen config holds."""
    return tuple(value) if isinstance(value, list) else value


def _stop_strings(instance, attribute, value):
    if not isinstance(value, tuple) or not all(isinstance(s, str) and s for s in value):
        shown = list(value) if isinstance(value, tuple) else value
        raise ValueError(f'{attribute.name} must be a list of non-empty strings, e.g. ["\\n\\n"] (got {shown!r})')


def _optional_unit_interval(instance, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
        raise ValueError(f"{attribute.name} must be in (0, 1] or unset (got {value!r})")


@attrs.frozen
class AlgorithmConfig:
    #: A recipe (``tokenmdp plugins`` lists them, e.g. "grpo", "inverse-q"): its estimator,
    #: advantage and updater with their default options.
    name: str | None = attrs.field(default=None, validator=_optional_str)
    #: The trajectory estimator, replacing the recipe's (or composing without a recipe).
    estimator: str | None = attrs.field(default=None, validator=_optional_str)
    #: The advantage constructor, replacing the recipe's.
    advantage: str | None = attrs.field(default=None, validator=_optional_str)
    #: The policy updater, replacing the recipe's.
    updater: str | None = attrs.field(default=None, validator=_optional_str)


@attrs.frozen
class ReferenceConfig:
    #: "sft": fine-tune a fresh policy network on the env's base distribution;
    #: "init": the untrained initial policy is the reference.
    init: str = attrs.field(default="sft", validator=one_of("sft", "init"))
    #: Responses sampled from the env's base distribution for the reference's SFT.
    sft_samples: int = attrs.field(default=4096, validator=positive_int)
    #: Guide-tagged samples from the tilted distribution (METHOD.md section 5); 0 = none.
    tagged_samples: int = attrs.field(default=0, validator=non_negative_int)
    #: beta of the tilt ``pi_base * exp(R / tilt_beta)``; defaults to ``train.beta``.
    tilt_beta: float | None = attrs.field(default=None, validator=positive)
    #: Passes over the SFT data.
    sft_epochs: int = attrs.field(default=8, validator=positive_int)
    #: Responses per SFT optimizer step.
    sft_batch_size: int = attrs.field(default=256, validator=positive_int)
    #: Adam learning rate of the SFT.
    sft_lr: float = attrs.field(default=3e-3, validator=positive)


@attrs.frozen
class TrainConfig:
    #: Training steps; each samples one batch and updates the policy on it.
    steps: int = attrs.field(default=100, validator=positive_int)
    #: Seeds everything: initialisation, the reference's SFT, every step's sampling.
    seed: int = attrs.field(default=0, validator=_seed)
    #: Responses per step (per rank under torchrun).
    batch_size: int = attrs.field(default=64, validator=positive_int)
    #: G: each step draws ``batch_size / G`` prompts (distinct when the task has enough)
    #: and samples G responses to each; RLOO/GRPO groups are then exactly those G. 1 = each
    #: response gets its own random prompt (groups are whatever the batch happens to hold).
    samples_per_prompt: int = attrs.field(default=1, validator=positive_int)
    #: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N" or "mps": where
    #: the policy, reference, rollouts, signals and optimiser state live (docs/text.md).
    device: str = attrs.field(default="auto", validator=check_device_spec)
    #: "fp32", or "bf16": HF model forwards under bf16 autocast, float32 master weights,
    #: log-softmax, losses, advantages and KL in float32.
    precision: str = attrs.field(default="fp32", validator=one_of(*PRECISIONS))
    #: "none", or "fsdp": under torchrun, an HF policy (and its reference, and a PPO critic)
    #: sharded across the ranks with FSDP2, one shard of every parameter, gradient and
    #: optimizer state per rank; scoring and the update run sharded, sampling and rank 0's
    #: evaluation on gathered models; checkpoints are written by shards (docs/distributed.md,
    #: "Sharding"). A resume may change it (and the world size).
    sharding: str = attrs.field(default="none", validator=one_of("none", "fsdp"))
    #: Set every dropout probability of the policy to 0 for RL (as TRL). false keeps the
    #: policy's dropout in the updater's training forward only; sampling, log-probs, every
    #: estimator and every evaluation always run without dropout.
    disable_dropout: bool = attrs.field(default=True, validator=_boolean)
    #: Where ``batch.logprobs`` (pi_old) comes from: "sampling" reads it off the sampling
    #: pass's logits (one forward pass fewer per step; equal to re-scoring up to float
    #: rounding, ~1e-6); "rescore" runs a full forward pass; "auto": sampling for HF models,
    #: rescore for the toy networks (whose published figures were measured so). Sampling
    #: needs temperature 1 and no top-k/top-p (else the sampling distribution is not the
    #: policy's), and falls back to rescore there.
    logprobs_from: str = attrs.field(default="auto", validator=one_of("auto", "sampling", "rescore"))
    #: The plugin that samples responses (hook ``tokenmdp_sampling_backends``): "torch",
    #: the built-in decoder (see ``tokenmdp plugins`` for others).
    sampling_backend: str = attrs.field(default="torch", validator=_name)
    #: How tokens are drawn: "multinomial" (``torch.multinomial``), "inverse-cdf" (one
    #: uniform per row in the cumulative distribution: the same distribution, other draws,
    #: 13x cheaper on the CPU at a vocabulary of 512), or "auto": inverse-cdf for HF
    #: models, multinomial for the toy networks (whose published figures were drawn so).
    sampler: str = attrs.field(default="auto", validator=one_of("auto", "multinomial", "inverse-cdf"))
    #: Log ``objective/kl`` every step. It needs the reference's log-probs of the batch:
    #: with false, a step whose components never read the reference skips that forward
    #: pass (``objective/kl`` is then logged only on steps that scored the reference).
    log_kl: bool = attrs.field(default=True, validator=_boolean)
    #: Memory the run may plan to use, in GB; a start-up estimate over it (the exact
    #: solver's tree, SFT data, the policy, the batch's logits, the evaluation) stops the
    #: run with the estimate. Unset = 80% of this machine's memory.
    max_memory_gb: float | None = attrs.field(default=None, validator=positive)
    #: beta of the objective ``E[R] - beta * KL(pi || pi_ref)``: the KL weight of the
    #: estimators that default to it, and of the exact optimum every toy run is scored against.
    #: Unset = the recipe's: 1.0 for the toy policies; for an HF policy the recipe's LM
    #: default (grpo 0.04, rloo/ppo 0.05, dpo 0.1: ``tokenmdp options RECIPE``), recorded in
    #: the run's ``config.toml``.
    beta: float | None = attrs.field(default=None, validator=positive)
    #: Sampling temperature (sampling only: stored log-probs are the policy's own).
    temperature: float = attrs.field(default=1.0, validator=positive)
    #: Sample only among the k most likely tokens (unset = all). Sampling only: the stored
    #: ``logprobs`` are the policy's own (temperature 1, unfiltered); docs/text.md.
    top_k: int | None = attrs.field(default=None, validator=optional(positive_int))
    #: Nucleus sampling: the smallest set of tokens whose probability reaches top_p (unset = all).
    top_p: float | None = attrs.field(default=None, validator=_optional_unit_interval)
    #: Text envs (no exact solver): responses sampled, on fixed prompts and seed, to
    #: estimate ``true_reward`` and ``kl_ref`` at each evaluation; unset = ``batch_size``.
    eval_samples: int | None = attrs.field(default=None, validator=optional(positive_int))
    #: Evaluate (exactly for toy envs, by sampling for text) every N steps, and at the end.
    eval_every: int = attrs.field(default=10, validator=positive_int)
    #: Stop at the first evaluation whose ``regret_frac`` is at or below this (toy envs).
    target_regret_frac: float | None = attrs.field(default=None, validator=non_negative)
    #: Score each step's per-token credit against the true A* (``credit_corr``, toy envs):
    #: 0.8 ms of a 162 ms ppo step; false skips it for speed runs. Text envs (no A*): a
    #: number N scores the run's own credit on N responses at the end against a
    #: Monte-Carlo ground truth (``credit_corr_mc`` in summary.json; docs/explain.md).
    score_credit: bool | int = attrs.field(default=True, validator=_credit_check)
    #: HF policies: the output layer applied this many response positions at a time, so
    #: that no step holds a batch's ``[B, T, vocab]`` logits (docs/performance.md);
    #: "auto": about 16 Mi logits per chunk (64 positions of Gemma-3's vocabulary); 0: the
    #: whole batch at once. Toy policies always take the whole batch.
    logit_chunk: int | str = attrs.field(default="auto", validator=_logit_chunk)
    #: Continuations per prefix of that Monte-Carlo ground truth.
    score_credit_k: int = attrs.field(default=8, validator=_at_least_two)
    #: Show a progress bar.
    progress: bool = attrs.field(default=True, validator=_boolean)
    #: Every N steps, write up to 8 of the step's responses (prompt, completion, reward) to
    #: ``completions.jsonl`` and hand them to the loggers (TensorBoard text, a wandb
    #: table); 0 = never.
    log_completions: int = attrs.field(default=0, validator=non_negative_int)
    #: Testing/debugging only: one process collects, per step, the concatenation of the
    #: ``batch_size`` sub-batches that ranks 0..N-1 of an N-process run would sample (same
    #: per-rank seeds), to compare against a real distributed run (docs/distributed.md).
    simulate_world_size: int | None = attrs.field(default=None, validator=optional(positive_int))
    #: Gradient checkpointing: the updater's forward keeps only each transformer block's
    #: input and recomputes the rest in the backward pass (transformers'
    #: ``gradient_checkpointing_enable``, non-reentrant; with LoRA too): less memory, a
    #: slower update, the same gradients. HF policies only; the fast GPT-2 path then serves
    #: sampling and scoring, and the training forward goes through the library's.
    gradient_checkpointing: bool = attrs.field(default=False, validator=_boolean)
    #: Hand the memory of freed tensors of 1 MiB and more back to the system at once
    #: (glibc's ``malloc``, Linux; tokenmdp/host_memory.py): a lower resident peak for a
    #: few percent of step time (docs/performance.md, "Memory"). The process keeps the
    #: setting. Numbers are unchanged.
    release_memory: bool = attrs.field(default=False, validator=_boolean)
    #: Text tasks: a response ends, as at EOS, after the token that makes its decoded
    #: completion contain one of these strings, which stays in the completion (as with
    #: transformers' ``stop_strings``); in training and evaluation. Empty = EOS and
    #: ``env.horizon`` only.
    stop_strings: tuple[str, ...] = attrs.field(default=(), converter=_strings, validator=_stop_strings)

    def sampler_for(self, policy_kind: str | None) -> str:
        """The sampler ``train.sampler`` names for a policy of ``policy_kind``."""
        if self.sampler != "auto":
            return self.sampler
        return "inverse-cdf" if policy_kind == "hf" else "multinomial"

    def __attrs_post_init__(self):
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"samples_per_prompt = {self.samples_per_prompt} must divide batch_size = "
                f"{self.batch_size} (each step draws batch_size / samples_per_prompt prompts)"
            )


@attrs.frozen
class RunConfig:
    #: The run directory: config.toml, metrics.jsonl, checkpoints, summary (docs/reliability.md).
    dir: str = attrs.field(default="runs/default", validator=_path)
    #: Checkpoint every N steps (0 = only at the end, on Ctrl-C/SIGTERM, and at the target).
    checkpoint_every: int = attrs.field(default=0, validator=non_negative_int)
    #: How many of the newest checkpoints to keep.
    keep_checkpoints: int = attrs.field(default=2, validator=positive_int)
    #: Replace a finished run in ``dir`` (only files tokenmdp wrote are removed).
    overwrite: bool = attrs.field(default=False, validator=_boolean)
    #: Log to Weights & Biases under this project (extra ``wandb``; ``WANDB_MODE=offline``
    #: keeps it on this machine, in wandb's own folder: ``$WANDB_DIR/wandb``, else ``./wandb``
    #: of the folder the run started in; the run directory keeps only ``wandb_id.txt``).
    #: Unset = no wandb.
    wandb_project: str | None = attrs.field(default=None, validator=_optional_name)


@attrs.frozen
class Config:
    algorithm: AlgorithmConfig = AlgorithmConfig()
    env: dict = attrs.field(factory=lambda: {"id": "tokenmdp/Pattern-v0"})
    policy: dict = attrs.field(factory=lambda: {"kind": "gru"})
    reference: ReferenceConfig = ReferenceConfig()
    train: TrainConfig = TrainConfig()
    run: RunConfig = RunConfig()
    estimator: dict = attrs.field(factory=dict)
    advantage: dict = attrs.field(factory=dict)
    updater: dict = attrs.field(factory=dict)

    @env.validator
    def _env_has_id(self, attribute, value):
        if not isinstance(value.get("id"), str):
            raise ValueError('env.id is required, e.g. env.id = "tokenmdp/Pattern-v0" (see `tokenmdp envs`)')

    @property
    def env_kwargs(self) -> dict:
        return {k: v for k, v in self.env.items() if k != "id"}


SECTIONS = [f.name for f in attrs.fields(Config)]
#: The sections with a fixed set of options (attrs classes); the others are free tables
#: that the env, the policy and the components read.
OPTION_SECTIONS = {f.name: type(f.default) for f in attrs.fields(Config) if attrs.has(type(f.default))}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set {text!r}: key must be section.key, sections: {', '.join(SECTIONS)}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def merge(data: dict, path: list[str], value: Any) -> dict:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a table")
        node = child
    node[path[-1]] = value
    return data


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """The TOML file at ``path`` as a dict; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: Mapping | None = None) -> Config:
    """Read TOML (if given), apply ``--set`` overrides, validate everything."""
    data: dict = dict(base or {})
    if path is not None:
        data = read_toml(path)
    for text in overrides:
        key_path, value = parse_override(text)
        merge(data, key_path, value)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(
                f"[{section}] must be a table (got {section} = {data[section]!r}); e.g. [{section}] "
                f"then key = value lines, or --set {section}.key=value"
            )
    if "env" in data:
        data["env"] = {"id": Config().env["id"], **data["env"]} if "id" not in data["env"] else data["env"]
    return build(Config, data, "config")


def dump_config(config: Config) -> str:
    return tomli_w.dumps(to_dict(config))
