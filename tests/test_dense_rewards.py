"""Dense, span and step rewards (docs/text.md, "Dense and step rewards"): where each form's
values land, the one-line errors, and a dense Python reward on a toy env training exactly as
the env's own per-token reward."""

from __future__ import annotations

import json

import pytest
import torch
from test_real_lm import text_files, text_run  # noqa: F401 (fixture)

from tokenmdp.config import load_config
from tokenmdp.errors import ConfigError, RewardError
from tokenmdp.text.reward_tokens import step_ends, token_at, token_char_ends
from tokenmdp.text.rewards import RewardSet
from tokenmdp.training.trainer import Trainer

# --- a dense reward on Pattern, written as a Python reward ------------------------------------
PATTERN = ["env.vocab_size=4", "env.horizon=3", "env.eos_token=3", "env.seed=5"]


def _pattern_task():
    from tokenmdp_envs import PatternTask

    return PatternTask(vocab_size=4, horizon=3, eos_token=3, seed=5)


def pattern_per_token(prompts, completion_ids, **kwargs):
    """Pattern's own table, as a TRL-form reward: 1 on each token that matches the target."""
    task = _pattern_task()
    rows = {tuple(task.prompts[i, 1:].tolist()): i for i in range(task.prompts.shape[0])}
    out = []
    for prompt, ids in zip(prompts, completion_ids):
        target = task.target[rows[tuple(prompt)]].tolist()
        out.append([1.0 if a == target[t] else 0.0 for t, a in enumerate(ids)])
    return out


def pattern_spans(prompt, completion):
    """The same reward as spans of the text "a b c" (pair form): each matching token's digit."""
    task = _pattern_task()
    rows = {" ".join(map(str, task.prompts[i, 1:].tolist())): i for i in range(task.prompts.shape[0])}
    target = task.target[rows[prompt]].tolist()
    spans, start = [], 0
    for t, word in enumerate(completion.split(" ")):
        if int(word) == target[t]:
            spans.append((start, start + len(word), 1.0))
        start += len(word) + 1
    return spans


def _train(tmp_path, name, *overrides):
    from helpers import TINY

    config = load_config(None, [*TINY, *PATTERN, "train.steps=3", f"run.dir={tmp_path / name}", *overrides])
    trainer = Trainer(config)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


TRAINING_KEYS = ("rollout/", "losses/", "policy/")


@pytest.mark.parametrize("reward", ["test_dense_rewards:pattern_per_token", "test_dense_rewards:pattern_spans"])
def test_a_dense_reward_on_pattern_trains_exactly_as_the_envs_own(tmp_path, reward):
    own, own_rows = _train(tmp_path, "own")
    dense, dense_rows = _train(tmp_path, "dense", f"env.reward={reward}")

    def steps(rows):
        return [{k: v for k, v in r.items() if k.startswith(TRAINING_KEYS)} for r in rows if "rollout/reward_mean" in r]

    assert len(steps(own_rows)) == 3 and steps(own_rows) == steps(dense_rows)
    assert any(r["rollout/reward_mean"] > 0 for r in steps(own_rows))
    for (name, p), (_, q) in zip(own.policy.state_dict().items(), dense.policy.state_dict().items()):
        assert torch.equal(p, q), name


def pattern_on_the_last_token(prompts, completion_ids, **kwargs):
    """Pattern's sum, paid as one sequence reward: same rewards, other credit."""
    return [sum(row) for row in pattern_per_token(prompts, completion_ids)]


def test_placement_matters_the_sum_on_the_last_token_trains_otherwise(tmp_path):
    """The control of the test above: the same totals paid at the end change the losses."""
    _, own_rows = _train(tmp_path, "own")
    _, last_rows = _train(tmp_path, "last", "env.reward=test_dense_rewards:pattern_on_the_last_token")
    own = [r for r in own_rows if "losses/policy" in r]
    last = [r for r in last_rows if "losses/policy" in r]
    assert own[0]["rollout/reward_mean"] == last[0]["rollout/reward_mean"]
    assert [r["losses/policy"] for r in own] != [r["losses/policy"] for r in last]


# --- offsets, spans and steps ---------------------------------------------------------------


