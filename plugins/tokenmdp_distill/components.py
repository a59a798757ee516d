"""The three context-distillation components, in the order a step runs them:
``guided-samples`` (estimator), ``zero`` (advantage constructor) and ``sft`` (updater).
See the package docstring for the maths."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from tokenmdp import (
    AdvantageConstructor,
    ConfigError,
    GradientOptions,
    GradientUpdater,
    RolloutBatch,
    Signal,
    TrajectoryEstimator,
    distributed,
    generate,
    positive,
    positive_int,
    prompts_with_prefix,
)

#: The signals ``guided-samples`` gives ``sft``. The guided responses have their own length
#: (``distill_len``), not the rollout's, so they are declared here to be checked like the core's.
DISTILL_SIGNALS = (
    Signal("distill_ids", ("batch", "distill_len"), "integer", "pi_ref's responses to guide + x, 0 after EOS"),
    Signal("distill_mask", ("batch", "distill_len"), "floating", "1.0 on the real tokens of distill_ids"),
    Signal("distill_info", None, "dict", "the estimator's metrics, for the updater to log"),
)


def _guide(instance, attribute, value):
    if value is None or (isinstance(value, str) and value.strip()):
        return
    ids = isinstance(value, tuple) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    if not ids or min(value) < 0:
        raise ValueError(
            f"{attribute.name} must be text or a non-empty list of token ids >= 0, or unset (got {value!r})"
        )


def distill_batch(batch: RolloutBatch, ids: Tensor, mask: Tensor) -> RolloutBatch:
    """The SFT data as a batch the policy scores *without* the guide: the step's own
    prompts, with the reference's guided responses in place of the policy's."""
    return RolloutBatch(
        prompt_ids=batch.prompt_ids,
        prompt_mask=batch.prompt_mask,
        response_ids=ids,
        response_mask=mask,
        rewards=torch.zeros_like(mask),
        prompt_index=batch.prompt_index,
        rewards_observed=False,
        prefix_offset=batch.prefix_offset,
        group_index=batch.group_index,
    )


class GuidedSamples(TrajectoryEstimator):
    """For each of the step's prompts ``x``, one response ``y ~ pi_ref(. | c + x)``: the
    frozen reference with the guide in front. It reads no reward; the policy's own rollout
    only supplies the prompts (and is what ``env_tokens`` counts)."""

    name = "guided-samples"
    provides = frozenset({"distill_ids", "distill_mask", "distill_info"})
    signal_shapes = DISTILL_SIGNALS
    # the guided samples are supervision data the rollout does not count
    data_token_metrics = ("distill/sample_tokens",)

    @attrs.frozen
    class Options:
        #: Guide prefix as token ids or text; unset = the task's guide token (as ``conditional-optimal``).
        guide: tuple[int, ...] | str | None = attrs.field(default=None, validator=_guide)
        #: Sampling temperature of the reference; 1 samples pi_ref(.|c + x) itself, the distillation target.
        temperature: float = attrs.field(default=1.0, validator=positive)

    def check(self, config, task):
        where, guide = f"[estimator] ({self.name})", self.options.guide
        if guide is None and task.guide_token is None:
            raise ConfigError(f'{where}: env {task.name!r} has no guide token; give it as text: guide = "..."')
        if isinstance(guide, str) and getattr(task, "tokenizer", None) is None:
            raise ConfigError(f"{where}: guide = {guide!r} is text, but env {task.name!r} has token ids only")
        if isinstance(guide, tuple) and max(guide) >= task.input_vocab_size:
            raise ConfigError(f"{where}: guide = {list(guide)} has ids outside [0, {task.input_vocab_size})")

    def setup(self, ctx):
        self.prefix = ctx.guide_prefix(self.options.guide)
        self.sample_tokens = 0
        # what SFT can reach at best is the guided reference itself (Inverse-Q*'s ceiling too)
        exact = ctx.solution is not None and ctx.evaluator is not None
        self.ceiling = ctx.evaluator.evaluate(ctx.reference, prefix_ids=self.prefix) if exact else None

    @torch.no_grad()
    def estimate(self, batch, ctx):
        ids, mask = prompts_with_prefix(batch, self.prefix)
        # a generator on the models' device, seeded from the step's: a CPU one would copy
        # every token's probabilities off the GPU to draw it
        seed = int(torch.randint(2**62, (1,), generator=ctx.generator))
        generator = torch.Generator(device=ctx.device).manual_seed(seed)
        task = ctx.task
        response, response_mask = generate(
            ctx.reference, ids, task.horizon, task.eos_token, generator, self.options.temperature, attention_mask=mask
        )
        (tokens,) = distributed.all_sum(response_mask.sum().double())  # every rank's samples
        self.sample_tokens += round(float(tokens))
        info = {
            "distill/sample_tokens": self.sample_tokens,
            "distill/response_length": float(response_mask.sum(1).mean()),
        }
        return {"distill_ids": response, "distill_mask": response_mask, "distill_info": info}

    def guide(self):
        return self.options.guide

    def report(self):
        if not self.ceiling:
            return {}
        return {
            "ceiling": self.ceiling["closure"],
            "ceiling_kl_ref": self.ceiling["kl_ref"],
            "ceiling_true_reward": self.ceiling["true_reward"],
        }

    def state_dict(self):
        return {"sample_tokens": self.sample_tokens}

    def load_state_dict(self, state):
        if state:
            self.sample_tokens = state["sample_tokens"]


class ZeroAdvantage(AdvantageConstructor):
    """``A_t = 0``. Supervised fine-tuning weighs every target token alike, so it has no
    advantage; the composition still needs an ``advantages`` signal, and ``sft`` ignores it."""

    name = "zero"

    def construct(self, batch, signals, ctx):
        return {"advantages": torch.zeros_like(batch.response_mask)}


class SFTUpdater(GradientUpdater):
    """Minimises the mean token NLL ``-log pi_theta(y_t | x, y_<t)`` of the guided samples,
    with the policy seeing the prompt only (no guide): the forward KL
    ``KL(pi_ref(.|c + x) || pi_theta(.|x))`` up to a constant."""

    name = "sft"
    requires = frozenset({"distill_ids", "distill_mask"})
    signal_shapes = DISTILL_SIGNALS

    @attrs.frozen
    class Options(GradientOptions):
        #: Adam learning rate (this updater's default).
        lr: float = attrs.field(default=3e-3, validator=positive)
        #: Passes over each step's samples (this updater's default).
        epochs: int = attrs.field(default=4, validator=positive_int)
        #: Minibatches per pass, one Adam step each (this updater's default).
        minibatches: int = attrs.field(default=4, validator=positive_int)

    def update(self, batch, signals, advantages, ctx):
        data = distill_batch(batch, signals["distill_ids"], signals["distill_mask"])

        def share(micro):
            mb, m = micro.batch, micro.batch.response_mask
            # no prefix: the unguided policy; the entropy is a metric
            logp, entropy = ctx.token_logprobs(ctx.policy, mb, return_entropy=True, entropy_grad=False)
            loss = micro.token_mean(-logp, m)
            return loss, {
                "losses/sft": loss.item(),
                "policy/entropy": micro.token_mean(entropy.detach(), m).item(),
            }

        sums, norms = {"losses/sft": 0.0, "policy/entropy": 0.0}, []
        for rows in self.minibatches(data, ctx):
            norm, stats = self.accumulate(map(share, self.micro_batches(data, rows)), ctx)
            norms.append(norm)
            for key in sums:
                sums[key] += stats[key]
        # means over the step's minibatches, each measured before its own Adam step
        metrics = {key: total / len(norms) for key, total in sums.items()}
        metrics["policy/grad_norm"] = sum(norms) / len(norms)
        return {**metrics, **signals.get("distill_info", {}), **self.end_rollout()}
