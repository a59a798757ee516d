"""The token MDP as Gymnasium environments (METHOD.md section 1)."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmdp import InvalidActionError, TokenMDPError
from tokenmdp.mdp.env import TokenMDPEnv, TokenVectorEnv
from tokenmdp.plugin.registry import Registry, plugin_manager

ENV_IDS = ["tokenmdp/Pattern-v0", "tokenmdp/SumMod-v0", "tokenmdp/Forbidden-v0", "tokenmdp/Bandit-v0"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    Registry(plugin_manager()).register_envs()
    yield


def make(env_id: str, **kwargs) -> TokenMDPEnv:
    env = gymnasium.make(env_id, **kwargs).unwrapped
    assert isinstance(env, TokenMDPEnv)
    return env


def np_obs(obs: dict) -> dict:
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in obs.items()}


# --- Gymnasium API ------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(vocab_size=3, horizon=2),
        dict(vocab_size=4, horizon=3, prompt_len=2),
        dict(vocab_size=3, horizon=3, eos_token=0),
    ],
)
def test_check_env_passes(env_id, kwargs):
    check_env(make(env_id, **kwargs), skip_render_check=True)


def test_registered_ids_are_exactly_the_toy_envs():
    ids = {i for i in gymnasium.registry if i.startswith("tokenmdp/")}
    assert set(ENV_IDS) <= ids


def test_render_ansi_shows_prompt_and_response():
    env = gymnasium.make("tokenmdp/Pattern-v0", vocab_size=3, horizon=2, render_mode="ansi").unwrapped
    env.reset(seed=0, options={"prompt_index": 1})
    env.step(2)
    text = env.render()
    assert str(env.task.prompts[1].tolist()) in text and "[2]" in text


# --- episode semantics ----------------------------------------------------------------------


def run_episode(env: TokenMDPEnv, actions_rng: np.random.Generator, prompt_index: int):
    """Step one episode with random actions, checking every transition against the task."""
    task = env.task
    obs, info = env.reset(options={"prompt_index": prompt_index})
    assert info["prompt_index"] == prompt_index
    assert obs["length"] == 0 and (obs["response"] == task.vocab_size).all()
    assert (obs["prompt"] == task.prompts[prompt_index].numpy()).all()
    response: list[int] = []
    total = 0.0
    while True:
        a = int(actions_rng.integers(task.vocab_size))
        expected = task.next_token_rewards(torch.tensor([prompt_index]), torch.tensor([response]).view(1, -1))
        obs, reward, terminated, truncated, info = env.step(a)
        assert reward == pytest.approx(float(expected[0, a]), abs=0)
        response.append(a)
        total += reward
        assert obs["length"] == len(response)
        assert list(obs["response"][: len(response)]) == response
        assert (obs["response"][len(response) :] == task.vocab_size).all()
        is_eos = task.eos_token is not None and a == task.eos_token
        at_horizon = len(response) == task.horizon
        # a bandit's last pull is the MDP's own end; elsewhere the horizon is a time limit
        assert terminated == (is_eos or (at_horizon and task.horizon_terminates))
        assert truncated == (not terminated and at_horizon)
        assert not (terminated and truncated)
        if terminated or truncated:
            return response, total
        assert len(response) < task.horizon


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("eos", [None, 1])
def test_episode_semantics(env_id, eos):
    horizon = 1 if env_id.endswith("Bandit-v0") else 4
    env = make(env_id, vocab_size=3, horizon=horizon, eos_token=eos)
    rng = np.random.default_rng(0)
    lengths = set()
    saw_eos = False
    for episode in range(30):
        response, _ = run_episode(env, rng, episode % env.task.prompts.shape[0])
        lengths.add(len(response))
        saw_eos |= eos is not None and response[-1] == eos
        with pytest.raises(TokenMDPError, match="reset"):
            env.step(0)
    if eos is None:
        assert lengths == {horizon}
    else:
        assert saw_eos
        if horizon > 1:
            assert len(lengths) > 1  # some episodes ended early on EOS


def test_eos_on_last_step_is_terminated_not_truncated():
    env = make("tokenmdp/SumMod-v0", vocab_size=3, horizon=2, eos_token=2)
    env.reset(seed=0)
    assert env.step(0)[2:4] == (False, False)
    assert env.step(2)[2:4] == (True, False)
    env.reset(seed=0)
    env.step(0)
    assert env.step(1)[2:4] == (False, True)


def test_sum_mod_pays_only_at_the_end():
    env = make("tokenmdp/SumMod-v0", vocab_size=4, horizon=3)
    task = env.task
    for p in range(task.prompts.shape[0]):
        env.reset(options={"prompt_index": p})
        rewards = [env.step(a)[1] for a in (1, 2, 3)]
        assert rewards[:2] == [0.0, 0.0]
        assert rewards[2] == (1.0 if (1 + 2 + 3) % task.modulus == int(task.goal[p]) else 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(vocab_size=3, horizon=2), dict(vocab_size=4, horizon=3, prompt_len=2), dict(vocab_size=3, eos_token=2)],
)
def test_length_env_passes_check_env(kwargs):
    check_env(make("tokenmdp/Length-v0", **kwargs), skip_render_check=True)


def test_length_pays_only_an_eos_at_the_prompts_target_length():
    env = make("tokenmdp/Length-v0", vocab_size=4, horizon=5, eos_token=3)
    task = env.task
    # 4 prompts, horizon 5: the targets spread over 1..5, one per prompt, in a seeded order
    assert sorted(task.target.tolist()) == [1, 2, 4, 5]
    for p in range(task.prompts.shape[0]):
        target = int(task.target[p])
        for length in range(1, task.horizon + 1):
            env.reset(options={"prompt_index": p})
            rewards = [env.step(0)[1] for _ in range(length - 1)]
            _, reward, terminated, truncated, _ = env.step(3)  # EOS as the last token
            assert rewards == [0.0] * (length - 1) and terminated and not truncated
            assert reward == (3.0 if length == target else 0.0)
        env.reset(options={"prompt_index": p})
        rewards = [env.step(1)[1] for _ in range(task.horizon)]  # cut at the horizon: never paid
        assert rewards == [0.0] * task.horizon
    with pytest.raises(ValueError, match="eos_token"):
        make("tokenmdp/Length-v0", eos_token=None)


def test_step_before_reset_raises():
    env = make("tokenmdp/Pattern-v0", vocab_size=3, horizon=2)
    with pytest.raises(TokenMDPError):
        env.step(0)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_same_seed_same_prompt_sequence(env_id):
    def prompts(seed):
        env = make(env_id, vocab_size=6, horizon=2)
        first = env.reset(seed=seed)[1]["prompt_index"]
        return [first] + [env.reset()[1]["prompt_index"] for _ in range(30)]

    a, b, c = prompts(123), prompts(123), prompts(124)
    assert a == b
    assert a != c  # 4 prompts, 31 draws: equal by chance with probability 4**-31
    assert len(set(a)) > 1
    env = make(env_id, vocab_size=6, horizon=2)
    again = env.reset(seed=123)[1]["prompt_index"]
    assert [again] + [env.reset()[1]["prompt_index"] for _ in range(30)] == a


def test_prompt_index_option_is_validated():
    env = make("tokenmdp/Pattern-v0", vocab_size=3, horizon=2)
    with pytest.raises(TokenMDPError, match="prompt_index"):
        env.reset(options={"prompt_index": 3})
    with pytest.raises(TokenMDPError, match="prompt_index"):
        env.reset(options={"prompt_index": -1})


# --- invalid actions ----------------------------------------------------------------------


@pytest.mark.parametrize("action", [-1, 4, 2.5, "a", "1", None, float("nan"), float("inf"), [1], np.array([1, 2])])
def test_invalid_action_raises(action):
    env = make("tokenmdp/Forbidden-v0", vocab_size=4, horizon=3)
    env.reset(seed=0)
    with pytest.raises(InvalidActionError, match=r"0\.\.3"):
        env.step(action)
    # The episode is untouched: a valid action still works from the same state.
    obs, *_ = env.step(3)
    assert obs["length"] == 1


@pytest.mark.parametrize("action", [0, 3, np.int64(2), torch.tensor(1), 2.0])
def test_valid_action_types_accepted(action):
    env = make("tokenmdp/Forbidden-v0", vocab_size=4, horizon=3)
    env.reset(seed=0)
    obs, *_ = env.step(action)
    assert obs["response"][0] == int(action)


def test_invalid_action_error_is_a_value_error_and_tokenmdp_error():
    assert issubclass(InvalidActionError, ValueError)
    assert issubclass(InvalidActionError, TokenMDPError)


# --- bad options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(vocab_size=1, horizon=2), "vocab_size"),
        (dict(vocab_size=0, horizon=2), "vocab_size"),
        (dict(vocab_size=2.5, horizon=2), "vocab_size"),
        (dict(vocab_size=3, horizon=0), "horizon"),
        (dict(vocab_size=3, horizon=-2), "horizon"),
        (dict(vocab_size=3, horizon=1.5), "horizon"),
        (dict(vocab_size=3, horizon=2, eos_token=3), "eos_token"),
        (dict(vocab_size=3, horizon=2, eos_token=-1), "eos_token"),
        (dict(vocab_size=3, horizon=2, eos_token=1.5), "eos_token"),
        (dict(vocab_size=3, horizon=2, prompt_len=0), "prompt_len"),
        (dict(vocab_size=3, horizon=2, num_prompts=10), "num_prompts"),
    ],
)
@pytest.mark.parametrize("env_id", ["tokenmdp/Pattern-v0", "tokenmdp/SumMod-v0"])
def test_bad_env_options_raise_clear_error(env_id, kwargs, field):
    with pytest.raises((TokenMDPError, ValueError), match=field):
        gymnasium.make(env_id, **kwargs)
    with pytest.raises((TokenMDPError, ValueError), match=field):
        gymnasium.make_vec(env_id, num_envs=2, **kwargs)


@pytest.mark.parametrize(
    "env_id, kwargs, field",
    [
        ("tokenmdp/SumMod-v0", dict(modulus=1), "modulus"),
        ("tokenmdp/Forbidden-v0", dict(num_forbidden=3), "num_forbidden"),
        ("tokenmdp/Forbidden-v0", dict(num_forbidden=0), "num_forbidden"),
    ],
)
def test_bad_task_options_raise_clear_error(env_id, kwargs, field):
    with pytest.raises((TokenMDPError, ValueError), match=field):
        gymnasium.make(env_id, vocab_size=3, horizon=2, **kwargs)


# --- vector env ---------------------------------------------------------------------------


def task_kwargs(env_id: str, vocab_size: int) -> dict:
    """Forbidden's default ``num_forbidden=2`` needs ``vocab_size >= 3``."""
    return dict(num_forbidden=1) if env_id.endswith("Forbidden-v0") and vocab_size == 2 else {}


