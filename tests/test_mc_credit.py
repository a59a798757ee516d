"""Monte-Carlo credit (tokenmdp.training.mc_credit) against exact values on toy tasks: A*
itself at pi*, the exact A^pi of other policies within its standard error, its error
shrinking like 1/sqrt(K); its budget; and one tiny text run end to end."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from test_real_lm import text_files, text_run  # noqa: F401 (text_files: a fixture)

from tokenmdp import ConfigError
from tokenmdp.config import load_config
from tokenmdp.mdp.solver import OptimalPolicy, solve
from tokenmdp.plugin.batch import RolloutBatch
from tokenmdp.policies import TaskBasePolicy
from tokenmdp.training.mc_credit import MonteCarloCredit, monte_carlo_credit, needed_tokens
from tokenmdp.training.rollout import generate
from tokenmdp.training.trainer import Trainer
from tokenmdp_envs import PatternTask, SumThresholdTask

BETA = 0.5
#: Dense reward on every token (Pattern), and one paid at the end only (SumThreshold).
TASKS = {"Pattern": PatternTask, "SumThreshold": SumThresholdTask}
#: Below this a standard error is float rounding (the policies' float32 log-probs), not sampling.
ROUNDING = 1e-6


@attrs.frozen
class Toy:
    task: object
    reference: TaskBasePolicy
    solution: object


def toy(name: str) -> Toy:
    task = TASKS[name](vocab_size=3, horizon=4, eos_token=0, seed=0)
    reference = TaskBasePolicy(task)
    return Toy(task, reference, solve(task, reference, BETA))


def table_policy(solution, logp: list[torch.Tensor]) -> OptimalPolicy:
    """The policy whose log-probs on the prefix tree are ``logp`` (OptimalPolicy reads its tables)."""
    return OptimalPolicy(attrs.evolve(solution, opt_logp=logp))


def halfway(solution) -> list[torch.Tensor]:
    """A trained policy's stand-in: half-way from pi_ref to pi* in log-space (neither of them)."""
    return [torch.log_softmax((r + o) / 2, -1) for r, o in zip(solution.ref_logp, solution.opt_logp)]


def exact_advantages(solution, logp, beta):
    """``t -> A^pi = Q^pi - V^pi`` at depth ``t`` of the policy with tree log-probs ``logp``
    (``Solution.policy_values``)."""
    q, v = solution.policy_values(logp, beta)
    return lambda t: q[t] - v[t][..., None]


def responses(task, policy, rows: int, seed: int) -> RolloutBatch:
    """``rows`` responses of ``policy``, cycling through the task's prompts."""
    index = torch.arange(rows) % task.prompts.shape[0]
    prompts = task.prompts[index]
    response, mask = generate(policy, prompts, task.horizon, task.eos_token, torch.Generator().manual_seed(seed))
    return RolloutBatch(prompts, torch.ones_like(prompts), response, mask, torch.zeros(mask.shape), index)


def credit(policy, toy: Toy, batch, k: int, seed: int = 1, beta: float = BETA, **kwargs) -> MonteCarloCredit:
    return monte_carlo_credit(
        policy, toy.reference, toy.task, batch, beta, k, torch.Generator().manual_seed(seed), **kwargs
    )


