"""The exact soft-Bellman solver against brute force and the identities of METHOD.md section 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenmdp.mdp.env import TokenMDPEnv, TokenVectorEnv
from tokenmdp.mdp.solver import all_prefixes, prefix_index, solve, tree_logprobs
from tokenmdp.plugin.batch import token_logprobs
from tokenmdp.policies import GRUPolicy, MLPPolicy, TabularPolicy, TaskBasePolicy, TransformerPolicy
from tokenmdp.training.rollout import collect, generate
from tokenmdp_envs import BanditTask, ForbiddenTask, LengthTask, PatternTask, SumModTask

TASKS = {"Pattern": PatternTask, "SumMod": SumModTask, "Forbidden": ForbiddenTask, "Bandit": BanditTask}
BETAS = [0.5, 1.0, 2.0]


def make_task(name: str, vocab_size: int, horizon: int, eos: int | None = None, seed: int = 0, **kwargs):
    if name == "Forbidden" and vocab_size == 2:
        kwargs.setdefault("num_forbidden", 1)
    return TASKS[name](vocab_size=vocab_size, horizon=horizon, eos_token=eos, seed=seed, **kwargs)


def gru(task, seed: int, hidden: int = 8) -> GRUPolicy:
    torch.manual_seed(seed)
    return GRUPolicy(task.input_vocab_size, task.vocab_size, hidden=hidden).double()


def make_reference(kind: str, task):
    return TaskBasePolicy(task) if kind == "base" else gru(task, seed=1234)


# --- brute force --------------------------------------------------------------------------


def complete_responses(task) -> list[list[int]]:
    """Every response the MDP can produce: it ends at EOS or after ``horizon`` tokens."""
    out: list[list[int]] = []

    def grow(prefix: list[int]) -> None:
        for a in range(task.vocab_size):
            y = prefix + [a]
            if a == task.eos_token or len(y) == task.horizon:
                out.append(y)
            else:
                grow(y)

    grow([])
    return out


def env_return(task, prompt_index: int, response: list[int]) -> float:
    """R(x, y) by stepping the single Gymnasium env (independent of the solver)."""
    env = TokenMDPEnv(task)
    env.reset(options={"prompt_index": prompt_index})
    total = 0.0
    for i, a in enumerate(response):
        _, r, terminated, truncated, _ = env.step(a)
        total += r
        assert (terminated or truncated) == (i == len(response) - 1)
    return total


@torch.no_grad()
def sequence_logprob(policy, task, prompt_index: int, response: list[int]) -> float:
    """log pi(y|x) by one full forward pass over prompt + response."""
    prompt = task.prompts[prompt_index]
    ids = torch.cat([prompt, torch.tensor(response)])[None]
    logits = policy(ids)[0, prompt.numel() - 1 : prompt.numel() - 1 + len(response)]
    logp = torch.log_softmax(logits.double(), -1)
    return float(logp.gather(1, torch.tensor(response)[:, None]).sum())


def tree_sequence_logprob(logp: list[torch.Tensor], task, prompt_index: int, response: list[int]) -> float:
    total = 0.0
    for t, a in enumerate(response):
        index = int(prefix_index(torch.tensor([response[:t]]).view(1, t), task.vocab_size))
        total += float(logp[t][prompt_index, index, a])
    return total


CASES = [
    (name, v, h, eos, ref)
    for name in TASKS
    for v, h in [(2, 1), (2, 3), (3, 2), (3, 3)]
    for eos in [None, 1]
    for ref in ["base", "gru"]
]


@pytest.mark.parametrize("name, vocab_size, horizon, eos, ref", CASES)
def test_solver_matches_brute_force(name, vocab_size, horizon, eos, ref):
    task = make_task(name, vocab_size, horizon, eos)
    reference = make_reference(ref, task)
    ref_logp = tree_logprobs(reference, task)
    responses = complete_responses(task)
    if eos is None:
        assert len(responses) == vocab_size**horizon
    n_prompts = task.prompts.shape[0]
    table = [
        [(y, env_return(task, p, y), sequence_logprob(reference, task, p, y)) for y in responses]
        for p in range(n_prompts)
    ]
    # pi_ref sums to 1 over complete responses (sanity of the enumeration itself).
    for rows in table:
        assert math.fsum(math.exp(lp) for _, _, lp in rows) == pytest.approx(1.0, abs=1e-12)
    probs = np.full(n_prompts, 1.0 / n_prompts)  # toy prompts are uniform
    for beta in BETAS:
        solution = solve(task, reference, beta, ref_logp=ref_logp)
        j_star = 0.0
        for p, rows in enumerate(table):
            log_terms = np.array([lp + r / beta for _, r, lp in rows])
            log_z = float(np.logaddexp.reduce(log_terms))
            v_star = beta * log_z
            assert float(solution.v[0][p, 0]) == pytest.approx(v_star, abs=1e-9, rel=1e-9)
            j_star += probs[p] * v_star
            for (y, _reward, lp), log_term in zip(rows, log_terms):
                opt = tree_sequence_logprob(solution.opt_logp, task, p, y)
                assert opt == pytest.approx(log_term - log_z, abs=1e-9)
                # The reference tree log-probs agree with the full forward too.
                assert tree_sequence_logprob(ref_logp, task, p, y) == pytest.approx(lp, abs=1e-9)
        assert solution.j_star == pytest.approx(j_star, abs=1e-9, rel=1e-9)


def test_solver_rejects_nonpositive_beta():
    task = make_task("Pattern", 2, 2)
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            solve(task, TaskBasePolicy(task), beta)


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("eos", [None, 0])
def test_advantage_is_beta_log_ratio(name, eos):
    task = make_task(name, 3, 3, eos)
    solution = solve(task, TaskBasePolicy(task), 0.7)
    for t in range(task.horizon):
        expected = 0.7 * (solution.opt_logp[t] - solution.ref_logp[t])
        assert torch.allclose(solution.advantages(t), expected, atol=1e-12, rtol=0)
        # pi* is a distribution at every state.
        assert torch.allclose(solution.opt_logp[t].exp().sum(-1), torch.ones(()).double(), atol=1e-12)


# --- telescoping --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("eos", [None, 2])
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_token_advantages_telescope(name, eos, beta):
    horizon = 4
    task = make_task(name, 4, horizon, eos)
    reference = gru(task, 7)
    solution = solve(task, reference, beta)
    policy = gru(task, 8).float()
    env = TokenVectorEnv(task, num_envs=64)
    batch = collect(policy, env, seed=3, generator=torch.Generator().manual_seed(3))
    mask = batch.response_mask
    if eos is not None:
        assert (mask.sum(1) < horizon).any()  # some responses stopped at EOS
    advantages = solution.token_advantages(batch.prompt_index, batch.response_ids, mask)
    assert (advantages[mask == 0] == 0).all()
    returns = (batch.rewards.double() * mask.double()).sum(1)
    v0 = solution.v[0][batch.prompt_index, 0]
    assert torch.allclose(advantages.sum(1), returns - v0, atol=1e-9, rtol=0)


# --- exact evaluation ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("eos", [None, 1])
@pytest.mark.parametrize("ref", ["base", "gru"])
def test_regret_equals_beta_kl_to_optimal(name, eos, ref):
    horizon = 1 if name == "Bandit" else 3
    task = make_task(name, 3, horizon, eos)
    reference = make_reference(ref, task)
    for beta in BETAS:
        solution = solve(task, reference, beta)
        regrets = []
        for seed in range(4):
            result = solution.evaluate(tree_logprobs(gru(task, 100 + seed), task))
            assert result["regret"] >= -1e-12
            assert result["kl_ref"] >= -1e-12 and result["kl_to_optimal"] >= -1e-12
            assert result["objective"] == pytest.approx(result["true_reward"] - beta * result["kl_ref"], abs=1e-12)
            assert result["regret"] == pytest.approx(beta * result["kl_to_optimal"], rel=1e-9, abs=1e-12)
            regrets.append(result["regret"])
        assert max(regrets) > 1e-4  # random GRUs are far from optimal: the identity is not 0 == 0
        # The reference itself: KL to the reference is 0, so J = E_ref[R].
        result = solution.evaluate(solution.ref_logp)
        assert abs(result["kl_ref"]) < 1e-12
        assert result["regret"] == pytest.approx(beta * result["kl_to_optimal"], rel=1e-9, abs=1e-12)
        # The optimum itself, exactly and through the OptimalPolicy wrapper (float32 logits).
        exact = solution.evaluate(solution.opt_logp)
        assert abs(exact["regret"]) < 1e-10 and abs(exact["kl_to_optimal"]) < 1e-10
        assert exact["objective"] == pytest.approx(solution.j_star, abs=1e-10)
        wrapped = solution.evaluate(tree_logprobs(solution.policy(), task))
        assert abs(wrapped["regret"]) < 1e-6 and abs(wrapped["kl_to_optimal"]) < 1e-6


@pytest.mark.parametrize(
    "task",
    [
        make_task("Pattern", 3, 3),
        make_task("Forbidden", 3, 3, eos=1),
        make_task("SumMod", 2, 4, eos=0),
        LengthTask(vocab_size=3, horizon=4, eos_token=1),
    ],
    ids=["Pattern-no-eos", "Forbidden-eos", "SumMod-eos", "Length-eos"],
)
def test_expected_lengths_match_brute_force(task):
    """``response_length`` and ``optimal_length``: ``E[|y|]`` (EOS counted) under the policy
    and under pi*, against the enumeration of every complete response."""
    reference, policy = gru(task, 1234), gru(task, 77)
    solution = solve(task, reference, 0.8)
    responses = complete_responses(task)
    n_prompts = task.prompts.shape[0]
    result = solution.evaluate(tree_logprobs(policy, task))
    own = opt = 0.0
    for p in range(n_prompts):
        probs = [math.exp(sequence_logprob(policy, task, p, y)) for y in responses]
        stars = [math.exp(tree_sequence_logprob(solution.opt_logp, task, p, y)) for y in responses]
        assert math.fsum(probs) == pytest.approx(1.0, abs=1e-12) and math.fsum(stars) == pytest.approx(1.0, abs=1e-12)
        own += math.fsum(q * len(y) for q, y in zip(probs, responses)) / n_prompts
        opt += math.fsum(q * len(y) for q, y in zip(stars, responses)) / n_prompts
    assert result["response_length"] == pytest.approx(own, abs=1e-10)
    assert result["optimal_length"] == pytest.approx(opt, abs=1e-10)
    assert solution.expected_length(solution.opt_logp) == result["optimal_length"]
    assert solution.evaluate(solution.opt_logp)["response_length"] == pytest.approx(opt, abs=1e-10)
    if task.eos_token is None:  # every response is horizon tokens long
        assert own == pytest.approx(task.horizon, abs=1e-12) and opt == pytest.approx(task.horizon, abs=1e-12)
    else:  # the lengths differ, so the check is not the trivial one
        assert len({len(y) for y in responses}) == task.horizon and abs(own - opt) > 1e-3


def test_length_task_optimum_follows_each_prompts_target():
    """Length's pi* moves each prompt's length toward its own target: shorter for the
    shortest target, longer for the longest (vs. pi_ref), so pi*'s length depends on the prompt."""
    task = LengthTask(vocab_size=6, horizon=5, seed=0)
    solution = solve(task, TaskBasePolicy(task), 1.0)

    def per_prompt(logp):
        reach, length = torch.ones(task.prompts.shape[0], 1, dtype=torch.float64), 0
        for t, lp in enumerate(logp):
            length = length + reach.sum(1)
            weight = reach[..., None] * lp.exp()
            reach = (weight * ~task.ending_actions(t)).reshape(weight.shape[0], -1)
        return length

    ref, opt = per_prompt(solution.ref_logp), per_prompt(solution.opt_logp)
    shortest, longest = int(task.target.argmin()), int(task.target.argmax())
    assert opt[shortest] < ref[shortest] - 0.3 and opt[longest] > ref[longest] + 0.3
    assert float(opt.mean()) == pytest.approx(solution.expected_length(solution.opt_logp), abs=1e-12)