def make_vec(env_id: str, num_envs: int = 8, **kwargs) -> TokenVectorEnv:
    env = gymnasium.make_vec(env_id, num_envs=num_envs, **kwargs)
    assert isinstance(env, TokenVectorEnv)
    return env


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("eos", [None, 0])
def test_vector_env_matches_single_envs(env_id, eos):
    horizon = 1 if env_id.endswith("Bandit-v0") else 3
    kwargs = dict(vocab_size=3, horizon=horizon, eos_token=eos)
    n = 8
    vec = make_vec(env_id, n, **kwargs)
    singles = [make(env_id, **kwargs) for _ in range(n)]
    num_prompts = vec.task.prompts.shape[0]
    prompts = [i % num_prompts for i in range(n)]
    obs, info = vec.reset(seed=0, options={"prompt_index": prompts})
    assert info["prompt_index"].tolist() == prompts
    assert vec.observation_space.contains(np_obs(obs))
    for env, p in zip(singles, prompts):
        env.reset(options={"prompt_index": p})
    rng = np.random.default_rng(1)
    finished_at = [None] * n
    compared = 0
    for t in range(horizon + 1):
        actions = rng.integers(0, 3, size=n)
        obs, rewards, terminated, truncated, _ = vec.step(actions)
        assert vec.observation_space.contains(np_obs(obs))
        assert rewards.shape == terminated.shape == truncated.shape == (n,)
        for i, env in enumerate(singles):
            if finished_at[i] is None:
                o, r, term, trunc, _ = env.step(int(actions[i]))
                assert float(rewards[i]) == r
                assert (bool(terminated[i]), bool(truncated[i])) == (term, trunc)
                assert (obs["response"][i].numpy() == o["response"]).all()
                assert int(obs["length"][i]) == o["length"]
                compared += 1
                if term or trunc:
                    finished_at[i] = t
            elif finished_at[i] == t - 1:
                # NEXT_STEP autoreset: this step restarts the env and ignores its action.
                assert float(rewards[i]) == 0.0
                assert not bool(terminated[i]) and not bool(truncated[i])
                assert int(obs["length"][i]) == 0
                assert (obs["response"][i] == vec.task.vocab_size).all()
    assert all(f is not None for f in finished_at)
    assert compared >= n


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_vector_env_reward_free(env_id):
    kwargs = dict(vocab_size=3, horizon=2 if not env_id.endswith("Bandit-v0") else 1, eos_token=1)
    free = make_vec(env_id, 8, compute_rewards=False, **kwargs)
    paid = make_vec(env_id, 8, **kwargs)
    assert free.compute_rewards is False
    free.reset(seed=3)
    paid.reset(seed=3)
    assert (free.prompt_index == paid.prompt_index).all()
    rng = np.random.default_rng(0)
    nonzero = False
    calls = free.task.reward_calls
    for _ in range(6):
        actions = rng.integers(0, 3, size=8)
        _, r_free, te_free, tr_free, _ = free.step(actions)
        _, r_paid, te_paid, tr_paid, _ = paid.step(actions)
        assert (r_free == 0).all()
        nonzero |= bool((r_paid != 0).any())
        assert (te_free == te_paid).all() and (tr_free == tr_paid).all()
    assert free.task.reward_calls == calls == 0
    assert paid.task.reward_calls > 0
    assert nonzero  # the paid env does see rewards, so the zeros above are meaningful