def byte_decode(ids):
    """A byte-level tokenizer's decode: a lone byte of a multi-byte character shows as U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_each_character_belongs_to_the_token_that_completes_it():
    text = "aé b"
    ids = list(text.encode())  # a, 0xC3, 0xA9, ' ', b
    ends = token_char_ends(byte_decode, ids, text)
    assert ends == [1, 1, 2, 3, 4]
    assert token_at(ends, 2, 1) == 2  # "é" lands on its second byte, the token that completes it
    assert token_at(ends, 1, 0) == 0
    assert token_at(ends, 4, 2) == 4


def test_a_step_lands_on_its_own_last_word_when_the_delimiter_starts_the_next_token():
    # sentencepiece: "the", " cat", " sat"; the step "the " ends inside " cat"
    ends = [3, 7, 11]
    assert token_at(ends, 4, 0) == 0 and token_at(ends, 8, 4) == 1 and token_at(ends, 11, 8) == 2
    # a token covering the whole span: the token that holds its last character
    assert token_at([10], 4, 0) == 0


def test_step_ends():
    assert step_ends("a\nb\nc", "\n") == [2, 4, 5]
    assert step_ends("a\nb\n", "\n") == [2, 4]
    assert step_ends("abc", "\n") == [3]
    assert step_ends("", "\n") == []


CALLS: list = []


def per_token_index(completion_ids, **kwargs):
    """TRL form: token k of each completion earns k."""
    return [[float(k) for k in range(len(ids))] for ids in completion_ids]


def first_word_span(prompt, completion):
    """Pair form: 1 on the completion's first word, as a character span (a dict)."""
    return [{"start": 0, "end": len(completion.split(" ")[0]), "value": 1.0}]


def prefix_length(prompt, completion):
    """A step reward: each step prefix earns its length in characters."""
    CALLS.append(completion)
    return float(len(completion))


def words_in(prompts, completions, **kwargs):
    return [float(len(c.split())) for c in completions]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    from test_real_lm import CORPUS, HELD_OUT

    from tokenmdp.policies.hf import train_sentencepiece

    path = tmp_path_factory.mktemp("dense") / "spm.model"
    path.write_bytes(train_sentencepiece([*CORPUS, *HELD_OUT], vocab_size=48).serialized_model_proto())
    return path


def _text_task(spm, reward, **options):
    from tokenmdp.text import TextTask

    return TextTask(prompts=["the cat", "a dog"], tokenizer=str(spm), horizon=8, reward=reward, **options)


def _response(task, text, eos=True):
    ids = task.tokenizer.encode(text) + ([task.eos_token] if eos else [])
    return torch.tensor([ids]), torch.ones(1, len(ids))


def _rewards(task, text, eos=True):
    response, mask = _response(task, text, eos)
    return task.response_rewards(torch.tensor([0]), response, mask)[0].tolist()


def test_a_sequence_reward_lands_on_the_eos_as_before(spm):
    task = _text_task(spm, words_in)
    values = _rewards(task, "sat on a mat")
    assert values[-1] == 4.0 and not any(values[:-1])


def test_per_token_values_land_on_the_completion_tokens_and_add_to_a_sequence_reward(spm):
    task = _text_task(spm, [per_token_index, words_in], reward_weights=[2.0, 1.0])
    n = len(task.tokenizer.encode("sat on a mat"))
    values = _rewards(task, "sat on a mat")
    assert values == [2.0 * k for k in range(n)] + [4.0]  # EOS: the sequence reward only
    response, mask = _response(task, "sat on a mat")
    assert task.sequence_rewards(torch.tensor([0]), response, mask).item() == sum(values)


def test_a_span_lands_on_its_last_token(spm):
    task = _text_task(spm, first_word_span)
    ids = task.tokenizer.encode("park kind answer")
    values = _rewards(task, "park kind answer")
    ends = token_char_ends(task.tokenizer.decode, ids, task.tokenizer.decode(ids))
    expected = token_at(ends, len("park"), 0)
    assert values[expected] == 1.0 and sum(values) == 1.0
    assert task.tokenizer.decode(ids[: expected + 1]).endswith("park")


def test_a_step_reward_scores_every_prefix_and_lands_on_each_steps_last_token(spm):
    CALLS.clear()
    task = _text_task(spm, prefix_length, step_delimiter=" ")
    text = "sat on a mat"
    values = _rewards(task, text)
    assert CALLS == ["sat ", "sat on ", "sat on a ", "sat on a mat"]
    ids = task.tokenizer.encode(text)
    decoded = [task.tokenizer.decode(ids[: k + 1]) for k in range(len(ids))]
    landed = {decoded[k]: v for k, v in enumerate(values[:-1]) if v}
    assert landed == {"sat": 4.0, "sat on": 7.0, "sat on a": 9.0, "sat on a mat": 12.0}
    assert values[-1] == 0.0  # nothing on EOS: every step landed on a word


