"""The three DPO components: ``preference-pairs`` (estimator), ``implicit-reward``
(advantage constructor) and ``dpo`` (updater). See the package docstring for the maths."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from tokenmdp import (
    AdvantageConstructor,
    ConfigError,
    GradientUpdater,
    MicroBatch,
    OptimizerOptions,
    PairBatch,
    TrajectoryEstimator,
    load_pair_file,
    one_of,
    optional,
    positive,
    positive_int,
    sample_pairs,
)

from .losses import LOSSES, dpo_loss, sequence_logratio

#: Pairs drawn when ``num_pairs`` is unset and ``pairs = "sampled"``.
DEFAULT_NUM_PAIRS = 2048


def pair_seed(seed: int) -> int:
    """Seed of the offline pair set and its epoch orders (independent of every step's seed)."""
    return (seed * 1_000_003 + 0x5EED) % (2**63)


class PreferencePairs(TrajectoryEstimator):
    """Serves each step's preference pairs, and scores the rollout with the implicit reward.

    Supervision: the pairs' labels come from the task's reward (the oracle reward
    model), or from a file; the rollout's own env reward is never read.

    * ``token_rewards``: ``beta * log(pi_theta/pi_ref)(a_t|s_t)`` on the rollout's tokens
      (``beta = train.beta``; at ``pi_theta = pi*`` this is exactly ``A*``).
    * ``preference_pairs``: a :class:`PairBatch`, the pairs the updater trains on this step,
      in order.

    Rounds. The ``S = train.steps`` steps are split into ``R`` rounds of consecutive steps
    (round of step ``k``: ``(k-1)*R//S``). At its first step, round ``r`` gets its pairs,
    ``N_r = (r+1)*N//R - r*N//R`` of them, and reads them as a stream of ``E`` shuffled
    passes, spread evenly over the round's steps. Offline, ``R = 1`` and the ``N`` pairs are
    drawn once at set-up from ``pi_ref`` (seeded from ``train.seed``) or read from the file,
    so training ends after exactly ``E`` epochs, whatever ``S`` is. Online, each round
    samples its pairs from the current policy. Both spend the same budget: ``N`` labelled
    pairs and ``E*N`` pair presentations.
    """

    name = "preference-pairs"
    requires = frozenset({"ref_logprobs"})
    provides = frozenset({"token_rewards", "preference_pairs"})
    data_token_metrics = ("dpo/pair_tokens",)

    @attrs.frozen
    class Options:
        #: "sampled": two responses per prompt, labelled by the task's reward; "file": a JSONL file.
        pairs: str = attrs.field(default="sampled", validator=one_of("sampled", "file"))
        #: pairs="file": JSONL of {"prompt", "chosen", "rejected"} (token ids, or text with a tokenizer).
        path: str | None = None
        #: Labelled pairs in total (sampled: default 2048; file: unset = every line, else the first N).
        num_pairs: int | None = attrs.field(default=None, validator=optional(positive_int))
        #: Re-sample the pairs from the current policy every round instead of once from pi_ref.
        online: bool = False
        #: online: rounds the pair budget is spread over; unset = one per trainer step.
        rounds: int | None = attrs.field(default=None, validator=optional(positive_int))
        #: Passes over each pair (offline: over the whole set; online: over each round's pairs).
        epochs: int = attrs.field(default=3, validator=positive_int)
        #: pairs="sampled": "hard": the higher reward is chosen; "bradley-terry": y_1 is chosen
        #: with probability sigmoid((R_1 - R_2) / train.beta), the preference model whose DPO
        #: optimum (with updater.beta = train.beta) is exactly pi*.
        labels: str = attrs.field(default="hard", validator=one_of("hard", "bradley-terry"))

    def __init__(self, options=None):
        super().__init__(options)
        o = self.options
        where = f"[estimator] ({self.name})"
        if o.pairs == "file" and not o.path:
            raise ConfigError(f"{where}: pairs='file' needs path = <JSONL file of prompt/chosen/rejected>")
        if o.pairs == "sampled" and o.path:
            raise ConfigError(f"{where}: path is read only with pairs='file'")
        if o.online and o.pairs != "sampled":
            raise ConfigError(f"{where}: online = true re-samples pairs, so it needs pairs='sampled'")
        if o.rounds is not None and not o.online:
            raise ConfigError(f"{where}: rounds is read only with online = true (offline is one round)")
        if o.labels != "hard" and o.pairs != "sampled":
            raise ConfigError(f"{where}: labels = {o.labels!r} labels sampled pairs; a file's pairs come labelled")

    def setup(self, ctx):
        o, train = self.options, ctx.config.train
        where = f"[estimator] ({self.name})"
        self.task, self.steps, self.temperature = ctx.task, train.steps, train.temperature
        self.label_beta = train.beta if o.labels == "bradley-terry" else None
        self.num_pairs = o.num_pairs or DEFAULT_NUM_PAIRS
        self.rounds = (o.rounds or self.steps) if o.online else 1
        if self.rounds > self.steps:
            raise ConfigError(f"{where}: rounds = {self.rounds} is more than train.steps = {self.steps}")
        if o.pairs == "file":
            self.pairs = load_pair_file(o.path, ctx.task, o.num_pairs)
            self.num_pairs = self.pairs.size
        #: round -> its steps (first, count); every step needs at least one pair
        self.round_of = [(k - 1) * self.rounds // self.steps for k in range(1, self.steps + 1)]
        for r in range(self.rounds):
            if self.round_size(r) * o.epochs < self.round_of.count(r):
                raise ConfigError(
                    f"{where}: round {r + 1} has {self.round_size(r)} pair(s) x {o.epochs} epoch(s) "
                    f"for {self.round_of.count(r)} steps; every step needs at least one pair: "
                    "raise num_pairs or epochs, or lower train.steps"
                )
        self.tie_frac: float | None = None
        self.pair_tokens, self.round = 0, -1
        if o.online:
            return
        generator = torch.Generator().manual_seed(pair_seed(train.seed))
        if o.pairs == "file":
            self._start_round(0, self.pairs, self.pairs.num_tokens, generator)
        else:
            self._sample_round(0, ctx.reference, generator)

    def round_size(self, r: int) -> int:
        return (r + 1) * self.num_pairs // self.rounds - r * self.num_pairs // self.rounds

    def _sample_round(self, r: int, model, generator: torch.Generator) -> None:
        pairs, counts = sample_pairs(model, self.task, self.round_size(r), generator, self.temperature, self.label_beta)
        self.tie_frac = counts["ties"] / counts["candidates"]
        self._start_round(r, pairs, counts["tokens"], generator)

    def _start_round(self, r: int, pairs: PairBatch, tokens: int, generator: torch.Generator) -> None:
        """Round ``r`` trains on ``pairs``: ``epochs`` shuffled passes, in one stream."""
        self.round, self.pairs, self.pair_tokens = r, pairs, self.pair_tokens + tokens
        self.stream = torch.cat([torch.randperm(pairs.size, generator=generator) for _ in range(self.options.epochs)])

    def estimate(self, batch, ctx):
        implicit = ctx.beta * batch.token_kl
        return {"token_rewards": implicit, "preference_pairs": self.step_pairs(ctx)}

    def step_pairs(self, ctx) -> PairBatch:
        """This step's slice of its round's stream (sampling the round's pairs on its first step)."""
        k = min(max(ctx.step, 1), self.steps)
        r = self.round_of[k - 1]
        if r != self.round:  # online: a new round, sampled from the current policy
            self._sample_round(r, ctx.policy, ctx.generator)
        first, count = self.round_of.index(r), self.round_of.count(r)
        j, length = k - 1 - first, len(self.stream)
        lo, hi = j * length // count, (j + 1) * length // count
        before = r * self.num_pairs // self.rounds  # pairs of earlier rounds
        info = {
            "dpo/pairs_labelled": before + self.pairs.size,
            "dpo/pairs_seen": self.options.epochs * before + hi,
            "dpo/pair_tokens": self.pair_tokens,
        }
        if self.tie_frac is not None:
            info["dpo/tie_frac"] = self.tie_frac
        return self.pairs.select(self.stream[lo:hi], info)

    def state_dict(self):
        """Online: the current round's pairs and order, so a resumed run finishes the round."""
        if not self.options.online or self.round < 0:
            return {}
        pairs = {f.name: getattr(self.pairs, f.name) for f in attrs.fields(PairBatch) if f.name != "info"}
        return {
            "round": self.round,
            "pairs": pairs,
            "stream": self.stream,
            "pair_tokens": self.pair_tokens,
            "tie_frac": self.tie_frac,
        }

    def load_state_dict(self, state):
        if state:
            self.round, self.stream, self.pair_tokens = state["round"], state["stream"], state["pair_tokens"]
            self.pairs, self.tie_frac = PairBatch(**state["pairs"]), state["tie_frac"]


class ImplicitReward(AdvantageConstructor):
    """``A_t = beta * log(pi_theta/pi_ref)(a_t|s_t)``: DPO's implicit token reward, which is
    the optimal advantage ``A*`` when ``pi_theta = pi*`` ("From r to Q*"). The pair updaters
    do not read it (their loss is on the pairs); it is scored as ``credit_corr_advantages``,
    and it is what a token-level updater composed after ``preference-pairs`` would train on."""

    name = "implicit-reward"
    requires = frozenset({"token_rewards"})
    provides = frozenset({"advantages"})

    def construct(self, batch, signals, ctx):
        return {"advantages": signals["token_rewards"]}


@attrs.frozen
class PairOptions(OptimizerOptions):
    """Options shared by the pair updaters (``dpo``, ``tdpo``)."""

    #: The loss's beta; unset = ``train.beta``.
    beta: float | None = attrs.field(default=None, validator=positive)
    #: Pairs per gradient step (the step's pairs are split into minibatches in order).
    minibatch_size: int = attrs.field(default=64, validator=positive_int)
    #: Decay the learning rate linearly to 0 over ``train.steps``.
    anneal_lr: bool = False


@attrs.frozen
class PairScores:
    """Policy scores of a minibatch of ``m`` pairs: rows ``0..m-1`` chosen, ``m..2m-1`` rejected."""

    chosen: Tensor  # [m] sequence log-ratio log pi/pi_ref (y_w|x), with grad
    rejected: Tensor  # [m] the same for y_l
    mask: Tensor  # [2m, T]
    #: [2m]: sum_t KL(pi_ref(.|s_t) || pi(.|s_t)) over each response's real tokens, with
    #: grad; only when :func:`score_pairs` is asked for it (TDPO), else None
    sequence_kl: Tensor | None = None


def score_pairs(ctx, pairs: PairBatch, kl: bool = False) -> PairScores:
    """One forward pass of the policy (and one of the reference) over both responses: the
    taken tokens' log-probs (an HF output layer a chunk of positions at a time, never the
    whole logits); with ``kl`` also each response's KL(pi_ref || pi) over the whole
    vocabulary, from the same forwards (``ctx.token_kl``: the reference kept as its hidden
    states on an HF model)."""
    responses = pairs.responses().to(ctx.device)
    mask = responses.response_mask
    if kl:
        ref_logp, reference = ctx.token_distribution(ctx.reference, responses)
        per_token, _, logp = ctx.token_kl(ctx.policy, responses, reference, direction="forward", return_logprobs=True)
        sequence_kl = per_token.sum(1)
    else:
        logp = ctx.token_logprobs(ctx.policy, responses)
        with torch.no_grad():
            ref_logp = ctx.token_logprobs(ctx.reference, responses)
        sequence_kl = None
    ratio = sequence_logratio(logp, ref_logp, mask)
    m = pairs.size
    return PairScores(ratio[:m], ratio[m:], mask, sequence_kl)


def pair_metrics(scores: PairScores, beta: float) -> dict[str, Tensor]:
    """Per-pair diagnostics: implicit rewards ``beta * logratio`` and whether the margin is positive."""
    chosen, rejected = scores.chosen.detach(), scores.rejected.detach()
    return {
        "dpo/accuracy": (chosen > rejected).float(),
        "dpo/margin": beta * (chosen - rejected),
        "dpo/chosen_reward": beta * chosen,
        "dpo/rejected_reward": beta * rejected,
    }


class DPOUpdater(GradientUpdater):
    """Adam steps on the pair loss over the step's pairs, ``minibatch_size`` pairs at a time.

    ``beta`` is the loss's own coefficient (unset: ``train.beta``, the textbook choice). With
    hard labels the sigmoid loss has no finite minimiser: it keeps widening every margin, so
    the policy drifts towards the highest-reward responses, past ``pi*``. A ``beta`` above
    ``train.beta`` makes the loss saturate at margins of about ``1/beta``; the shipped configs
    use ``beta = 7`` (tuned on V=6, H=5, ``train.beta = 1``; see ``configs/dpo.toml``).
    """

    name = "dpo"
    requires = frozenset({"preference_pairs"})
    #: Whether :meth:`pair_loss` reads ``PairScores.sequence_kl`` (TDPO's does).
    scores_kl = False

    @attrs.frozen
    class Options(PairOptions):
        #: "sigmoid": -log sigmoid(beta h) (DPO); "ipo": (h - 1/(2 beta))^2 (IPO).
        loss: str = attrs.field(default="sigmoid", validator=one_of(*LOSSES))

    def pair_loss(self, scores: PairScores, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair loss and per-pair metrics; subclasses (TDPO) change only this."""
        return dpo_loss(scores.chosen, scores.rejected, beta, self.options.loss), pair_metrics(scores, beta)

    def check(self, config, task):
        micro, size = self.options.micro_batch_size, self.options.minibatch_size
        if micro is not None and micro > size:
            raise ConfigError(
                f"updater.micro_batch_size = {micro} is larger than a minibatch of updater "
                f"{self.name!r} (updater.minibatch_size = {size} pairs); choose 1..{size}, or unset it"
            )

    def update(self, batch, signals, advantages, ctx):
        pairs: PairBatch = signals["preference_pairs"]
        beta = self.options.beta or ctx.beta

        def share(micro):
            losses, stats = self.pair_loss(score_pairs(ctx, micro.batch, kl=self.scores_kl), beta)
            # per-pair sums (for the step's means below); the loss is the minibatch's mean
            sums = {key: value.sum() for key, value in {"losses/dpo": losses.detach(), **stats}.items()}
            return micro.row_mean(losses), sums

        def slices(rows):
            for part in rows.split(self.options.micro_batch_size or len(rows)):
                yield share(MicroBatch(pairs.select(part), part, None, len(rows)))

        sums: dict[str, float] = {}
        norms = []
        for rows in torch.arange(pairs.size).split(self.options.minibatch_size):
            norm, totals = self.accumulate(slices(rows), ctx)
            norms.append(norm)
            for key, value in totals.items():
                sums[key] = sums.get(key, 0.0) + value
        metrics = {key: total / pairs.size for key, total in sums.items()}
        if pairs.chosen_env_reward is not None:
            metrics["dpo/env_reward_gap"] = float((pairs.chosen_env_reward - pairs.rejected_env_reward).mean())
        metrics["policy/grad_norm"] = sum(norms) / len(norms)
        return {**metrics, **pairs.info, **self.end_rollout()}
