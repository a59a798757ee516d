"""The GRPO family's options (issue 32) against TRL 1.16's formulas, written out here.

TRL stays out of the default install, so its formulas are transcribed below from
``trl/trainer/grpo_trainer.py`` (1.16.0): ``GRPOTrainer._compute_loss`` for the loss and
``_generate_and_score_completions`` for the advantages and ``mask_truncated_completions``.
For one (micro-)batch with per-token log-probs ``logp`` (with gradient), ``old``, ``ref``,
``mask`` ``[B, T]`` and advantages ``A`` (``[B]``, or ``[B, T]``):

    log_ratio = logp - old
    token:    w = log_ratio                                          [B, T]
    sequence: w = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(1)  [B, 1]   (GSPO)
    coef_1 = exp(w);  coef_2 = clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
    per_token_loss = -min(coef_1 * A, coef_2 * A)
                     + beta * (exp(ref - logp) - (ref - logp) - 1)    (beta != 0: the k3 KL)
    grpo:    ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(1)).mean() / GA
    bnpo:    (per_token_loss * mask).sum() / mask.sum().clamp(1) / GA
    dr_grpo: (per_token_loss * mask).sum() / (B * max_completion_length) / GA
    dapo:    (per_token_loss * mask).sum() / (num_items_in_batch / num_processes * GA / steps_per_generation)

with GA the gradient-accumulation steps (micro-batches of one optimizer step) and
``num_items_in_batch`` the masked tokens of the whole generation batch, gathered from every
process. ``mask_truncated_completions`` zeroes the mask of each completion whose last id is
neither EOS nor pad (it stopped at ``max_completion_length``) before anything is counted.

GSPO (Zheng et al. 2025) writes the sequence ratio as ``s_i = (pi(y_i)/pi_old(y_i))^(1/|y_i|)
= exp(mean_t log(pi/pi_old)(y_it))``; its GSPO-token variant (TRL's experimental
``GSPOTokenTrainer``) uses per token ``s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]``, equal to
``s_i`` in value and giving token t the gradient ``s_i * grad log pi(y_it)``. TRL's
``GRPOTrainer`` (and tokenmdp's ``importance_sampling_level = "sequence"``) uses the plain
``s_i`` ``[B, 1]``, whose gradient spreads ``s_i / |y_i|`` over the response's tokens; with
one advantage per response (the group recipes) both give the same loss and gradient under
every aggregation (tested below), so the forms differ only for per-token advantages.

Advantages (``scale_rewards``; G rows per group, consecutive; TRL's eps is 1e-4):

    A = r - mean_group(r);  "group": A / (std_group(r) + eps);  "batch": A / (std(r) + eps)

with ``std`` Bessel-corrected (``nanstd``).
"""

import types

import pytest
import torch
from helpers import TINY
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmdp import ConfigError, RolloutBatch
from tokenmdp.config import load_config
from tokenmdp.training.trainer import Trainer
from tokenmdp_group import GRPO, RLOO
from tokenmdp_inverse_q import (
    LOSS_TYPES,
    ClippedPG,
    aggregate_token_losses,
    clipped_token_losses,
    truncated_rows,
)

EOS, HORIZON = 3, 5


# --- TRL 1.16, transcribed ------------------------------------------------------------------


def trl_loss(
    logp,
    old,
    advantages,
    mask,
    *,
    loss_type,
    epsilon=0.2,
    epsilon_high=None,
    importance_sampling_level="token",
    beta=0.0,
    ref=None,
    max_completion_length=HORIZON,
    num_items_in_batch=None,
    num_processes=1,
    gradient_accumulation_steps=1,
    steps_per_generation=1,
):
    """``GRPOTrainer._compute_loss`` of one micro-batch (train mode), for these options."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    high = epsilon if epsilon_high is None else epsilon_high
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    ga = gradient_accumulation_steps
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / ga
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / ga
    assert loss_type == "dapo"
    normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
    normalizer = normalizer * ga / steps_per_generation
    return (per_token_loss * mask).sum() / normalizer


def trl_is_truncated(response_ids, mask, eos=EOS):
    """``_generate_and_score_completions``: a completion (its unpadded ids) is truncated
    when its last id is not EOS (nor pad, which an unpadded completion never ends with)."""
    ids = [row[: int(n)].tolist() for row, n in zip(response_ids, mask.sum(1))]
    return torch.tensor([len(x) > 0 and x[-1] != eos for x in ids])


def nanstd(x, dim=None):
    """TRL's ``nanstd`` (no NaNs here): Bessel-corrected."""
    mean = x.mean() if dim is None else x.mean(dim, keepdim=True)
    var = ((x - mean) ** 2).mean() if dim is None else ((x - mean) ** 2).mean(dim)
    n = x.numel() if dim is None else x.shape[dim]
    return (var * n / (n - 1)).sqrt()


