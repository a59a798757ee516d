"""Judges (issue 28, first slice): scores of the held-out evaluations that training never
reads, each with its standard error and its win rate against the reference; and the
evaluation's spread and diversity (``kl_ref_se``, ``distinct_2``)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from test_real_lm import text_files, text_run  # noqa: F401 (text_files: a fixture)

from tokenmdp import ConfigError, RewardError
from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.text.judges import vader
from tokenmdp.training.evaluation import _standard_error, distinct_bigrams, win_rate
from tokenmdp.training.trainer import Trainer

CALLS: list[int] = []


def length_judge(completions, **kwargs):
    """A judge in TRL's form: the completion's length in characters."""
    CALLS.append(len(completions))
    return [float(len(c)) for c in completions]


def short_judge(completions, **kwargs):
    return [1.0]  # one value for a whole batch: the wrong number


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the pieces ---------------------------------------------------------------------------


def test_vader_scores_sentiment_from_another_package():
    happy, sad = vader(["What a wonderful, lovely day!", "This is awful and I hate it."])
    assert 0.5 < happy <= 1.0 and -1.0 <= sad < -0.5
    # a conversation's content is judged
    assert vader([[{"role": "assistant", "content": "What a wonderful, lovely day!"}]]) == [happy]


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate([0.3, 0.1], [0.3, 0.1]) == 0.5


def test_distinct_bigrams_fall_as_responses_repeat():
    mask = torch.ones(2, 4)
    varied = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    repeated = torch.tensor([[1, 2, 1, 2], [1, 2, 1, 2]])
    assert distinct_bigrams(varied, mask) == 1.0
    assert distinct_bigrams(repeated, mask) == pytest.approx(2 / 6)  # (1,2) and (2,1) of 6 bigrams
    half = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])
    assert distinct_bigrams(half, torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])) == 0.5  # padding is not text


def test_standard_error_of_the_mean():
    assert _standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx((5 / 3) ** 0.5 / 2)
    assert _standard_error([2.0]) == 0.0


# --- a run's evaluations ------------------------------------------------------------------


def test_judges_score_every_evaluation_and_never_training(text_files, tmp_path):  # noqa: F811
    CALLS.clear()
    run_dir = tmp_path / "run"
    overrides = text_run(
        text_files,
        run_dir,
        "algorithm.name=grpo",
        "train.steps=4",
        "train.eval_every=2",
        "train.batch_size=8",
        "train.samples_per_prompt=4",
        "train.eval_samples=12",
        'env.judges=["vader", "test_judges:length_judge"]',
        "updater.lr=3e-2",  # enough to move a tiny random model in 4 steps
    )
    summary = Trainer(load_config(None, overrides)).train()
    evaluations = [r for r in rows(run_dir) if "kl_ref" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4]
    # one batch call per evaluation, plus the reference's own (the win rates' other side);
    # the summary's final scores are the step-4 evaluation's; training calls no judge
    assert CALLS == [12] * 4
    first = evaluations[0]
    for name in ("vader", "length_judge"):
        for row in evaluations:
            assert {f"judge/{name}", f"judge/{name}_se", f"judge/{name}_win_rate"} <= set(row)
            assert row[f"judge/{name}_se"] >= 0 and 0 <= row[f"judge/{name}_win_rate"] <= 1
        # step 0: the policy is the reference, so the same draws and all ties
        assert first[f"judge/{name}_win_rate"] == 0.5
        assert summary["start"][f"judge/{name}"] == first[f"judge/{name}"]
    assert -1 <= first["judge/vader"] <= 1
    assert first["kl_ref"] == 0 and first["kl_ref_se"] == 0
    assert all(0 < r["distinct_2"] <= 1 and r["kl_ref_se"] >= 0 for r in evaluations)
    assert evaluations[-1]["kl_ref"] > 0 and evaluations[-1]["kl_ref_se"] > 0


def test_a_judge_that_is_not_importable_is_one_line_naming_it(text_files, tmp_path, capsys):  # noqa: F811
    overrides = text_run(text_files, tmp_path / "run", "algorithm.name=grpo", 'env.judges=["no_such_module:judge"]')
    assert main(["train", *sum((["--set", o] for o in overrides), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "env.judges 'no_such_module:judge': cannot import module" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"vader"', "env.judges must be a list"),
        ("[1]", "env.judges must be a list"),
        ('["vader", "mod:vader"]', "two judges are named 'vader'"),
    ],
)
def test_bad_judges_are_refused_at_start_up(text_files, tmp_path, value, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        Trainer(load_config(None, text_run(text_files, tmp_path / "run", "algorithm.name=grpo", f"env.judges={value}")))


def test_a_judge_returning_the_wrong_number_stops_the_run_naming_it(text_files, tmp_path):  # noqa: F811
    overrides = text_run(
        text_files, tmp_path / "run", "algorithm.name=grpo", "train.batch_size=8", "train.samples_per_prompt=4"
    )
    trainer = Trainer(load_config(None, [*overrides, 'env.judges=["test_judges:short_judge"]']))
    with pytest.raises(RewardError, match="test_judges:short_judge"):
        trainer.train()


# --- the guided reference (the baseline row of every guide method) -------------------------


def test_the_guided_reference_is_pi_ref_given_the_guide_on_the_same_draw(text_files, tmp_path):  # noqa: F811
    """``evaluate(reference, prefix_ids=guide)`` samples the held-out draw from
    ``pi_ref(.|c + x)``, scores it as answers to the plain prompts, and its ``kl_ref`` is
    ``sum_t log pi_ref(y_t|c + x, y_<t) - log pi_ref(y_t|x, y_<t)``, recomputed here from whole
    forwards; a guide run reports it in summary.json and keeps its responses."""
    from tokenmdp.plugin.batch import prompts_with_prefix

    guide = "answer kindly"
    overrides = text_run(
        text_files,
        tmp_path / "run",
        "algorithm.name=context-distill",
        f'estimator.guide="{guide}"',
        "train.steps=1",
        "train.batch_size=4",
        "train.eval_samples=12",
        'env.judges=["vader", "test_judges:length_judge"]',
    )
    trainer = Trainer(load_config(None, overrides))
    trainer.build_models()
    evaluator, reference, task = trainer.evaluator, trainer.reference, trainer.task.eval_task
    prefix = task.encode_guide(guide)
    scores = evaluator.evaluate(reference, prefix_ids=prefix)
    guided, plain = evaluator.sample(reference, prefix), evaluator.sample(reference)
    assert torch.equal(guided.prompt_index, plain.prompt_index)  # the same held-out prompts
    assert torch.equal(guided.prompt_ids, plain.prompt_ids)  # scored as answers to the plain prompts
    assert not torch.equal(guided.response_ids, plain.response_ids)  # drawn with the guide in front

    def logprobs(prompt_ids, prompt_mask):
        full = torch.cat([prompt_ids, guided.response_ids], 1)
        mask = torch.cat([prompt_mask, torch.ones_like(guided.response_ids)], 1)
        with torch.no_grad():
            logits = reference(full, mask)[:, prompt_ids.shape[1] - 1 : -1].double()
        taken = torch.log_softmax(logits, -1).gather(-1, guided.response_ids[..., None]).squeeze(-1)
        return (taken * guided.response_mask).sum(1)

    kl = logprobs(*prompts_with_prefix(guided, prefix)) - logprobs(guided.prompt_ids, guided.prompt_mask)
    assert scores["kl_ref"] == pytest.approx(float(kl.mean()), abs=1e-4)  # float32 forwards, 6 tokens
    responses = [r[: int(n)] for r, n in zip(guided.response_ids.tolist(), guided.response_mask.sum(1).tolist())]
    rewards = task.score_responses(guided.prompt_index.tolist(), responses)
    assert scores["true_reward"] == pytest.approx(sum(rewards) / len(rewards))
    lengths = length_judge([task.completion_text(r) for r in responses])
    assert scores["judge/length_judge"] == pytest.approx(sum(lengths) / len(lengths))
    reference_lengths = [row["judge/length_judge"] for row in evaluator.samples if row["role"] == "reference"]
    assert scores["judge/length_judge_win_rate"] == win_rate(lengths, reference_lengths)

    summary = trainer.train()
    assert summary["guided_reference"] == scores  # the same draw at the end of the run
    kept = [json.loads(line) for line in gzip.open(tmp_path / "run" / "eval_completions.jsonl.gz", "rt")]
    assert [r["completion"] for r in kept if r["role"] == "guided_reference"] == [
        task.completion_text(r) for r in responses
    ]