def test_a_step_reward_table_names_its_reward_and_an_empty_completion_is_one_step(spm):
    CALLS.clear()
    task = _text_task(
        spm,
        ["test_dense_rewards:prefix_length", "test_dense_rewards:words_in"],
        step_delimiter={"test_dense_rewards:prefix_length": " "},
    )
    assert _rewards(task, "sat on")[-1] == 2.0  # words_in: a sequence reward, on EOS
    assert CALLS == ["sat ", "sat on"]
    CALLS.clear()
    ids = task.tokenizer.encode("sat on")
    response = torch.tensor([[task.eos_token] + [0] * (len(ids) - 1), ids])
    mask = torch.tensor([[1.0] + [0.0] * (len(ids) - 1), [1.0] * len(ids)])
    values = task.response_rewards(torch.tensor([0, 0]), response, mask)
    assert CALLS == ["", "sat ", "sat on"]
    assert values[0].tolist() == [0.0] * len(ids)  # the empty step earned 0 characters, on the EOS


# --- bad input: one line naming the reward and the completion ---------------------------------


def too_few(prompt, completion):
    return [1.0]


def outside(prompt, completion):
    return [(0, len(completion) + 3, 1.0)]


def overlapping(prompt, completion):
    return [(0, 3, 1.0), (2, 5, 1.0)]


def nan_token(prompts, completion_ids, **kwargs):
    return [[float("nan")] * len(ids) for ids in completion_ids]


@pytest.mark.parametrize(
    "reward, message",
    [
        (too_few, r"returned 1 per-token values on prompt 0 \(completion 'sat on a mat'\), which has \d+ tokens"),
        (outside, r"returned the span \(0, 15\) on prompt 0 \(completion 'sat on a mat'\), outside"),
        (overlapping, r"returned overlapping spans \(0, 3\) and \(2, 5\) on prompt 0 \(completion 'sat on a mat'\)"),
        (nan_token, r"returned nan on prompt 0 \(completion 'sat on a mat'\) \(token 0\); rewards must be finite"),
    ],
)
def test_bad_dense_values_are_one_line_errors(spm, reward, message):
    task = _text_task(spm, reward)
    with pytest.raises(RewardError, match=rf"^reward '[^']*{reward.__name__}' {message}") as err:
        _rewards(task, "sat on a mat")
    assert "\n" not in str(err.value)


def test_a_step_delimiter_that_never_occurs_is_a_one_line_error(spm):
    task = _text_task(spm, prefix_length, step_delimiter="\n\n")
    with pytest.raises(RewardError, match=r"step delimiter '\\n\\n' occurs in none of the 1 completions on prompt 0"):
        _rewards(task, "sat on a mat")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"step_delimiter": ""}, "env.step_delimiter must be a non-empty string"),
        ({"step_delimiter": {"nope:f": " "}}, "env.step_delimiter names 'nope:f', which is not in env.reward"),
    ],
)
def test_bad_step_delimiters_are_config_errors(spm, options, message):
    with pytest.raises(ConfigError, match=message):
        _text_task(spm, "test_dense_rewards:words_in", **options)


def test_a_step_delimiter_needs_a_reward(spm):
    from tokenmdp.text import TextTask

    with pytest.raises(ConfigError, match="env.step_delimiter is set, but env.reward is not"):
        TextTask(prompts=["a"], tokenizer=str(spm), step_delimiter=" ")


def test_a_reward_set_without_offsets_refuses_spans():
    rewards = RewardSet(first_word_span, None, None)
    batch = dict(
        prompts=["p"], completions=["ab"], text_prompts=["p"], text_completions=["ab"], indices=[0], ids=[[1]], extra={}
    )
    with pytest.raises(RewardError, match="spans and steps need the completions' token offsets"):
        rewards.score_tokens(**batch)


# --- how the algorithms read a dense reward ----------------------------------------------------


