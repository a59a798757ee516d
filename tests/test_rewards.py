"""``env.reward`` beyond one per-response callable: rewards written for TRL's GRPOTrainer
(called once per batch), several weighted rewards, and ``hf:DIR`` reward models; every
bad reward stops the run with one line naming it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_real_lm import length_reward, rows, text_files, text_run, train_text  # noqa: F401 (fixture)

from tokenmdp import ConfigError, RewardError
from tokenmdp.config import load_config
from tokenmdp.text.task import TextTask
from tokenmdp.training.trainer import Trainer

CALLS: list[dict] = []


def trl_length_reward(prompts, completions, **kwargs) -> list[float]:
    """length_reward, written as TRL's GRPOTrainer calls it: once per batch."""
    CALLS.append({"n": len(prompts), "kwargs": sorted(kwargs), "prompts": prompts, "completions": completions})
    return [length_reward(p, c) for p, c in zip(prompts, completions)]


def short_reward(prompt: str, completion: str) -> float:
    return -float(len(completion))


def wrong_count(prompts, completions, **kwargs):
    return [1.0]


def strings(completions, **kwargs):
    return ["x"] * len(completions)


def all_none(completions, **kwargs):
    return [None] * len(completions)


def not_finite(prompts, completions, **kwargs):
    return [math.nan] * len(prompts)


def answer_reward(prompts, completions, completion_ids, answer, **kwargs):
    CALLS.append({"ids": completion_ids, "answer": answer})
    return [float(a == "yes") for a in answer]


def chat_reward(prompts, completions, **kwargs):
    CALLS.append({"prompts": prompts, "completions": completions})
    return [float(len(c[0]["content"])) for c in completions]


GRPO = [
    "algorithm.name=grpo",
    "train.steps=2",
    "train.batch_size=8",
    "train.samples_per_prompt=4",
    "train.eval_samples=6",
]  # evaluation batches of 6, training batches of 8


def test_a_trl_reward_is_called_once_per_batch_and_trains_like_the_per_response_one(text_files, tmp_path):  # noqa: F811
    CALLS.clear()
    batched = train_text(text_files, tmp_path / "batched", *GRPO, "env.reward=test_rewards:trl_length_reward")
    training_calls = [c for c in CALLS if c["n"] == 8]
    assert len(training_calls) == 2  # one call per step's batch of 8, with EOS ending rows at different steps
    assert training_calls[0]["kwargs"] == ["completion_ids", "log_extra", "log_metric", "trainer_state"]
    per_response = train_text(text_files, tmp_path / "per", *GRPO)
    drop = ("time/",)
    assert [{k: v for k, v in r.items() if not k.startswith(drop)} for r in batched] == [
        {k: v for k, v in r.items() if not k.startswith(drop)} for r in per_response
    ]


def test_several_rewards_are_summed_with_their_weights(text_files):  # noqa: F811
    common = dict(prompts=str(text_files / "train.jsonl"), tokenizer=str(text_files / "spm.model"), horizon=6)
    one = TextTask(reward="test_real_lm:length_reward", **common)
    two = TextTask(
        reward=["test_real_lm:length_reward", "test_rewards:short_reward"], reward_weights=[2, 0.5], **common
    )
    response = one.tokenizer.encode("the cat sat")
    completion = one.completion_text(response)
    assert two.score(0, response) == pytest.approx(2 * length_reward("", completion) - 0.5 * len(completion))
    assert two.reward_name == "2*test_real_lm:length_reward + 0.5*test_rewards:short_reward"
    with pytest.raises(ConfigError, match=r"env.reward_weights must be 2 finite number\(s\)"):
        TextTask(reward=["test_real_lm:length_reward", "test_rewards:short_reward"], reward_weights=[1], **common)
    with pytest.raises(ConfigError, match="env.reward_weights is set, but env.reward is not"):
        TextTask(reward_weights=[1], **common)