def test_vector_env_next_step_autoreset():
    vec = make_vec("tokenmdp/Pattern-v0", 4, vocab_size=3, horizon=2)
    vec.reset(seed=0)
    for step in range(2):
        obs, _, terminated, truncated, _ = vec.step([1, 1, 1, 1])
        assert not terminated.any()
        assert truncated.all() == (step == 1)
    assert (obs["length"] == 2).all() and (obs["response"] == 1).all()
    # Next step: every env restarts, ignoring the action.
    obs, rewards, terminated, truncated, _ = vec.step([2, 2, 2, 2])
    assert (rewards == 0).all() and not terminated.any() and not truncated.any()
    assert (obs["length"] == 0).all() and (obs["response"] == 3).all()
    # And then the new episode runs normally.
    obs, _, terminated, truncated, _ = vec.step([0, 1, 2, 0])
    assert (obs["length"] == 1).all() and obs["response"][:, 0].tolist() == [0, 1, 2, 0]
    assert not truncated.any()


def test_vector_env_autoreset_mixed_lengths_with_eos():
    vec = make_vec("tokenmdp/SumMod-v0", 3, vocab_size=3, horizon=3, eos_token=0)
    vec.reset(seed=0)
    _, _, terminated, truncated, _ = vec.step([0, 1, 2])  # row 0 emits EOS
    assert terminated.tolist() == [True, False, False] and not truncated.any()
    obs, _, terminated, truncated, _ = vec.step([1, 0, 1])  # row 0 restarts; row 1 emits EOS
    assert obs["length"].tolist() == [0, 2, 2]
    assert terminated.tolist() == [False, True, False] and not truncated.any()
    obs, _, terminated, truncated, _ = vec.step([2, 2, 1])  # row 1 restarts; row 2 truncates
    assert obs["length"].tolist() == [1, 0, 3]
    assert terminated.tolist() == [False, False, False] and truncated.tolist() == [False, False, True]