def calibrated(estimate: torch.Tensor, stderr: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``estimate`` is ``truth`` within its standard errors, by three checks:

    - no bias: the rows' mean errors (rows are independent; the tokens of one row share
      continuation sets) average to 0 within 4 of their standard errors;
    - the standard error is the error's size: ``sum err^2 / sum stderr^2`` in [0.7, 1.4]
      (both have the expectation ``var_Q/K + var_V/K`` at each token);
    - at least 90% of the tokens lie within 3 standard errors. Not 99%: a token whose
      return hinges on a continuation of small probability gets K equal returns now and
      then, and with them a standard error of 0 that the error exceeds."""
    real = mask > 0
    error = (estimate - truth) * real
    rows = real.any(1)
    row_mean = (error.sum(1) / real.sum(1).clamp(min=1))[rows]
    t = float(row_mean.mean() / (row_mean.std() / math.sqrt(row_mean.numel())))
    ratio = float(error[real].pow(2).sum() / stderr[real].pow(2).sum())
    within = float((error.abs() <= 3 * stderr + ROUNDING)[real].float().mean())
    return abs(t) < 4 and 0.7 < ratio < 1.4 and within >= 0.9


# --- against the exact values -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_at_pi_star_the_estimate_is_a_star_itself(name):
    """At pi* the KL-penalised reward of a token, ``r_t - beta log pi*/pi_ref = r_t - A*_t =
    V*(s_t) - V*(s_{t+1})``, telescopes: every continuation of ``s_j`` returns ``V*(s_j)``.
    So the estimate is unbiased with no variance at all: A* up to float rounding, any K."""
    toy_ = toy(name)
    optimal = toy_.solution.policy()
    batch = responses(toy_.task, optimal, 32, seed=0)
    truth = toy_.solution.token_advantages(batch.prompt_index, batch.response_ids, batch.response_mask)
    assert truth.abs().max() > 0.1  # swapping Q and V (-A*) or dropping a term would show
    mc = credit(optimal, toy_, batch, k=4)
    assert (mc.advantages - truth).abs().max() < 1e-5 and mc.stderr.max() < 1e-5
    # the objective's beta matters: with another one the returns are noisy and the mean is off
    wrong = credit(optimal, toy_, batch, k=16, beta=2 * BETA)
    assert (wrong.advantages - truth).abs().max() > 0.1
    assert not calibrated(wrong.advantages, wrong.stderr, truth, batch.response_mask)


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("which", ["reference", "halfway"])
def test_unbiased_within_its_standard_error_for_other_policies(name, which):
    """Under pi_ref and a policy between pi_ref and pi*, the estimate is the exact ``A^pi``
    within its standard errors; the same check fails for Q and V swapped, for another
    beta, and (at pi_ref) for A*, which is another policy's advantage."""
    toy_ = toy(name)
    solution = toy_.solution
    logp = solution.ref_logp if which == "reference" else halfway(solution)
    policy = table_policy(solution, logp)
    batch = responses(toy_.task, policy, 128, seed=0)
    along = lambda table: solution.along_responses(table, batch.prompt_index, batch.response_ids, batch.response_mask)
    truth = along(exact_advantages(solution, logp, BETA))
    mask = batch.response_mask
    mc = credit(policy, toy_, batch, k=32)
    assert calibrated(mc.advantages, mc.stderr, truth, mask)
    assert not calibrated(-mc.advantages, mc.stderr, truth, mask)  # Q - V swapped
    if which == "reference":  # log pi/pi_ref = 0: beta drops out; A* is pi*'s advantage, not pi_ref's
        assert not calibrated(mc.advantages, mc.stderr, along(solution.advantages), mask)
    else:
        wrong = credit(policy, toy_, batch, k=32, beta=2 * BETA)
        assert not calibrated(wrong.advantages, wrong.stderr, truth, mask)


def test_error_and_stderr_shrink_like_one_over_sqrt_k():
    """K = 16 -> 64: the standard error and the RMSE against the exact ``A^pi`` both halve."""
    toy_ = toy("Pattern")
    logp = halfway(toy_.solution)
    policy = table_policy(toy_.solution, logp)
    batch = responses(toy_.task, policy, 128, seed=0)
    truth = toy_.solution.along_responses(
        exact_advantages(toy_.solution, logp, BETA), batch.prompt_index, batch.response_ids, batch.response_mask
    )
    real = batch.response_mask > 0
    rmse, stderr = {}, {}
    for k in (16, 64):
        mc = credit(policy, toy_, batch, k=k)
        rmse[k] = float((mc.advantages - truth)[real].pow(2).mean().sqrt())
        stderr[k] = float(mc.stderr[real].mean())
    assert 1.6 < stderr[16] / stderr[64] < 2.5
    assert 1.6 < rmse[16] / rmse[64] < 2.5
    assert 0.7 < rmse[64] / stderr[64] < 1.4  # the standard error is the size of the error


# --- cost and budget ---------------------------------------------------------------------------


def test_needed_tokens_is_k_continuations_to_the_horizon_from_every_prefix():
    toy_ = toy("Pattern")
    batch = responses(toy_.task, toy_.reference, 16, seed=0)
    lengths = batch.response_mask.sum(1).long().tolist()
    h = toy_.task.horizon
    assert needed_tokens(batch, h, 8) == [8 * sum(h - j for j in range(n)) for n in lengths]
    mc = credit(toy_.reference, toy_, batch, k=8)
    assert 0 < mc.sampled_tokens <= sum(needed_tokens(batch, h, 8))
    assert mc.estimated.all() and mc.k == 8