def test_a_batch_reward_gets_the_completion_ids_and_the_prompts_other_columns(text_files, tmp_path):  # noqa: F811
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"the cat {i}", "answer": "yes" if i % 2 else "no"}) + "\n" for i in range(4))
    )
    task = TextTask(
        prompts=str(data), tokenizer=str(text_files / "spm.model"), horizon=6, reward="test_rewards:answer_reward"
    )
    CALLS.clear()
    values = task.score_responses([0, 1, 3], [[5, 6], [7], [8, 9]])
    assert values == [0.0, 1.0, 1.0]
    assert CALLS[0]["answer"] == ["no", "yes", "yes"] and CALLS[0]["ids"] == [[5, 6], [7], [8, 9]]


def test_a_conversational_prompt_reaches_a_batch_reward_as_messages(tmp_path):
    from test_datasets import PROMPTS, write_tokenizer

    tokenizer = write_tokenizer(tmp_path / "tok", chat=True)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS[:2]))
    task = TextTask(prompts=str(data), tokenizer=str(tokenizer), horizon=4, reward="test_rewards:chat_reward")
    CALLS.clear()
    ids = task.tokenizer.encode("the cat")
    assert task.score_responses([1], [ids]) == [float(len("the cat"))]
    assert CALLS[0]["prompts"] == [[{"role": "user", "content": PROMPTS[1]}]]
    assert CALLS[0]["completions"] == [[{"role": "assistant", "content": "the cat"}]]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    from test_datasets import write_tokenizer
    from transformers import GPT2Config, GPT2ForSequenceClassification

    root = tmp_path_factory.mktemp("rm")
    write_tokenizer(root / "rm", chat=False)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=64, num_labels=1, pad_token_id=0)
    GPT2ForSequenceClassification(config).save_pretrained(root / "rm")
    return root / "rm"


def test_an_hf_reward_model_scores_prompt_and_completion_in_batches(reward_model, tmp_path):
    from test_datasets import PROMPTS, write_tokenizer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = write_tokenizer(tmp_path / "tok", chat=False)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    task = TextTask(prompts=str(data), tokenizer=str(tokenizer), horizon=4, reward=f"hf:{reward_model}")
    responses = [task.tokenizer.encode(t) for t in ("the cat", "dog sat on", "mat")]
    scores = task.score_responses([0, 1, 2], responses)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    tok = AutoTokenizer.from_pretrained(reward_model)
    for i, (prompt, text) in enumerate(zip(PROMPTS, ("the cat", "dog sat on", "mat"))):
        with torch.no_grad():
            expected = model(**tok([prompt + text], return_tensors="pt")).logits[0, 0].item()
        assert scores[i] == pytest.approx(expected, abs=1e-5)  # padding in the batch changes nothing
    with pytest.raises(ConfigError, match="is not a sequence-classification model"):
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=30)).save_pretrained(tmp_path / "lm")
        TextTask(prompts=str(data), tokenizer=str(tokenizer), horizon=4, reward=f"hf:{tmp_path / 'lm'}")
    with pytest.raises(ConfigError, match="holds no model"):
        TextTask(prompts=str(data), tokenizer=str(tokenizer), horizon=4, reward=f"hf:{tmp_path / 'none'}")


@pytest.mark.parametrize(
    "reward, message",
    [
        ("test_rewards:wrong_count", r"returned 1 values on a batch of 6 responses; a batch reward returns one"),
        ("test_rewards:strings", r"returned 'x' \(str\) on prompt \d+ \(completion .*\); rewards must be numbers"),
        ("test_rewards:all_none", r"returned None on prompt \d+ \(completion .*\), and no other reward scored"),
        ("test_rewards:not_finite", r"returned nan on prompt \d+ \(completion .*\); rewards must be finite"),
    ],
)
def test_bad_batch_values_stop_the_run_naming_the_reward(text_files, tmp_path, reward, message):  # noqa: F811
    config = load_config(None, text_run(text_files, tmp_path / "r", *GRPO, f"env.reward={reward}"))
    # the reference's evaluation at step 0 is the first batch scored
    with pytest.raises(RewardError, match=rf"reward '{reward}' {message}.*\(in the evaluation at step 0\)"):
        Trainer(config).train()
    assert not (tmp_path / "r").exists()  # nothing half-written