def test_vector_env_disabled_autoreset_keeps_finished_envs_done():
    vec = make_vec("tokenmdp/Pattern-v0", 2, vocab_size=3, horizon=1, autoreset_mode="Disabled")
    vec.reset(seed=0)
    _, _, _, truncated, _ = vec.step([0, 1])
    assert truncated.all()
    obs, rewards, terminated, truncated, _ = vec.step([0, 1])
    assert (rewards == 0).all() and not terminated.any() and not truncated.any()
    assert (obs["length"] == 1).all()
    vec.reset(options={"reset_mask": [True, False]})
    assert vec.length.tolist() == [0, 1]


def test_vector_env_same_seed_same_prompts():
    a = make_vec("tokenmdp/Pattern-v0", 16, vocab_size=6, horizon=2)
    b = make_vec("tokenmdp/Pattern-v0", 16, vocab_size=6, horizon=2)
    pa = a.reset(seed=5)[1]["prompt_index"]
    pb = b.reset(seed=5)[1]["prompt_index"]
    assert (pa == pb).all()
    assert (a.reset(seed=6)[1]["prompt_index"] != pa).any()


@pytest.mark.parametrize(
    "actions",
    [
        [-1, 0, 0, 0],
        [0, 0, 0, 3],
        [0.5, 0, 0, 0],
        [2.5] * 4,
        [0, 1, 2],
        [[0, 1], [0, 1]],
        ["a"] * 4,
        "abcd",
        None,
        np.array([0, 1, 2, 3]),
        torch.tensor([0, 1, 2, 5]),
        torch.zeros(4),
    ],
)
def test_vector_env_invalid_actions(actions):
    vec = make_vec("tokenmdp/Pattern-v0", 4, vocab_size=3, horizon=2)
    vec.reset(seed=0)
    with pytest.raises(InvalidActionError, match=r"0\.\.2"):
        vec.step(actions)
    assert (vec.length == 0).all()  # nothing was applied