def test_rows_past_the_budget_are_not_estimated():
    toy_ = toy("SumThreshold")
    batch = responses(toy_.task, toy_.reference, 8, seed=0)
    cost = needed_tokens(batch, toy_.task.horizon, 4)
    budget = cost[0] + cost[1] + cost[2] - 1  # two rows fit; the third does not, by one token
    mc = credit(toy_.reference, toy_, batch, k=4, budget=budget)
    assert mc.estimated.tolist() == [True, True] + [False] * 6
    assert (mc.advantages[2:] == 0).all() and (mc.stderr[2:] == 0).all()
    assert mc.stderr[:2].sum() > 0
    assert mc.sampled_tokens <= cost[0] + cost[1]
    assert mc.advantages.dtype == mc.stderr.dtype == torch.float64 and mc.advantages.shape == batch.response_ids.shape
    padding = batch.response_mask == 0
    assert (mc.advantages[padding] == 0).all() and (mc.stderr[padding] == 0).all()
    assert credit(toy_.reference, toy_, batch, k=4, budget=sum(cost)).estimated.all()


def test_too_small_a_budget_is_one_line_naming_what_it_needs():
    toy_ = toy("Pattern")
    batch = responses(toy_.task, toy_.reference, 4, seed=0)
    need = needed_tokens(batch, toy_.task.horizon, 8)[0]
    with pytest.raises(ConfigError) as caught:
        credit(toy_.reference, toy_, batch, k=8, budget=need - 1)
    message = str(caught.value)
    assert "\n" not in message
    assert f"--budget {need - 1} sampled tokens is too small" in message and f"needs up to {need:,}" in message
    assert "K = 8" in message


@pytest.mark.parametrize("k", [1, 0, 2.5])
def test_fewer_than_two_continuations_is_an_error(k):
    toy_ = toy("Pattern")
    batch = responses(toy_.task, toy_.reference, 2, seed=0)
    with pytest.raises(ConfigError, match="K >= 2"):
        credit(toy_.reference, toy_, batch, k=k)


def test_deterministic_for_a_seed():
    toy_ = toy("SumThreshold")
    batch = responses(toy_.task, toy_.reference, 8, seed=0)
    a, b = credit(toy_.reference, toy_, batch, k=4, seed=5), credit(toy_.reference, toy_, batch, k=4, seed=5)
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.stderr, b.stderr)
    assert a.sampled_tokens == b.sampled_tokens
    assert not torch.equal(a.advantages, credit(toy_.reference, toy_, batch, k=4, seed=6).advantages)


# --- text ------------------------------------------------------------------------------------------


def test_a_tiny_text_run_end_to_end(text_files, tmp_path):  # noqa: F811 (a fixture)
    """The tiny GPT-2 on the length reward: its sampled batch, continuations from the HF
    policy, the reference's scores and the text task's per-token rewards."""
    config = load_config(None, text_run(text_files, tmp_path / "run", "algorithm.name=reinforce", "train.batch_size=4"))
    trainer = Trainer(config)
    trainer.build_models()
    batch = trainer._collect(1)
    run = lambda seed, **kw: monte_carlo_credit(
        trainer.policy,
        trainer.reference,
        trainer.task,
        batch,
        trainer.ctx.beta,
        4,
        torch.Generator().manual_seed(seed),
        **kw,
    )
    mc = run(0)
    real = batch.response_mask.cpu() > 0
    assert mc.estimated.all() and torch.isfinite(mc.advantages).all() and torch.isfinite(mc.stderr).all()
    assert (mc.advantages[~real] == 0).all() and (mc.stderr[~real] == 0).all()
    assert mc.stderr[real].gt(0).any()  # continuations of a sampled LM differ
    assert 0 < mc.sampled_tokens <= sum(needed_tokens(batch, trainer.task.horizon, 4))
    again = run(0)
    assert torch.equal(mc.advantages, again.advantages) and torch.equal(mc.stderr, again.stderr)
    with pytest.raises(ConfigError, match="too small for one Monte-Carlo estimate"):
        run(0, budget=1)