def test_optimal_policy_beats_every_random_policy():
    task = make_task("SumMod", 3, 3, eos=2)
    reference = gru(task, 0)
    solution = solve(task, reference, 1.0)
    for seed in range(6):
        result = solution.evaluate(tree_logprobs(gru(task, 50 + seed), task))
        assert result["objective"] < solution.j_star


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("eos", [None, 0])
def test_exact_evaluation_matches_monte_carlo(name, eos):
    horizon = 1 if name == "Bandit" else 3
    task = make_task(name, 3, horizon, eos)
    reference = gru(task, 11).float()
    policy = gru(task, 12).float()
    solution = solve(task, reference, 1.0)
    exact = solution.evaluate(tree_logprobs(policy, task))
    env = TokenVectorEnv(task, num_envs=4000)
    batch = collect(policy, env, seed=0, generator=torch.Generator().manual_seed(0))
    rewards = (batch.rewards.double() * batch.response_mask.double()).sum(1)
    with torch.no_grad():
        log_ratio = (token_logprobs(policy, batch) - token_logprobs(reference, batch)).double().sum(1)
    for samples, key in [(rewards, "true_reward"), (log_ratio, "kl_ref")]:
        se = float(samples.std()) / math.sqrt(samples.numel())
        assert se > 0
        assert abs(float(samples.mean()) - exact[key]) < 4 * se, (key, float(samples.mean()), exact[key], se)