# --- TRL's reward convention, exactly ---------------------------------------------------------
# Each reward below has a signature from TRL's documentation or of a function TRL ships
# (trl.rewards), written here: TRL stays out of the default install.


def docs_reward(completions, **kwargs):  # TRL docs: "def reward_func(completions, **kwargs)"
    return [float(len(c)) for c in completions]


def swapped(completions, prompts, **kwargs):  # any order works: TRL passes keywords
    CALLS.append({"prompts": prompts, "completions": completions})
    return [0.0] * len(completions)


def keyword_only(*, completions, completion_ids, trainer_state, log_metric, log_extra, **kwargs):
    CALLS.append({"step": trainer_state.global_step})
    log_metric("length/mean", sum(len(i) for i in completion_ids) / len(completion_ids))
    log_extra("length", [len(i) for i in completion_ids])
    return [float(len(i)) for i in completion_ids]


def think_format_reward(completions: list, **kwargs) -> list[float]:  # trl.rewards' shape
    return [1.0 if c.startswith("<think>") else 0.0 for c in completions]


class RepetitionPenalty:  # trl.rewards.get_repetition_penalty_reward returns such an object
    def __init__(self, ngram_size: int):
        self.ngram_size = ngram_size

    def __call__(self, completion_ids: list[list[int]], **kwargs) -> list[float]:
        return [-float(len(ids) - len(set(ids))) for ids in completion_ids]


repetition_penalty = RepetitionPenalty(2)


def with_ngram(completion_ids, ngram_size, **kwargs):
    return [float(ngram_size)] * len(completion_ids)


def only_on_cats(prompts, completions, **kwargs):  # None: this reward does not apply (TRL's multi-task rule)
    return [1.0 if "cat" in p else None for p in prompts]


def everywhere(prompts, completions, **kwargs):
    return [10.0] * len(prompts)


async def async_reward(completions, **kwargs):
    import asyncio

    await asyncio.sleep(0)
    return [2.0] * len(completions)


async def async_failing(completions, **kwargs):
    raise ValueError("boom")


async def async_per_response(prompt, completion):
    return 3.0


def neither(x):
    return 0.0


def both(*args, **kwargs):
    return 0.0


def qa_task(tmp_path, text_files, reward, **kw):  # noqa: F811
    data = tmp_path / "qa.jsonl"
    qa = [{"prompt": p, "answer": a} for p, a in [("the cat", "yes"), ("a dog", "no"), ("the cat sat", "no")]]
    data.write_text("".join(json.dumps(r) + "\n" for r in qa))
    return TextTask(prompts=str(data), tokenizer=str(text_files / "spm.model"), horizon=6, reward=reward, **kw)


def test_every_signature_trl_accepts_is_called_with_keywords(text_files, tmp_path):  # noqa: F811
    import functools

    responses = [[5, 6, 5], [7], [8, 9]]
    task = qa_task(tmp_path, text_files, "test_rewards:docs_reward")
    texts = [task.completion_text(r) for r in responses]
    assert task.score_responses([0, 1, 2], responses) == [float(len(t)) for t in texts]
    CALLS.clear()
    task = qa_task(tmp_path, text_files, "test_rewards:swapped")
    task.score_responses([0, 1], responses[:2])
    assert CALLS[0] == {"prompts": ["the cat", "a dog"], "completions": texts[:2]}  # not swapped
    task = qa_task(tmp_path, text_files, "test_rewards:keyword_only")
    task.rewards.state.global_step = 7
    CALLS.clear()
    assert task.score_responses([0, 1, 2], responses) == [3.0, 1.0, 2.0]
    assert CALLS == [{"step": 7}]
    metrics, columns = task.rewards.drain_logs()
    assert metrics == {"length/mean": 2.0} and columns == {"length": [3, 1, 2]}
    assert task.rewards.drain_logs() == ({}, {})  # drained
    assert qa_task(tmp_path, text_files, "test_rewards:think_format_reward").score_responses([0], [[5]]) == [0.0]
    penalty = qa_task(tmp_path, text_files, "test_rewards:repetition_penalty")
    assert penalty.score_responses([0, 1], responses[:2]) == [-1.0, 0.0]
    assert penalty.rewards.rewards[0].form == "trl"
    partial = functools.partial(with_ngram, ngram_size=3)
    assert qa_task(tmp_path, text_files, partial).score_responses([0], [[5]]) == [3.0]