def _batch(rewards, mask, groups):
    from tokenmdp.plugin.batch import RolloutBatch

    rewards, mask = torch.tensor(rewards), torch.tensor(mask)
    b = rewards.shape[0]
    return RolloutBatch(
        prompt_ids=torch.zeros(b, 1, dtype=torch.long),
        prompt_mask=torch.ones(b, 1, dtype=torch.long),
        response_ids=torch.zeros(rewards.shape, dtype=torch.long),
        response_mask=mask,
        rewards=rewards * mask,
        prompt_index=torch.tensor(groups),
        group_index=torch.tensor(groups),
    )


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_group_credit_reward_to_go_is_the_sequence_rule_on_the_first_token(name):
    from types import SimpleNamespace

    from tokenmdp_group import GRPO, RLOO

    cls = {"rloo": RLOO, "grpo": GRPO}[name]
    rewards = [[1.0, 0.0, 2.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0], [3.0, 0.0, 0.0]]
    mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    batch, ctx = _batch(rewards, mask, [0, 0, 0, 1]), SimpleNamespace(beta=0.1)
    sequence = cls(cls.Options(kl_coef=0.0)).estimate(batch, ctx)["token_rewards"]
    to_go = cls(cls.Options(kl_coef=0.0, credit="reward-to-go")).estimate(batch, ctx)["token_rewards"]
    assert torch.allclose(to_go[:, 0], sequence[:, 0])
    # position t: what response i earns from t on, against the group's at t (0 once ended)
    g = torch.tensor([[3.0, 2.0, 2.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.0]])
    if name == "rloo":
        expected = g - (g.sum(0) - g) / 2
    else:
        expected = (g - g.mean(0)) / (g[:, 0].std() + 1e-6)
    assert torch.allclose(to_go[:3], expected * torch.tensor(mask[:3]), atol=1e-6)
    assert not to_go[3].any()  # a group of one learns nothing, as under the sequence rule


def test_log_ratio_adds_the_env_reward_where_it_is_paid_only_when_asked():
    from types import SimpleNamespace

    from tokenmdp_inverse_q import LogRatio

    batch = _batch([[0.0, 1.0, 0.0]], [[1.0, 1.0, 0.0]], [0])
    batch.ref_logprobs = torch.tensor([[-1.0, -1.0, 0.0]])
    signals = {"target_logprobs": torch.tensor([[-0.5, -2.0, 0.0]])}
    ctx = SimpleNamespace(beta=0.5)
    plain = LogRatio(LogRatio.Options())
    assert "rewards" not in plain.requires  # reward-free by default
    dense = LogRatio(LogRatio.Options(env_reward=2.0))
    assert "rewards" in dense.requires
    base = plain.construct(batch, signals, ctx)["token_rewards"]
    assert base.tolist() == [[0.25, -0.5, 0.0]]
    assert dense.construct(batch, signals, ctx)["token_rewards"].tolist() == [[0.25, 1.5, 0.0]]


def word_spans(prompt, completion):
    """1 on every word "cat" (spans), -0.5 on every "dog"."""
    spans, start = [], 0
    for word in completion.split(" "):
        if word in ("cat", "dog"):
            spans.append((start, start + len(word), 1.0 if word == "cat" else -0.5))
        start += len(word) + 1
    return spans


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.name=reinforce", "env.reward=test_dense_rewards:word_spans"],
        ["algorithm.name=ppo", "env.reward=test_dense_rewards:word_spans"],
        [
            "algorithm.name=grpo",
            "train.samples_per_prompt=4",
            "estimator.credit=reward-to-go",
            "env.reward=test_dense_rewards:prefix_length",
            'env.step_delimiter=" "',
        ],
        [
            "algorithm.name=inverse-q",
            'estimator.guide="the cat"',
            "advantage.env_reward=1.0",
            "env.reward=test_dense_rewards:word_spans",
        ],
    ],
    ids=["reinforce-spans", "ppo-spans", "grpo-steps-to-go", "inverse-q-plus-spans"],
)
def test_text_runs_train_on_dense_and_step_rewards(text_files, tmp_path, overrides):  # noqa: F811
    run = tmp_path / "r"
    config = load_config(None, text_run(text_files, run, "train.steps=2", "train.batch_size=8", *overrides))
    Trainer(config).train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/reward_mean" in r]
    assert len(steps) == 2 and all(isinstance(r["rollout/reward_mean"], float) for r in steps)
    assert json.loads((run / "summary.json").read_text())["used_env_reward"] is True