def trl_advantages(rewards, G, scale_rewards, eps=1e-4):
    mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + eps)
    return advantages


# --- fixed tensors ------------------------------------------------------------------------------

LENGTHS = [5, 2, 4, 5, 1, 3, 5, 5]  # rows 0, 3, 6, 7 reach the horizon
LAST = [1, EOS, EOS, 2, EOS, EOS, EOS, 0]  # so rows 0, 3 and 7 were cut (no EOS at the end)


def fixed(seed=0, per_token_advantages=False):
    """Log-probs, old log-probs, ref log-probs, advantages, masks of different lengths and
    response ids (truncated rows among them) of an 8 x 5 batch. Padding holds garbage (finite)."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(LENGTHS), HORIZON
    mask = (torch.arange(t)[None] < torch.tensor(LENGTHS)[:, None]).float()
    old = -torch.rand(b, t, generator=g) * 2 - 0.05
    logp = old + 0.3 * torch.randn(b, t, generator=g)  # ratios on both sides of the clip range
    ref = old + 0.2 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    adv = adv[:, None] + 0.5 * torch.randn(b, t, generator=g) if per_token_advantages else adv
    ids = torch.randint(0, EOS, (b, t), generator=g)
    for i, (n, last) in enumerate(zip(LENGTHS, LAST)):
        ids[i, n - 1] = last
        ids[i, n:] = 0
    return types.SimpleNamespace(logp=logp, old=old, ref=ref, adv=adv, mask=mask, ids=ids)


def tokenmdp_loss(logp, x, options, parts, mask=None):
    """The updater's loss over a minibatch split into micro-batches ``parts`` (row index
    tensors), from its kernels, exactly as ``ClippedPG.update`` composes them."""
    mask = x.mask if mask is None else mask
    rows = torch.arange(len(LENGTHS))
    tokens = mask[rows].sum()
    adv = x.adv if x.adv.dim() == 2 else x.adv[:, None] * x.mask
    total = 0.0
    for part in parts:
        m = mask[part]
        surrogate, _ = clipped_token_losses(
            logp[part],
            x.old[part] * x.mask[part],
            adv[part],
            m,
            options.clip,
            options.epsilon_high,
            options.importance_sampling_level,
        )
        loss = aggregate_token_losses(surrogate, m, options.loss_type, tokens, len(rows), HORIZON)
        if options.kl_estimator == "k3" and options.kl_coef:
            ref_minus = (x.ref[part] - logp[part]) * x.mask[part]
            k3 = aggregate_token_losses(
                ref_minus.exp() - 1 - ref_minus, m, options.loss_type, tokens, len(rows), HORIZON
            )
            loss = loss + options.kl_coef * k3
        total = total + loss
    return total


def value_and_grad(fn, logp):
    logp = logp.clone().requires_grad_(True)
    value = fn(logp)
    (grad,) = torch.autograd.grad(value, logp)
    return value.detach(), grad


VARIANTS = [
    dict(loss_type=lt, importance_sampling_level=level, epsilon_high=high, beta=beta)
    for lt in LOSS_TYPES
    for level in ("token", "sequence")
    for high in (None, 0.28)
    for beta in (0.0, 0.04)
]


def options_for(v):
    kl = dict(kl_estimator="k3", kl_coef=v["beta"]) if v["beta"] else dict(kl_coef=0.0)
    return ClippedPG.Options(
        loss_type=v["loss_type"],
        importance_sampling_level=v["importance_sampling_level"],
        epsilon_high=v["epsilon_high"],
        **kl,
    )


def trl_kwargs(v, x):
    return dict(
        loss_type=v["loss_type"],
        epsilon_high=v["epsilon_high"],
        importance_sampling_level=v["importance_sampling_level"],
        beta=v["beta"],
        ref=x.ref,
    )


# --- the loss kernels against TRL -----------------------------------------------------------


@pytest.mark.parametrize("truncate", [False, True], ids=["all", "mask_truncated"])
@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_loss_and_gradient_equal_trl(v, truncate):
    """Every variant's loss and its gradient w.r.t. the log-probs equal TRL's on a minibatch
    of rows of different lengths, cut into uneven micro-batches (TRL: one step, GA = 1)."""
    x = fixed()
    mask = x.mask * (~trl_is_truncated(x.ids, x.mask)).float()[:, None] if truncate else x.mask
    options = options_for(v)
    parts = [torch.tensor([4, 0, 7]), torch.tensor([2, 5]), torch.tensor([1, 3, 6])]
    ours, our_grad = value_and_grad(lambda lp: tokenmdp_loss(lp * x.mask, x, options, parts, mask), x.logp)
    theirs, their_grad = value_and_grad(
        lambda lp: trl_loss(lp, x.old, x.adv, mask, num_items_in_batch=mask.sum(), **trl_kwargs(v, x)), x.logp
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-7)
    if truncate:
        assert our_grad[[0, 3, 7]].abs().sum() == 0  # the cut rows get no gradient


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_per_token_advantages_equal_trl(loss_type, level):
    """TRL also takes ``[B, T]`` advantages (subclasses provide them): so does the kernel,
    the sequence ratio included (which averages them over the response)."""
    x = fixed(seed=3, per_token_advantages=True)
    v = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28, beta=0.0)
    ours, our_grad = value_and_grad(lambda lp: tokenmdp_loss(lp * x.mask, x, options_for(v), [torch.arange(8)]), x.logp)
    theirs, their_grad = value_and_grad(
        lambda lp: trl_loss(lp, x.old, x.adv, x.mask, num_items_in_batch=x.mask.sum(), **trl_kwargs(v, x)), x.logp
    )
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_gradient_accumulation_equals_trl(loss_type):
    """Four equal micro-batches of one optimizer step: TRL's GA = 4 sum (for dapo with
    ``steps_per_generation = 4``, one generation batch per step) equals tokenmdp's, which
    divides by the whole minibatch. (TRL's bnpo divides each micro-batch by its own tokens,
    so it differs there: tokenmdp's loss never depends on ``micro_batch_size``.)"""
    x = fixed(seed=1)
    v = dict(loss_type=loss_type, importance_sampling_level="token", epsilon_high=None, beta=0.04)
    parts = list(torch.arange(8).split(2))
    ours, our_grad = value_and_grad(lambda lp: tokenmdp_loss(lp * x.mask, x, options_for(v), parts), x.logp)

    def trl(lp):
        return sum(
            trl_loss(
                lp[p],
                x.old[p],
                x.adv[p],
                x.mask[p],
                num_items_in_batch=x.mask.sum(),
                gradient_accumulation_steps=4,
                steps_per_generation=4,
                loss_type=loss_type,
                beta=0.04,
                ref=x.ref[p],
            )
            for p in parts
        )

    theirs, their_grad = value_and_grad(trl, x.logp)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


def tokenmdp_loss_rows(logp, sub, options, global_tokens, ranks=2):
    """One rank's loss on its own rows ``sub`` (one micro-batch)."""
    tokens = sub.mask.sum() if global_tokens is None else global_tokens / ranks
    surrogate, _ = clipped_token_losses(
        logp, sub.old * sub.mask, sub.adv[:, None] * sub.mask, sub.mask, options.clip, options.epsilon_high
    )
    return aggregate_token_losses(surrogate, sub.mask, options.loss_type, tokens, sub.mask.shape[0], HORIZON)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_ranks_average_to_trl(loss_type):
    """Two data-parallel ranks (rows 0-3 and 4-7), gradients averaged as the trainer does:
    dapo divides by every rank's tokens over the ranks (TRL's ``num_items_in_batch /
    num_processes``), bnpo by the rank's own tokens (TRL's, under DDP); each equals TRL's
    two processes averaged."""
    x = fixed(seed=2)
    v = dict(loss_type=loss_type, importance_sampling_level="token", epsilon_high=None, beta=0.0)
    ranks = [torch.arange(4), torch.arange(4, 8)]

    def ours(lp):
        total = 0.0
        for rows in ranks:
            sub = types.SimpleNamespace(**{k: getattr(x, k)[rows] for k in ("old", "ref", "adv", "mask")})
            global_tokens = x.mask.sum() if loss_type == "dapo" else None
            total = total + tokenmdp_loss_rows(lp[rows] * sub.mask, sub, options_for(v), global_tokens)
        return total / 2

    def trl(lp):
        losses = [
            trl_loss(
                lp[r],
                x.old[r],
                x.adv[r],
                x.mask[r],
                loss_type=loss_type,
                num_items_in_batch=x.mask.sum(),
                num_processes=2,
            )
            for r in ranks
        ]
        return sum(losses) / 2

    a, ga = value_and_grad(ours, x.logp)
    b, gb = value_and_grad(trl, x.logp)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gspo_equals_its_stop_gradient_token_form(loss_type):
    """With one advantage per response, TRL's GSPO ratio ``exp(mean log ratio)`` ``[B, 1]``
    and GSPO-token's ``sg[s_i] * pi / sg[pi]`` per token give the same loss and gradient,
    under every aggregation."""
    x = fixed(seed=4)
    high = 0.28

    def gspo_token(lp):
        log_ratio = (lp - x.old) * x.mask
        s = (log_ratio.sum(-1, keepdim=True) / x.mask.sum(-1, keepdim=True)).exp()
        s_t = s.detach() * (lp - lp.detach()).exp()
        a = x.adv[:, None]
        per_token = -torch.min(s_t * a, s_t.clamp(1 - 0.2, 1 + high) * a)
        return aggregate_token_losses(per_token, x.mask, loss_type, x.mask.sum(), 8, HORIZON)

    v = dict(loss_type=loss_type, importance_sampling_level="sequence", epsilon_high=high, beta=0.0)
    ours, our_grad = value_and_grad(lambda lp: tokenmdp_loss(lp * x.mask, x, options_for(v), [torch.arange(8)]), x.logp)
    sg, sg_grad = value_and_grad(gspo_token, x.logp)
    torch.testing.assert_close(ours, sg)
    torch.testing.assert_close(our_grad, sg_grad)


def test_truncated_rows_are_trls():
    x = fixed()
    batch = types.SimpleNamespace(response_ids=x.ids, response_mask=x.mask)
    task = types.SimpleNamespace(horizon=HORIZON, eos_token=EOS)
    assert torch.equal(truncated_rows(batch, task), trl_is_truncated(x.ids, x.mask))
    assert truncated_rows(batch, task).nonzero().squeeze(1).tolist() == [0, 3, 7]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, HORIZON), min_size=1, max_size=9),
    cut=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_aggregation_identities(lengths, cut, seed):
    """Micro-batch shares sum to the whole minibatch's loss for every loss_type; dapo is bnpo
    in one process; with every row the same length L, grpo is bnpo, and dr_grpo is bnpo
    times L / horizon; each is a weighted sum of the token losses (rows without tokens add 0)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = (torch.arange(HORIZON)[None] < torch.tensor(lengths)[:, None]).float()
    x = torch.randn(b, HORIZON, generator=g)
    x = torch.where(mask > 0, x, torch.full_like(x, float("nan")))  # garbage on padding never leaks
    tokens = mask.sum()

    def whole(lt):
        return aggregate_token_losses(x, mask, lt, tokens, b, HORIZON)

    for lt in LOSS_TYPES:
        shares = sum(aggregate_token_losses(x[p], mask[p], lt, tokens, b, HORIZON) for p in torch.arange(b).split(cut))
        torch.testing.assert_close(shares, whole(lt), rtol=1e-5, atol=1e-6)
        assert torch.isfinite(whole(lt))
    assert torch.equal(whole("dapo"), whole("bnpo"))
    if len(set(lengths)) == 1 and lengths[0] > 0:
        torch.testing.assert_close(whole("grpo"), whole("bnpo"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(whole("dr_grpo"), whole("bnpo") * lengths[0] / HORIZON, rtol=1e-5, atol=1e-6)


# --- scale_rewards against TRL's advantages -------------------------------------------------


def group_batch(rewards, G):
    b = len(rewards)
    mask = torch.ones(b, 2)
    env = torch.zeros(b, 2)
    env[:, 1] = torch.tensor(rewards)
    groups = torch.arange(b) // G
    return types.SimpleNamespace(
        rewards=env,
        response_mask=mask,
        groups=groups,
        sequence_rewards=env.sum(1),
        token_kl=torch.zeros(b, 2),
    )


def estimated(cls, batch, **options):
    est = cls(cls.Options(kl_coef=0.0, **options))
    return est.estimate(batch, types.SimpleNamespace(beta=1.0))["token_rewards"]


@settings(max_examples=30, deadline=None)
@given(data=st.data(), G=st.integers(2, 5), groups=st.integers(1, 4))
def test_scale_rewards_equals_trl(data, G, groups):
    # rewards on a grid of halves (as 0/1 rewards are): a group of equal rewards centres to exactly 0,
    # rather than to rounding noise that a std of 0 + eps would blow up differently on each side
    halves = st.integers(-6, 6).map(lambda k: k / 2)
    rewards = data.draw(st.lists(halves, min_size=G * groups, max_size=G * groups))
    r = torch.tensor(rewards)
    batch = group_batch(rewards, G)
    for scale in ("group", "batch", "none"):
        want = trl_advantages(r, G, scale)
        got = estimated(GRPO, batch, eps=1e-4, scale_rewards=scale)
        torch.testing.assert_close(got[:, 0], want, rtol=1e-4, atol=1e-4)
        # a reward paid at the end: reward-to-go credit is the sequence credit, for every scale
        to_go = estimated(GRPO, batch, eps=1e-4, scale_rewards=scale, credit="reward-to-go")
        torch.testing.assert_close(to_go, got, rtol=1e-5, atol=1e-6)
        # RLOO's leave-one-out centring is G/(G-1) times the group mean's, scaled alike
        got = estimated(RLOO, batch, eps=1e-4, scale_rewards=scale)
        torch.testing.assert_close(got[:, 0], want * G / (G - 1), rtol=1e-4, atol=1e-4)


def test_scale_rewards_defaults_are_todays():
    assert GRPO.Options().scale_rewards == "group" and RLOO.Options().scale_rewards == "none"
    batch = group_batch([1.0, 0.0, 3.0, 3.0, 2.0, 5.0], 3)
    for cls in (GRPO, RLOO):
        default = estimated(cls, batch)
        same = estimated(cls, batch, scale_rewards=cls.Options().scale_rewards)
        assert torch.equal(default, same)


# --- the updater end to end ------------------------------------------------------------------


class RowLogprobs(torch.nn.Module):
    """A 'policy' whose token log-probs are its parameters: row i of ``theta`` is response
    i's (the batch's prompt id says which row a micro-batch holds)."""

    def __init__(self, logp):
        super().__init__()
        self.theta = torch.nn.Parameter(logp.clone())


def end_to_end(x, truncate=False, **options):
    """One ``ClippedPG.update`` (1 epoch, 1 minibatch, micro-batches of 3 rows, no
    gradient clipping) on a RolloutBatch of ``x``; the policy's gradient and metrics."""
    b = len(LENGTHS)
    batch = RolloutBatch(
        prompt_ids=torch.arange(b)[:, None],
        prompt_mask=torch.ones(b, 1, dtype=torch.long),
        response_ids=x.ids,
        response_mask=x.mask,
        rewards=torch.zeros(b, HORIZON),
        prompt_index=torch.zeros(b, dtype=torch.long),
        logprobs=x.old * x.mask,
        ref_logprobs=x.ref * x.mask,
    )
    policy = RowLogprobs(x.logp)

    def token_logprobs(model, mb, return_entropy=False, entropy_grad=True):
        logp = model.theta[mb.prompt_ids[:, 0]] * mb.response_mask
        return logp, torch.zeros_like(logp)

    ctx = types.SimpleNamespace(
        policy=policy,
        beta=1.0,
        task=types.SimpleNamespace(horizon=HORIZON, eos_token=EOS),
        config=types.SimpleNamespace(train=types.SimpleNamespace(steps=10)),
        generator=torch.Generator().manual_seed(0),
        logs_kl=False,
        token_logprobs=token_logprobs,
    )
    updater = ClippedPG(
        ClippedPG.Options(
            epochs=1,
            minibatches=1,
            micro_batch_size=3,
            max_grad_norm=0.0,
            mask_truncated_completions=truncate,
            **options,
        )
    )
    updater.setup(ctx)
    metrics = updater.update(batch, {}, {"advantages": x.adv[:, None] * x.mask}, ctx)
    return policy.theta.grad, metrics