def test_vector_env_rejects_same_step_autoreset():
    with pytest.raises(TokenMDPError, match="autoreset"):
        make_vec("tokenmdp/Pattern-v0", 2, vocab_size=3, horizon=2, autoreset_mode="SameStep")


def test_vector_env_prompt_index_option_is_validated():
    vec = make_vec("tokenmdp/Pattern-v0", 2, vocab_size=3, horizon=2)
    with pytest.raises(TokenMDPError, match="prompt_index"):
        vec.reset(options={"prompt_index": [0, 3]})


# --- property tests -----------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    env_id=st.sampled_from(ENV_IDS),
    vocab_size=st.integers(2, 6),
    horizon=st.integers(1, 4),
    prompt_len=st.integers(1, 3),
    use_eos=st.booleans(),
    data=st.data(),
)
def test_random_action_sequences_never_crash(env_id, vocab_size, horizon, prompt_len, use_eos, data):
    eos = data.draw(st.integers(0, vocab_size - 1)) if use_eos else None
    env = gymnasium.make(
        env_id,
        vocab_size=vocab_size,
        horizon=horizon,
        prompt_len=prompt_len,
        eos_token=eos,
        **task_kwargs(env_id, vocab_size),
    )
    space = env.observation_space
    obs, _ = env.reset(seed=data.draw(st.integers(0, 2**31 - 1)))
    assert space.contains(obs)
    done = False
    actions = data.draw(
        st.lists(
            st.one_of(st.integers(-2, vocab_size + 1), st.sampled_from([0.5, "x", None])), max_size=3 * horizon + 2
        )
    )
    for a in actions:
        valid = isinstance(a, int) and 0 <= a < vocab_size
        try:
            obs, reward, terminated, truncated, _ = env.step(a)
        except InvalidActionError:
            assert not valid
            continue
        except TokenMDPError:
            assert done
            obs, _ = env.reset()
            assert space.contains(obs)
            done = False
            continue
        assert valid and not done
        assert space.contains(obs)
        assert np.isfinite(reward)
        done = terminated or truncated


@settings(max_examples=25, deadline=None)
@given(
    env_id=st.sampled_from(ENV_IDS),
    vocab_size=st.integers(2, 6),
    horizon=st.integers(1, 4),
    prompt_len=st.integers(1, 3),
    use_eos=st.booleans(),
    data=st.data(),
)
def test_vector_env_random_actions_stay_in_space(env_id, vocab_size, horizon, prompt_len, use_eos, data):
    eos = data.draw(st.integers(0, vocab_size - 1)) if use_eos else None
    vec = make_vec(
        env_id,
        3,
        vocab_size=vocab_size,
        horizon=horizon,
        prompt_len=prompt_len,
        eos_token=eos,
        **task_kwargs(env_id, vocab_size),
    )
    obs, _ = vec.reset(seed=0)
    assert vec.observation_space.contains(np_obs(obs))
    steps = data.draw(st.lists(st.lists(st.integers(-1, vocab_size), min_size=3, max_size=3), max_size=3 * horizon))
    for actions in steps:
        valid = all(0 <= a < vocab_size for a in actions)
        try:
            obs, rewards, terminated, truncated, _ = vec.step(actions)
        except InvalidActionError:
            assert not valid
            continue
        assert valid
        assert vec.observation_space.contains(np_obs(obs))
        assert torch.isfinite(rewards).all()
        assert not (terminated & truncated).any()