def test_async_rewards_are_awaited_together(text_files, tmp_path):  # noqa: F811
    task = qa_task(
        tmp_path, text_files, ["test_rewards:async_reward", "test_rewards:async_per_response"], reward_weights=[1, 10]
    )
    assert [r.form for r in task.rewards.rewards] == ["trl", "pair"]
    assert task.score_responses([0, 1], [[5], [6]]) == [32.0, 32.0]
    failing = qa_task(tmp_path, text_files, ["test_rewards:async_reward", "test_rewards:async_failing"])
    with pytest.raises(
        RewardError, match=r"^reward 'test_rewards:async_failing' raised while awaited: ValueError: boom"
    ):
        failing.score_responses([0], [[5]])


def test_none_leaves_a_reward_out_of_the_weighted_sum_as_trl_does(text_files, tmp_path):  # noqa: F811
    task = qa_task(
        tmp_path, text_files, ["test_rewards:only_on_cats", "test_rewards:everywhere"], reward_weights=[2, 0.5]
    )
    assert task.score_responses([0, 1, 2], [[5], [6], [7]]) == [2 + 5.0, 5.0, 2 + 5.0]
    alone = qa_task(tmp_path, text_files, "test_rewards:only_on_cats")
    with pytest.raises(RewardError, match=r"'test_rewards:only_on_cats' returned None on prompt 1 .*no other reward"):
        alone.score_responses([0, 1], [[5], [6]])


def test_the_per_response_form_stays_and_the_forms_never_mix_silently(text_files, tmp_path):  # noqa: F811
    task = qa_task(tmp_path, text_files, "test_rewards:short_reward")
    assert task.rewards.rewards[0].form == "pair"
    assert task.score_responses([0], [[5, 6]]) == [-float(len(task.completion_text([5, 6])))]
    for name, fits in [("neither", "neither form"), ("both", "both forms")]:
        with pytest.raises(ConfigError, match=rf"env.reward 'test_rewards:{name}': its signature .* fits {fits}"):
            qa_task(tmp_path, text_files, f"test_rewards:{name}")
    with pytest.raises(RewardError, match="cannot take TRL's keywords .*a column of the prompts"):
        qa_task(tmp_path, text_files, "test_rewards:with_ngram").score_responses([0], [[5]])


def logging_reward(completions, completion_ids, trainer_state, log_metric, log_extra, **kwargs):
    CALLS.append({"step": trainer_state.global_step, "max_steps": trainer_state.max_steps, "n": len(completions)})
    log_metric("reward/length", float(sum(len(i) for i in completion_ids)) / len(completion_ids))
    log_extra("tokens", [len(i) for i in completion_ids])
    return [float(len(i)) for i in completion_ids]


def test_a_run_gives_rewards_trl_state_and_logs_what_they_log(text_files, tmp_path):  # noqa: F811
    CALLS.clear()
    metrics = train_text(
        text_files, tmp_path / "run", *GRPO, "env.reward=test_rewards:logging_reward", "train.log_completions=1"
    )
    training = [c for c in CALLS if c["n"] == 8]
    assert [(c["step"], c["max_steps"]) for c in training] == [(1, 2), (2, 2)]
    # the step's mean, as TRL averages log_metric over a logging step; not the evaluation's calls
    for row in metrics[1:]:
        assert row["reward/length"] == pytest.approx(row["rollout/reward_mean"], rel=1e-6)  # reward = length
    assert "reward/length" not in metrics[0]  # step 0 is the evaluation alone
    lines = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert lines and all(line["tokens"] == line["reward"] for line in lines)  # log_extra's column, row by row