@pytest.mark.parametrize(
    "v",
    [v for v in VARIANTS if v["epsilon_high"] == 0.28 or v["loss_type"] == "bnpo"],
    ids=lambda v: "-".join(str(x) for x in v.values()),
)
@pytest.mark.parametrize("truncate", [False, True], ids=["all", "mask_truncated"])
def test_update_gradient_equals_trl(v, truncate):
    """The real update path (micro-batches, the truncation mask from the response ids, the
    k3 KL as TRL's beta): the gradient it steps with is TRL's, its policy loss TRL's."""
    x = fixed(seed=5)
    kl = dict(kl_estimator="k3", kl_coef=v["beta"]) if v["beta"] else dict(kl_coef=0.0)
    grad, metrics = end_to_end(
        x,
        truncate=truncate,
        loss_type=v["loss_type"],
        importance_sampling_level=v["importance_sampling_level"],
        epsilon_high=v["epsilon_high"],
        **kl,
    )
    mask = x.mask * (~trl_is_truncated(x.ids, x.mask)).float()[:, None] if truncate else x.mask
    _, want = value_and_grad(
        lambda lp: trl_loss(lp, x.old, x.adv, mask, num_items_in_batch=mask.sum(), **trl_kwargs(v, x)), x.logp
    )
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    policy_only = trl_loss(
        x.logp, x.old, x.adv, mask, num_items_in_batch=mask.sum(), **{**trl_kwargs(v, x), "beta": 0.0}
    )
    assert metrics["losses/policy"] == pytest.approx(float(policy_only), rel=1e-5, abs=1e-7)