def test_a_tasks_capabilities_are_attributes_not_probes():
    """Every task answers the same questions: a toy task has no tokenizer (its guides are
    ids), has a reward, and sums whole responses' rewards from its per-token tables."""
    from tokenmdp_envs import PatternTask

    task = PatternTask(vocab_size=4, horizon=3)
    assert task.exact and task.tokenizer is None and task.has_reward and task.guide_token == 5
    with pytest.raises(TokenMDPError, match="has no tokenizer, so a guide cannot be text; give token ids"):
        task.encode_guide("be kind")
    response = torch.tensor([[task.target[0, 0], 0, 0], [0, 0, 0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = task.sequence_rewards(torch.tensor([0, 1]), response, mask)
    assert rewards.dtype == torch.float64
    assert rewards[0] == 1.0  # the one real token matches prompt 0's pattern
    assert rewards[1] == float((task.target[1] == 0).sum())


@settings(max_examples=60, deadline=None)
@given(
    env_id=st.sampled_from(ENV_IDS),
    vocab_size=st.integers(2, 6),
    horizon=st.integers(1, 5),
    use_eos=st.booleans(),
    paid=st.booleans(),
    data=st.data(),
)
def test_play_in_one_go_leaves_what_step_by_step_leaves(env_id, vocab_size, horizon, use_eos, paid, data):
    """``play`` on a reward-free or pay-on-finish env without autoreset takes every column
    at once: the same rewards, responses, lengths and done flags as stepping column by
    column, also with rows that were not reset, columns past the horizon and EOS anywhere;
    an out-of-range action still raises the step's error."""
    if env_id.endswith("Bandit-v0"):
        horizon = 1
    eos = data.draw(st.integers(0, vocab_size - 1)) if use_eos else None
    columns = data.draw(st.integers(1, horizon + 2))
    actions = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.integers(0, vocab_size - 1), min_size=columns, max_size=columns), min_size=4, max_size=4
            )
        )
    )
    if data.draw(st.booleans()):
        actions[data.draw(st.integers(0, 3)), data.draw(st.integers(0, columns - 1))] = vocab_size  # out of range
    reset_rows = data.draw(st.lists(st.booleans(), min_size=4, max_size=4))
    envs, results = [], []
    for at_once in (True, False):
        env = make_vec(
            env_id,
            4,
            vocab_size=vocab_size,
            horizon=horizon,
            eos_token=eos,
            compute_rewards=paid,
            autoreset_mode="Disabled",
            **task_kwargs(env_id, vocab_size),
        )
        if not at_once:
            env._play_at_once = lambda actions: False
        env.reset(seed=0, options={"reset_mask": reset_rows})
        try:
            results.append(env.play(actions.clone()))
        except InvalidActionError as error:
            results.append(str(error))
        envs.append(env)
    fast, slow = envs
    if isinstance(results[1], str):
        assert results[0] == results[1]
        return
    assert torch.equal(results[0], results[1])
    for name in ("response", "length", "done", "prompt_index"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name


def test_play_calls_a_subclass_step():
    class Counting(TokenVectorEnv):
        calls = 0

        def step(self, actions):
            Counting.calls += 1
            return super().step(actions)

    vec = make_vec("tokenmdp/Pattern-v0", 2, vocab_size=3, horizon=3, compute_rewards=False, autoreset_mode="Disabled")
    env = Counting(vec.task, num_envs=2, compute_rewards=False, autoreset_mode="Disabled")
    env.reset(seed=0)
    env.play(torch.tensor([[0, 1, 2], [2, 1, 0]]))
    assert Counting.calls == 3 and env.length.tolist() == [3, 3]
    plain = make_vec(
        "tokenmdp/Pattern-v0", 2, vocab_size=3, horizon=3, compute_rewards=False, autoreset_mode="Disabled"
    )
    plain.reset(seed=0)
    assert plain._play_at_once(torch.tensor([[0, 1, 2], [2, 1, 0]]))  # the plain env takes them at once