def test_generate_samples_follow_tree_probabilities():
    """Sampled first tokens match the tree's first-step distribution (chi-square-ish, 4 sigma)."""
    task = make_task("Pattern", 3, 2, eos=None)
    policy = gru(task, 5).float()
    first = tree_logprobs(policy, task)[0][:, 0].exp()  # [P, V]
    n = 3000
    for p in range(task.prompts.shape[0]):
        ids = task.prompts[p].expand(n, -1)
        response, mask = generate(policy, ids, task.horizon, None, torch.Generator().manual_seed(p))
        assert (mask == 1).all()
        freq = torch.bincount(response[:, 0], minlength=3).double() / n
        se = (first[p] * (1 - first[p]) / n).sqrt()
        assert ((freq - first[p]).abs() < 4 * se + 1e-9).all()


# --- bandit closed form -------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("ref", ["base", "gru"])
def test_bandit_closed_form(beta, ref):
    task = make_task("Bandit", 5, 1, reward_scale=2.0)
    reference = make_reference(ref, task)
    solution = solve(task, reference, beta)
    with torch.no_grad():
        logits = torch.stack([reference(task.prompts[p][None])[0, -1] for p in range(task.prompts.shape[0])])
    ref_logp = torch.log_softmax(logits.double(), -1)
    r = task.table.double()
    expected_pi = torch.softmax(ref_logp + r / beta, -1)
    expected_v = beta * torch.logsumexp(ref_logp + r / beta, -1)
    assert torch.allclose(solution.opt_logp[0][:, 0].exp(), expected_pi, atol=1e-12, rtol=0)
    assert torch.allclose(solution.v[0][:, 0], expected_v, atol=1e-12, rtol=0)
    assert torch.allclose(solution.q[0][:, 0], r, atol=1e-12, rtol=0)
    assert solution.j_star == pytest.approx(float(expected_v.mean()), abs=1e-12)
    # As beta -> 0 the optimum concentrates on the best arm; large beta stays near pi_ref.
    sharp = solve(task, reference, 1e-3)
    assert (sharp.opt_logp[0][:, 0].argmax(-1) == r.argmax(-1)).all()
    flat = solve(task, reference, 1e3)
    assert torch.allclose(flat.opt_logp[0][:, 0].exp(), ref_logp.exp(), atol=1e-2)