def test_update_dapo_divides_by_every_ranks_tokens(monkeypatch):
    """Under two ranks dapo divides by (both ranks' tokens) / 2: the other rank's count comes
    from ``distributed.all_sum``; bnpo keeps its own."""
    import tokenmdp.distributed as dist

    x = fixed(seed=6)
    other = 11.0  # the other rank's masked tokens in this optimizer step
    grad_bnpo, _ = end_to_end(x, loss_type="bnpo", kl_coef=0.0)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_sum", lambda *t: tuple(v + other for v in t))
    grad_dapo, _ = end_to_end(x, loss_type="dapo", kl_coef=0.0)
    grad_bnpo2, _ = end_to_end(x, loss_type="bnpo", kl_coef=0.0)
    mine = x.mask.sum()
    torch.testing.assert_close(grad_dapo, grad_bnpo * mine / ((mine + other) / 2))
    assert torch.equal(grad_bnpo2, grad_bnpo)


def test_defaults_are_todays_loss():
    """The defaults are the loss clipped-pg always had (a token mean over the minibatch's
    real tokens, symmetric token clipping, every row), and dapo is the same loss in one process."""
    o = ClippedPG.Options()
    assert (o.loss_type, o.epsilon_high, o.importance_sampling_level, o.mask_truncated_completions) == (
        "bnpo",
        None,
        "token",
        False,
    )
    x = fixed(seed=7)
    g_default, m_default = end_to_end(x, kl_coef=0.0)
    g_dapo, m_dapo = end_to_end(x, kl_coef=0.0, loss_type="dapo")
    g_eps, m_eps = end_to_end(x, kl_coef=0.0, epsilon_high=0.2)
    assert torch.equal(g_default, g_dapo) and m_default == m_dapo
    assert torch.equal(g_default, g_eps) and m_default["losses/policy"] == m_eps["losses/policy"]


