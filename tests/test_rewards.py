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
from tokenmdp.train.trainer import Trainer

CALLS: list[dict] = []


def trl_length_reward(prompts, completions, **kwargs) -> list[float]:
    """length_reward, written as TRL's GRPOTrainer calls it: once per batch."""
    CALLS.append({"n": len(prompts), "kwargs": sorted(kwargs), "prompts": prompts, "completions": completions})
    return [length_reward(p, c) for p, c in zip(prompts, completions)]


def short_reward(prompt: str, completion: str) -> float:
    return -float(len(completion))


def wrong_count(prompts, completions, **kwargs):
    return [1.0]


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
    assert training_calls[0]["kwargs"] == ["completion_ids"]
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
        ("test_rewards:not_finite", r"returned nan on a batch of 6 responses \(completion 0\); rewards must be finite"),
    ],
)
def test_bad_batch_values_stop_the_run_naming_the_reward(text_files, tmp_path, reward, message):  # noqa: F811
    config = load_config(None, text_run(text_files, tmp_path / "r", *GRPO, f"env.reward={reward}"))
    # the reference's evaluation at step 0 is the first batch scored
    with pytest.raises(RewardError, match=rf"reward '{reward}' {message}.*\(in the evaluation at step 0\)"):
        Trainer(config).train()
    assert not (tmp_path / "r").exists()  # nothing half-written