# --- tree log-probs vs full forward ---------------------------------------------------------


def toy_policies(task):
    torch.manual_seed(0)
    tabular = TabularPolicy(task.input_vocab_size, task.vocab_size, table_size=4096)
    torch.nn.init.normal_(tabular.table.weight)
    return {
        "gru": GRUPolicy(task.input_vocab_size, task.vocab_size, hidden=8),
        "gru2": GRUPolicy(task.input_vocab_size, task.vocab_size, hidden=8, layers=2),
        "mlp": MLPPolicy(task.input_vocab_size, task.vocab_size, window=4, hidden=16),
        "transformer": TransformerPolicy(task.input_vocab_size, task.vocab_size, d_model=16, layers=1, heads=2),
        "tabular": tabular,
        "base": TaskBasePolicy(task),
    }


# MLPPolicy builds float32 one-hot inputs, so it runs in float32 only.
@pytest.mark.parametrize(
    "kind, dtype",
    [(k, torch.float32) for k in ["gru", "gru2", "mlp", "transformer", "tabular", "base"]]
    + [(k, torch.float64) for k in ["gru", "gru2", "transformer", "tabular", "base"]],
)
@pytest.mark.parametrize("guide", [False, True])
def test_tree_logprobs_equal_full_forward(kind, guide, dtype):
    task = make_task("SumMod", 3, 3, eos=1, prompt_len=2)
    policy = toy_policies(task)[kind].to(dtype)
    policy.train()
    prefix_ids = torch.tensor([[task.guide_token]]) if guide else None
    tree = tree_logprobs(policy, task, prefix_ids=prefix_ids)
    assert policy.training  # restored
    assert len(tree) == task.horizon
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    prompts = task.prompts if not guide else torch.cat([prefix_ids.expand(task.prompts.shape[0], -1), task.prompts], 1)
    n_prompts, vocab = prompts.shape[0], task.vocab_size
    policy.eval()
    with torch.no_grad():
        for t in range(task.horizon):
            prefixes = all_prefixes(vocab, t)
            assert tree[t].shape == (n_prompts, vocab**t, vocab)
            assert tree[t].dtype == torch.float64
            for p in range(n_prompts):
                ids = torch.cat([prompts[p].expand(prefixes.shape[0], -1), prefixes], 1)
                direct = torch.log_softmax(policy(ids)[:, -1].double(), -1)
                assert torch.allclose(tree[t][p], direct, atol=tol, rtol=0), (kind, t, p)


def test_tree_logprobs_respects_guide_prefix():
    """The guide token must actually reach the policy (else the guide estimator is a no-op)."""
    task = make_task("Pattern", 3, 2)
    policy = gru(task, 3)
    plain = tree_logprobs(policy, task)
    guided = tree_logprobs(policy, task, prefix_ids=torch.tensor([[task.guide_token]]))
    assert not torch.allclose(plain[0], guided[0])


def test_all_prefixes_and_prefix_index_are_inverse():
    for vocab, depth in [(2, 0), (2, 3), (3, 2), (4, 3)]:
        prefixes = all_prefixes(vocab, depth)
        assert prefixes.shape == (vocab**depth, depth)
        assert (prefix_index(prefixes, vocab) == torch.arange(vocab**depth)).all()
        assert len({tuple(r) for r in prefixes.tolist()}) == vocab**depth