# --- options through a config: composition and one-line errors ---------------------------------

GROUP = ["train.samples_per_prompt=4", "env.eos_token=3"]


def start(tmp_path, recipe, *overrides):
    return Trainer(load_config(None, [*TINY, f"algorithm.name={recipe}", f"run.dir={tmp_path / 'r'}", *overrides]))


def config_error(tmp_path, recipe, *overrides):
    with pytest.raises(ConfigError) as info:
        start(tmp_path, recipe, *overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_unknown_loss_type_lists_the_choices(tmp_path):
    message = config_error(tmp_path, "grpo", *GROUP, "updater.loss_type=dr-grpo")
    assert "loss_type" in message and "[updater]" in message
    for choice in LOSS_TYPES:
        assert repr(choice) in message


def test_epsilon_high_below_clip(tmp_path):
    message = config_error(tmp_path, "grpo", *GROUP, "updater.clip=0.2", "updater.epsilon_high=0.1")
    assert "epsilon_high must be >= clip" in message and "[updater]" in message


def test_unknown_scale_rewards(tmp_path):
    for recipe in ("grpo", "rloo"):
        message = config_error(tmp_path, recipe, *GROUP, "estimator.scale_rewards=std")
        assert "scale_rewards" in message and "[estimator]" in message and "'batch'" in message


def test_gspo_refuses_a_k1_kl_in_the_advantage(tmp_path):
    message = config_error(
        tmp_path, "grpo", *GROUP, "updater.importance_sampling_level=sequence", "updater.kl_coef=0.1"
    )
    assert "updater.importance_sampling_level = 'sequence'" in message and "updater.kl_estimator = 'k3'" in message
    # inverse-q's updater takes kl_coef from train.beta: the message says so
    message = config_error(tmp_path, "inverse-q", "updater.importance_sampling_level=sequence")
    assert "from train.beta" in message
    # the group recipes' KL is in the reward (updater kl_coef = 0), and k3 is TRL's beta: both start
    start(tmp_path, "grpo", *GROUP, "updater.importance_sampling_level=sequence")
    start(
        tmp_path,
        "grpo",
        *GROUP,
        "updater.importance_sampling_level=sequence",
        "updater.kl_estimator=k3",
        "updater.kl_coef=0.04",
    )


def test_mask_truncated_completions_needs_eos(tmp_path):
    message = config_error(tmp_path, "grpo", "train.samples_per_prompt=4", "updater.mask_truncated_completions=true")
    assert "updater.mask_truncated_completions" in message and "EOS" in message


def test_a_trl_style_config_trains(tmp_path):
    """A TRL 1.16 default GRPO (dapo, no reward scaling change, beta as a k3 KL in the loss,
    the KL out of the reward) with DAPO's clip-higher and overlong masking, and GSPO: both run."""
    dapo = [
        *GROUP,
        "updater.loss_type=dapo",
        "updater.epsilon_high=0.28",
        "updater.mask_truncated_completions=true",
        "updater.kl_estimator=k3",
        "updater.kl_coef=0.04",
        "estimator.kl_coef=0",
        "estimator.scale_rewards=batch",
    ]
    summary = start(tmp_path, "grpo", *dapo).train()
    assert summary["updater"] == "clipped-pg"
    gspo = [
        *GROUP,
        "updater.importance_sampling_level=sequence",
        "updater.loss_type=grpo",
        "estimator.scale_rewards=none",
    ]
    start(tmp_path / "gspo", "rloo", *gspo).train()


def test_options_name_their_papers():
    from tokenmdp.reports.option_pages import options_text

    text = options_text("grpo")
    for key in (
        "loss_type",
        "epsilon_high",
        "importance_sampling_level",
        "mask_truncated_completions",
        "scale_rewards",
    ):
        assert key in text
    for paper in ("Shao et al. 2024", "Liu et al. 2025", "Yu et al. 2025", "Zheng et al. 2025"):
        assert paper in text
