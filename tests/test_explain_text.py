"""``tokenmdp explain`` on text runs: every estimator's token credit beside a Monte-Carlo
ground truth (docs/explain.md, "Text runs"), on the tiny GPT-2 of tests/test_real_lm.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_explorer import browser, number, tab  # noqa: F401 (fixtures)
from test_real_lm import text_files, text_run  # noqa: F401 (fixture)

from tokenmdp import ConfigError, cli
from tokenmdp.config import load_config
from tokenmdp.reports.explain import explain, load_run
from tokenmdp.training.mc_credit import monte_carlo_credit
from tokenmdp.training.trainer import Trainer

GRPO = ["algorithm.name=grpo", "train.steps=2", "train.batch_size=8", "train.samples_per_prompt=4"]
TRUTH = "Monte-Carlo A^pi (K=4)"


@pytest.fixture(scope="module")
def grpo_run(text_files, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("explain_text") / "grpo"
    Trainer(load_config(None, text_run(text_files, run, *GRPO))).train()
    return run


@pytest.fixture(scope="module")
def explained(grpo_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain_text_out")
    return explain(grpo_run, samples=2, group_size=4, seed=3, out=out, k=4, guide="the cat")


def test_every_estimator_is_scored_against_the_monte_carlo_ground_truth(explained):
    assert explained.labels == [
        "Inverse-Q* token (guide)",
        "Inverse-Q* return (guide)",
        "DPO implicit",
        "RLOO",
        "GRPO",
        TRUTH,
    ]
    assert explained.truth == TRUTH and set(explained.stderr) == {TRUTH}
    assert list(explained.skipped) == ["gae"] and "no exact V^pi" in explained.skipped["gae"]
    for label in explained.labels[:-1]:
        r, (low, high) = explained.correlations[label], explained.intervals[label]
        assert math.isfinite(r) and -1 <= low <= high <= 1, label
    assert explained.correlations[TRUTH] == pytest.approx(1.0)
    assert "ground truth: Monte-Carlo A^pi (K=4), 8/8 responses" in explained.header


def test_the_ground_truth_is_the_monte_carlo_estimate_of_the_shown_responses_first(grpo_run, explained):
    config, _, task, policy, reference, _ = load_run(grpo_run)
    b, shown = explained.batch, explained.shown
    order = torch.tensor(shown + [r for r in range(b.size) if r not in shown])
    direct = monte_carlo_credit(
        policy, reference, task, b.select(order), config.train.beta, 4, torch.Generator().manual_seed(3 ^ 0x7E57)
    )
    # the same computation (the same models, batch, order and stream): bit-equal
    assert torch.equal(explained.credit[TRUTH][order], direct.advantages)
    assert torch.equal(explained.stderr[TRUTH][order], direct.stderr)
    real = b.response_mask.bool()
    assert (explained.stderr[TRUTH][real] >= 0).all() and not explained.credit[TRUTH][~real].any()


def test_a_budget_covers_the_shown_responses_first_and_too_small_a_one_is_one_line(grpo_run, tmp_path):
    from tokenmdp.training.mc_credit import needed_tokens

    cheap = explain(grpo_run, samples=2, group_size=4, seed=3, out=tmp_path / "a", k=4, budget=200)
    b = cheap.batch
    order = cheap.shown + [r for r in range(b.size) if r not in cheap.shown]
    cost = needed_tokens(b.select(torch.tensor(order)), 6, 4)
    fits = next(i for i in range(len(cost) + 1) if i == len(cost) or sum(cost[: i + 1]) > 200)
    assert 1 <= fits < b.size  # the budget cuts: some responses are left without a ground truth
    covered = {
        row for row in range(b.size) if cheap.stderr[cheap.truth][row].any() or cheap.credit[cheap.truth][row].any()
    }
    assert covered <= set(order[:fits]) and cheap.shown[0] in covered
    assert f"{fits}/{b.size} responses" in cheap.header
    with pytest.raises(ConfigError, match=r"--budget 10 sampled tokens is too small for one Monte-Carlo estimate"):
        explain(grpo_run, samples=2, group_size=4, seed=3, out=tmp_path / "b", k=4, budget=10)


def test_the_reference_as_the_truths_policy(grpo_run, tmp_path):
    result = explain(grpo_run, samples=1, group_size=4, seed=3, out=tmp_path, k=2, truth_policy="reference")
    assert result.truth == "Monte-Carlo A^pi_ref (K=2)"
    with pytest.raises(ConfigError, match="--truth must be one of policy, reference"):
        explain(grpo_run, samples=1, group_size=4, out=tmp_path, truth_policy="optimal")


def test_without_a_guide_the_inverse_q_row_says_how_to_get_one(grpo_run, tmp_path):
    result = explain(grpo_run, samples=1, group_size=4, seed=3, out=tmp_path, k=2)
    assert 'explain --guide "..."' in result.skipped["inverse-q"]
    assert "Inverse-Q* token (guide)" not in result.labels


def test_a_ppo_text_run_shows_gae_with_its_own_critic(text_files, tmp_path):  # noqa: F811
    run = tmp_path / "ppo"
    Trainer(
        load_config(None, text_run(text_files, run, "algorithm.name=ppo", "train.steps=1", "train.batch_size=8"))
    ).train()
    result = explain(run, samples=1, group_size=2, seed=0, out=tmp_path / "out", k=2)
    gae = [label for label in result.labels if label.startswith("GAE")]
    assert gae == ["GAE lambda=0.95 (critic)"]
    assert math.isfinite(result.correlations[gae[0]])


def test_the_cli_prints_each_estimators_correlation_with_its_interval(grpo_run, tmp_path, capsys):
    code = cli.main(
        ["explain", str(grpo_run), "--samples", "1", "--group-size", "4", "--k", "2", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0 and "Monte-Carlo A^pi (K=2)" in out and "95% interval" in out
    assert cli.main(["explain", str(grpo_run), "--budget", "5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "too small for one Monte-Carlo estimate" in err and err.count("\n") == 1


def test_the_text_page_loads_and_hovering_shows_the_estimate_with_its_error(tab, explained):  # noqa: F811
    tab.load(explained.html)
    data = json.loads(tab.js("document.getElementById('explorer-data').textContent"))
    assert data["truth"] == TRUTH and data["trees"] == []
    row = explained.shown[0]
    tab.hover(".tok[data-r='0'][data-t='0']")
    text = tab.js("document.getElementById('panel').innerText")
    value, error = float(explained.credit[TRUTH][row, 0]), float(explained.stderr[TRUTH][row, 0])
    assert f"{value:+.3f}" in text or f"{value:.3f}" in text
    assert "±" in text and f"{error:.3f}" in text
    assert tab.errors() == []


def test_score_credit_puts_the_runs_agreement_with_the_monte_carlo_truth_in_the_summary(text_files, tmp_path):  # noqa: F811
    run = tmp_path / "scored"
    overrides = [*GRPO, "train.score_credit=4", "train.score_credit_k=3"]
    Trainer(load_config(None, text_run(text_files, run, *overrides))).train()
    summary = json.loads((run / "summary.json").read_text())
    low, high = summary["credit_corr_mc_interval"]
    assert math.isfinite(summary["credit_corr_mc"]) and -1 <= low <= high <= 1
    assert summary["credit_corr_mc_k"] == 3 and summary["credit_corr_mc_responses"] == 4
    assert summary["credit_corr_mc_sampled_tokens"] > 0
    plain = tmp_path / "plain"  # the default (true) costs a text run nothing
    Trainer(load_config(None, text_run(text_files, plain, *GRPO))).train()
    assert "credit_corr_mc" not in json.loads((plain / "summary.json").read_text())


@pytest.mark.parametrize("value", ["0", "-2", "1.5"])
def test_bad_score_credit_values_are_one_line(value):
    with pytest.raises(
        ConfigError, match=r"config.train: score_credit must be true, false, or a number of responses >= 1"
    ):
        load_config(None, [f"train.score_credit={value}"])
