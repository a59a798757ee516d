"""``tokenmdp explain``: heat maps of each estimator's token credit beside the true A*."""

from __future__ import annotations

import json
import math
import re
from unittest import mock

import pytest
import torch

from tokenmdp import cli
from tokenmdp.mdp.solver import solve
from tokenmdp.reports.explain import TRUE_ROW, explain, load_run
from tokenmdp.reports.plots import png_data_uri
from tokenmdp.training.trainer import Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: This run has no guide-tagged reference and no critic: the oracle target and exact values.
ROWS = [
    "Inverse-Q* token (oracle)",
    "Inverse-Q* return (oracle)",
    "GAE lambda=0.95 (exact V^pi)",
    "DPO implicit",
    "RLOO",
    "GRPO",
    "this run: kl-penalised-reward + reward-to-go",  # REINFORCE: no view shows it, so it gets its own
    TRUE_ROW,
]
#: A delayed reward and an EOS token, so responses have padding after EOS.
DELAYED = ["env.id=tokenmdp/SumThreshold-v0", "env.eos_token=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from helpers import TINY

    from tokenmdp.config import load_config

    path = tmp_path_factory.mktemp("explain") / "run"
    Trainer(load_config(None, [*TINY, *DELAYED, f"run.dir={path}"])).train()
    return path


@pytest.fixture(scope="module")
def explained(run_dir, tmp_path_factory):
    return explain(run_dir, samples=3, seed=1, out=tmp_path_factory.mktemp("explain_out"))


def page_json(page) -> dict:
    """The explorer's data, embedded in the page."""
    found = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(found.group(1))


def test_writes_one_png_per_response_and_a_self_contained_html(explained):
    assert len(explained.images) == 3 and len(explained.shown) == 3
    page = explained.html.read_text()
    data = page_json(explained.html)
    for image, embedded in zip(explained.images, data["images"]):
        png = image.read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
        assert embedded == {"name": image.name, "src": png_data_uri(image)}  # inlined: the page needs no other file
    assert not re.search(r"<link|<script[^>]*\ssrc=|<img[^>]*\ssrc=|@import|https?://", page)
    assert [row["label"] for row in data["rows"]] == ROWS and data["truth"] == TRUE_ROW
    for label in ROWS:
        assert label in page


def test_every_estimator_row_is_present_with_a_correlation(explained):
    assert explained.labels == ROWS
    assert not explained.skipped
    assert set(explained.correlations) == set(ROWS)
    assert explained.correlations[TRUE_ROW] == pytest.approx(1.0)
    assert "exact pi*" in explained.notes["Inverse-Q* token (oracle)"]


def test_true_row_is_the_solvers_a_star_on_the_sampled_tokens(run_dir, explained):
    config, _, task, _, reference, _ = load_run(run_dir)
    solution = solve(task, reference, config.train.beta)
    b = explained.batch
    # bit-equal: explain's true row is this very call (solver, reference and beta of the run)
    assert torch.equal(
        explained.credit[TRUE_ROW], solution.token_advantages(b.prompt_index, b.response_ids, b.response_mask)
    )
    # with the oracle target, Inverse-Q*'s token credit is A* itself (METHOD.md section 3)
    assert torch.allclose(explained.credit["Inverse-Q* token (oracle)"], explained.credit[TRUE_ROW], atol=1e-5)


def test_padding_is_zero_and_never_drawn(explained):
    b = explained.batch
    padding = b.response_mask == 0
    assert padding.any(), "the fixture should produce EOS-terminated responses"
    for label in ROWS:
        assert (explained.credit[label][padding] == 0).all(), label
    # uniform credit: one number per response on every real token
    for label in ("RLOO", "GRPO"):
        for row in range(b.size):
            real = explained.credit[label][row][b.response_mask[row] > 0]
            assert torch.allclose(real, real[0].expand_as(real))
    # the page holds each shown response's real tokens only, with one value per token in every row
    responses = page_json(explained.html)["responses"]
    assert [r["row"] for r in responses] == explained.shown
    for response, row in zip(responses, explained.shown):
        length = int(b.response_mask[row].sum())
        assert response["ids"] == b.response_ids[row, :length].tolist()
        assert len(response["tokens"]) == len(response["policy_prob"]) == len(response["ref_prob"]) == length
        for label in ROWS:
            assert response["credit"][label] == pytest.approx(explained.credit[label][row, :length].tolist(), abs=1e-5)
        assert response["policy_prob"] == pytest.approx(b.logprobs[row, :length].exp().tolist(), rel=1e-5)
        assert response["ref_prob"] == pytest.approx(b.ref_logprobs[row, :length].exp().tolist(), rel=1e-5)


def test_groups_share_a_prompt(explained):
    groups = explained.batch.prompt_index.view(len(explained.shown), -1)
    assert (groups == groups[:, :1]).all()


def test_cli_prints_the_correlations(run_dir, tmp_path, capsys):
    assert cli.main(["explain", str(run_dir), "--samples", "1", "--seed", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "corr with A*" in out
    for label in ROWS:
        assert re.search(rf"^{re.escape(label)}\s+-?\d\.\d{{3}}", out, flags=re.M), label
    assert (tmp_path / "response_0.png").is_file() and (tmp_path / "index.html").is_file()


def test_a_ppo_run_is_explained_with_its_own_critic(tiny_config, tmp_path):
    config = tiny_config("algorithm.name=ppo", *DELAYED, "train.steps=2", run_dir=tmp_path / "ppo")
    Trainer(config).train()
    result = explain(tmp_path / "ppo", samples=1, out=tmp_path / "out")
    assert "GAE lambda=0.95 (critic)" in result.labels
    assert "the run's trained critic" in result.notes["GAE lambda=0.95 (critic)"]


def test_bad_run_dirs_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["explain", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a run directory" in err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.toml").write_text('[env]\nid = "tokenmdp/Pattern-v0"\n')
    assert cli.main(["explain", str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint" in err


def test_exact_policy_values_give_the_objective_at_the_root(run_dir):
    """The stand-in critic V^pi (KL coefficient beta) must agree with the exact evaluator's J."""
    from tokenmdp.mdp.solver import tree_logprobs
    from tokenmdp.reports.explain import exact_policy_values

    config, _, task, policy, reference, _ = load_run(run_dir)
    solution = solve(task, reference, config.train.beta)
    logp = tree_logprobs(policy, task)
    v = exact_policy_values(solution, logp, config.train.beta)
    j = float((solution.prompt_probs * v[0][:, 0]).sum())
    assert j == pytest.approx(solution.evaluate(logp)["objective"], abs=1e-9)


def test_groups_are_sampled_as_train_samples_per_prompt_samples_them(run_dir, tmp_path):
    """Six groups of two over the run's four prompts: two prompts are drawn twice, yet every
    group stays its own (grouping by prompt would merge them into groups of four)."""
    shown = explain(run_dir, samples=6, group_size=2, seed=0, out=tmp_path)
    batch = shown.batch
    assert batch.group_index.tolist() == [g for g in range(6) for _ in range(2)]
    assert (batch.prompt_index[::2] % 4).tolist() == [0, 1, 2, 3, 0, 1]
    rloo = shown.credit["RLOO"][:, 0]  # the sequence credit, on every token of a response
    assert torch.allclose(rloo.view(6, 2).sum(1), torch.zeros(6, dtype=rloo.dtype), atol=1e-5)  # r1-r2 + r2-r1


def test_an_outside_plugins_advantage_gets_its_own_row(tmp_path):
    """The outside-plugin fixture's ``signed-return`` (no explain code of its own): the run
    that used it is shown with its own components."""
    from helpers import TINY

    from tokenmdp.config import load_config

    run_dir = tmp_path / "outside"
    Trainer(load_config(None, [*TINY, *DELAYED, "algorithm.advantage=signed-return", f"run.dir={run_dir}"])).train()
    shown = explain(run_dir, samples=2, seed=0, out=tmp_path / "out")
    label = "this run: kl-penalised-reward + signed-return"
    assert label in shown.labels and label in shown.html.read_text()
    assert -1.0 <= shown.correlations[label] <= 1.0
    assert set(shown.credit[label][shown.batch.response_mask.bool()].abs().unique().tolist()) <= {0.0, 1.0}


def test_a_plugin_contributes_credit_views_through_the_hook(run_dir, tmp_path):
    """``tokenmdp_credit_views``: a plugin's rows appear in its order among the built-ins'."""
    import tokenmdp
    from tokenmdp.plugin.registry import plugin_manager

    def ones(explain):
        yield "all ones", "1 on every real token", explain.batch.response_mask.double()

    class Views:
        @tokenmdp.hookimpl
        def tokenmdp_credit_views(self, explain):
            assert explain.batch.size == 2 * 8 and explain.run.estimator.name == "kl-penalised-reward"
            return [tokenmdp.CreditView("ones", ones, order=15)]

    pm = plugin_manager(extra_plugins=[Views()])
    with mock.patch("tokenmdp.training.envs.plugin_manager", lambda: pm):  # what load_run loads
        shown = explain(run_dir, samples=2, seed=0, out=tmp_path)
    assert shown.labels.index("all ones") == 2  # after Inverse-Q*'s two rows (order 10), before GAE (20)
    assert math.isnan(shown.correlations["all ones"])  # constant credit: no correlation


def test_the_prefix_trees_carry_the_solvers_values_and_say_what_they_cut(run_dir, explained):
    """On each branch: pi (the run's policy), pi_ref, pi*, A* and the reward at that state
    and token; the trees are bounded by reach probability and by a node limit, and count
    what they leave out."""
    from tokenmdp.mdp.solver import prefix_index, tree_logprobs
    from tokenmdp.reports.explorer import prefix_trees

    config, _, task, policy, reference, _ = load_run(run_dir)
    solution = solve(task, reference, config.train.beta)
    logp = tree_logprobs(policy, task)
    trees = page_json(explained.html)["trees"]
    shown_prompts = [int(explained.batch.prompt_index[row]) for row in explained.shown]
    assert [tree["prompt_index"] for tree in trees] == list(dict.fromkeys(shown_prompts))
    for tree in trees:
        p, nodes = tree["prompt_index"], tree["nodes"]
        # vocabulary 4, horizon 3, EOS 0: 4 + 3*4 + 9*4 branches; all reached with p >= 1e-3 here
        assert tree["total"] == 52 and tree["shown"] == len(nodes) - 1 == 52 - tree["cut_reach"]
        for node in nodes[1:]:
            path, up = [], node["parent"]
            while up:
                path.insert(0, nodes[up]["id_token"])
                up = nodes[up]["parent"]
            t, a = node["depth"], node["id_token"]
            assert t == len(path) and node["id"] in nodes[node["parent"]]["kids"]
            s = int(prefix_index(torch.tensor([path], dtype=torch.long).view(1, t), task.vocab_size))
            expect = {
                "pi": logp[t][p, s, a].exp(),
                "ref": solution.ref_logp[t][p, s, a].exp(),
                "opt": solution.opt_logp[t][p, s, a].exp(),
                "a": solution.advantages(t)[p, s, a],
                "r": solution.rewards[t][p, s, a],
            }
            for key, value in expect.items():
                assert node[key] == pytest.approx(float(value), rel=1e-5, abs=1e-9), key
            assert node["end"] == (t == task.horizon - 1 or a == task.eos_token)
    small = prefix_trees(solution, logp, [0, 1], str, str, max_nodes=10, min_reach=0.05)
    for tree in small:
        nodes = tree["nodes"]
        assert tree["shown"] == 5 and tree["cut_reach"] > 0 and tree["cut_limit"] > 0  # 10 branches over 2 prompts
        assert sum(node["hidden"] for node in nodes) == tree["cut_reach"] + tree["cut_limit"]
        assert all(max(node["reach_pi"], node["reach_opt"]) >= 0.05 for node in nodes[1:])
