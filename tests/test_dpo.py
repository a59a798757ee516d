"""DPO / IPO / online DPO / TDPO: the losses against hand-written formulas, the pair file's
errors, the sampled pairs' labels, online re-sampling, the pair budget, and small runs
that must beat the reference policy."""

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import TINY, train_until_interrupted

import tokenmdp
from tokenmdp.config import load_config
from tokenmdp.mdp.env import TokenMDPEnv
from tokenmdp.mdp.task import TokenTask
from tokenmdp.plugin.batch import token_logprobs
from tokenmdp.training.preferences import load_pair_file
from tokenmdp.training.trainer import Trainer
from tokenmdp_dpo import dpo_loss, sequence_kl, sequence_logratio, sequence_rewards, tdpo_loss
from tokenmdp_dpo.components import score_pairs

ROOT = Path(__file__).resolve().parents[1]
GOOD_FILE = ROOT / "tests" / "fixtures" / "prefs_pattern_v4h3.jsonl"

#: A small instance on which DPO trains in about a second (beta/lr as tuned for it).
SMALL = [
    "env.vocab_size=4",
    "env.horizon=3",
    "policy.hidden=32",
    "reference.sft_samples=1024",
    "train.steps=10",
    "train.batch_size=32",
    "train.eval_every=5",
    "estimator.num_pairs=1024",
    "updater.beta=7",
    "updater.lr=3e-3",
]


def dpo_config(tmp_path, *overrides, name="run", recipe="dpo"):
    return load_config(None, [*TINY, f"algorithm.name={recipe}", f"run.dir={tmp_path / name}", *overrides])


def built(config):
    trainer = Trainer(config)
    trainer.build_models()
    return trainer


def at_step(trainer, step):
    ctx = trainer.ctx
    ctx.step, ctx.generator = step, torch.Generator().manual_seed(1000 + step)
    return ctx


def rows(pairs):
    """Each pair as a hashable (prompt, chosen, rejected) tuple."""

    def seq(ids, mask):
        return tuple(ids[: int(mask.sum())].tolist())

    return [
        (
            tuple(pairs.prompt_ids[i].tolist()),
            seq(pairs.chosen_ids[i], pairs.chosen_mask[i]),
            seq(pairs.rejected_ids[i], pairs.rejected_mask[i]),
        )
        for i in range(pairs.size)
    ]


# --- the losses against direct formulas ------------------------------------------------


def random_pair_logits(n=5, t=4, v=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * n, t, v, generator=g, dtype=torch.float64).requires_grad_()
    ref_logits = torch.randn(2 * n, t, v, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (2 * n, t), generator=g)
    mask = torch.ones(2 * n, t, dtype=torch.float64)
    mask[0, 3:] = 0  # one shorter response: padding must not count
    mask[n + 1, 2:] = 0
    return logits, ref_logits, ids, mask


def taken(logits, ids):
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 1.0, 7.0])
def test_pair_loss_and_its_gradient_match_the_formula(kind, beta):
    n = 5
    logits, ref_logits, ids, mask = random_pair_logits(n)
    ratio = sequence_logratio(taken(logits, ids), taken(ref_logits, ids), mask)
    chosen, rejected = ratio[:n], ratio[n:]
    loss = dpo_loss(chosen, rejected, beta, kind)
    m = (chosen - rejected).detach()
    if kind == "sigmoid":  # -log sigmoid(beta m) = log(1 + exp(-beta m)); d/dm = -beta sigmoid(-beta m)
        expect, dloss_dm = torch.log1p(torch.exp(-beta * m)), -beta * torch.sigmoid(-beta * m)
    else:  # (m - 1/(2 beta))^2; d/dm = 2 (m - 1/(2 beta))
        expect, dloss_dm = (m - 1 / (2 * beta)) ** 2, 2 * (m - 1 / (2 * beta))
    assert torch.allclose(loss, expect, atol=1e-10)
    loss.sum().backward()
    # chain rule by hand: d logratio / d logits_t = (onehot(y_t) - softmax(logits_t)) on real tokens
    dlogp = (torch.nn.functional.one_hot(ids, logits.shape[-1]) - torch.softmax(logits.detach(), -1)) * mask[..., None]
    sign = torch.cat([dloss_dm, -dloss_dm])[:, None, None]
    assert torch.allclose(logits.grad, sign * dlogp, atol=1e-10)
    assert logits.grad[0, 3:].abs().max() == 0  # padding gets no gradient


def test_tdpo_loss_matches_the_formula_and_stops_the_chosen_kl_gradient():
    n, beta, alpha = 5, 2.0, 0.4
    logits, ref_logits, ids, mask = random_pair_logits(n, seed=1)
    kl = sequence_kl(ref_logits, logits, mask)
    p_ref, p = torch.softmax(ref_logits, -1), torch.softmax(logits.detach(), -1)
    direct = ((p_ref * (p_ref.log() - p.log())).sum(-1) * mask).sum(1)
    assert torch.allclose(kl.detach(), direct, atol=1e-10) and (direct > 0).all()
    ratio = sequence_logratio(taken(logits, ids), taken(ref_logits, ids), mask)
    w, lo, kw, kl_ = ratio[:n], ratio[n:], kl[:n], kl[n:]
    u = beta * (w - lo)
    one = tdpo_loss(w, lo, kw, kl_, beta, "tdpo1")
    assert torch.allclose(one, -torch.nn.functional.logsigmoid(u - beta * (kl_ - kw)), atol=1e-10)
    two = tdpo_loss(w, lo, kw, kl_, beta, "tdpo2", alpha)
    assert torch.allclose(two, -torch.nn.functional.logsigmoid(u - alpha * beta * (kl_ - kw)), atol=1e-10)
    # equal KLs: TDPO1 is DPO
    assert torch.allclose(tdpo_loss(w, lo, kw, kw, beta, "tdpo1"), dpo_loss(w, lo, beta), atol=1e-12)
    # TDPO2 stops the gradient through the chosen KL; TDPO1 does not
    for variant, flows in (("tdpo2", False), ("tdpo1", True)):
        w_leaf, kw_leaf, kl_leaf = (x.detach().requires_grad_() for x in (w, kw, kl_))
        grads = torch.autograd.grad(
            tdpo_loss(w_leaf, lo.detach(), kw_leaf, kl_leaf, beta, variant, alpha).sum(),
            [kw_leaf, kl_leaf],
            allow_unused=True,
        )
        assert grads[1].abs().min() > 0  # the rejected KL always gets a gradient
        assert (grads[0] is not None and grads[0].abs().min() > 0) == flows, variant


def test_scoring_a_pair_batch_matches_scoring_each_side(tmp_path):
    trainer = built(dpo_config(tmp_path, "estimator.num_pairs=64"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    pairs = trainer.composition.estimator.pairs.select(torch.arange(9))
    scores = score_pairs(trainer.ctx, pairs)
    responses = pairs.responses()
    logp = token_logprobs(trainer.policy, responses)
    ref = token_logprobs(trainer.reference, responses)
    expect = ((logp - ref) * responses.response_mask).sum(1)
    assert torch.allclose(torch.cat([scores.chosen, scores.rejected]), expect, atol=1e-5)
    assert scores.chosen.abs().max() > 1e-4  # the policy differs from the reference


def test_tdpo_scores_its_sequence_kl_through_the_kernel_as_the_formula_gives_it(tmp_path):
    """``score_pairs(..., kl=True)``: the log-ratios of the plain scoring, and each
    response's SeqKL(pi_ref || pi) equal to :func:`sequence_kl` on the whole logits."""
    trainer = built(dpo_config(tmp_path, "estimator.num_pairs=64", "algorithm.updater=tdpo"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    pairs = trainer.composition.estimator.pairs.select(torch.arange(9))
    plain, scores = score_pairs(trainer.ctx, pairs), score_pairs(trainer.ctx, pairs, kl=True)
    assert plain.sequence_kl is None
    torch.testing.assert_close(scores.chosen, plain.chosen, rtol=0, atol=0)
    torch.testing.assert_close(scores.rejected, plain.rejected, rtol=0, atol=0)
    responses = pairs.responses()
    _, logits = token_logprobs(trainer.policy, responses, return_logits=True)
    _, ref_logits = token_logprobs(trainer.reference, responses, return_logits=True)
    expect = sequence_kl(ref_logits, logits, responses.response_mask)
    torch.testing.assert_close(scores.sequence_kl, expect, rtol=0, atol=0)
    assert scores.sequence_kl.min() > 0 and scores.sequence_kl.requires_grad


# --- pairs from a file ------------------------------------------------------------------

GOOD = '{"prompt": [0], "chosen": [3, 1, 3], "rejected": [0, 3, 1]}'
BAD_LINES = {
    "bad json": ('{"prompt": [0], "chosen": [3, 1, 3], ', "not valid JSON"),
    "missing key": ('{"prompt": [0], "chosen": [3, 1, 3]}', "missing key.*'rejected'"),
    "not an object": ("[1, 2, 3]", "expected a JSON object"),
    "id out of range": ('{"prompt": [0], "chosen": [3, 9, 3], "rejected": [0, 3, 1]}', "token id 9 is out of range"),
    "negative id": ('{"prompt": [0], "chosen": [3, 1, 3], "rejected": [-1]}', "token id -1 is out of range"),
    "empty response": ('{"prompt": [0], "chosen": [], "rejected": [0, 3, 1]}', "'chosen' is an empty response"),
    "too long": ('{"prompt": [0], "chosen": [1, 1, 1, 1], "rejected": [0]}', "more than env.horizon"),
    "unknown prompt": ('{"prompt": [2, 2], "chosen": [3], "rejected": [0]}', "is not a prompt of env 'Pattern'"),
    "text on a toy task": ('{"prompt": [0], "chosen": "hello", "rejected": [0]}', "has no tokenizer"),
    "not ids": ('{"prompt": [0], "chosen": [1.5], "rejected": [0]}', "must be a list of token ids"),
    "same response": ('{"prompt": [1], "chosen": [2, 2], "rejected": [2, 2]}', "the same response"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_pair_file_is_a_config_error_naming_the_line(tmp_path, case):
    line, message = BAD_LINES[case]
    path = tmp_path / "prefs.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")  # the bad line is line 3 (a blank line 2 is skipped)
    trainer = Trainer(dpo_config(tmp_path, "estimator.pairs=file", f"estimator.path={path}", "train.steps=2"))
    with pytest.raises(tokenmdp.ConfigError, match=rf"prefs\.jsonl' line 3: .*{message}"):
        trainer.train()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # raised in setup, before any step
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_pair_file_prompts_of_a_task_without_a_prompt_table_are_checked_like_any_prompt(tmp_path):
    task = TokenTask(vocab_size=4, horizon=3)  # no prompt table: any prompt of input ids 0..5
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": [4, 2], "chosen": [3, 1], "rejected": [0]}\n')
    pairs = load_pair_file(path, task)
    assert pairs.prompt_ids.tolist() == [[4, 2]] and pairs.prompt_index.tolist() == [-1]
    for prompt, message in [
        ("[6]", "'prompt' token id 6 is out of range; prompt tokens are 0..5"),
        ("[]", "'prompt' is an empty prompt"),
    ]:
        path.write_text(f'{{"prompt": {prompt}, "chosen": [3, 1], "rejected": [0]}}\n')
        with pytest.raises(tokenmdp.ConfigError, match=rf"line 1: {re.escape(message)}"):
            load_pair_file(path, task)


def test_pair_file_set_up_errors(tmp_path):
    with pytest.raises(tokenmdp.ConfigError, match="pairs='file' needs path"):
        Trainer(dpo_config(tmp_path, "estimator.pairs=file"))
    with pytest.raises(tokenmdp.ConfigError, match="online = true re-samples pairs"):
        Trainer(dpo_config(tmp_path, "estimator.pairs=file", f"estimator.path={GOOD_FILE}", "estimator.online=true"))
    with pytest.raises(tokenmdp.ConfigError, match="not found"):
        Trainer(dpo_config(tmp_path, "estimator.pairs=file", f"estimator.path={tmp_path / 'nope.jsonl'}")).train()
    with pytest.raises(tokenmdp.ConfigError, match="holds only 48"):
        built(dpo_config(tmp_path, "estimator.pairs=file", f"estimator.path={GOOD_FILE}", "estimator.num_pairs=50"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(tokenmdp.ConfigError, match="holds no pairs"):
        built(dpo_config(tmp_path, "estimator.pairs=file", f"estimator.path={tmp_path / 'empty.jsonl'}"))


def test_good_pair_file_loads_and_trains(tmp_path):
    config = dpo_config(
        tmp_path,
        "estimator.pairs=file",
        f"estimator.path={GOOD_FILE}",
        "train.steps=6",
        "updater.lr=3e-3",
        "updater.minibatch_size=16",
    )
    trainer = Trainer(config)
    summary = trainer.train()
    pairs = trainer.composition.estimator.pairs
    lines = [json.loads(line) for line in GOOD_FILE.read_text().splitlines()]
    assert pairs.size == len(lines) == 48
    assert rows(pairs)[:2] == [((4, 0), (3, 1, 3), (0, 3, 1)), ((4, 1), (3, 2, 3), (0, 3, 3))]  # BOS optional
    assert pairs.prompt_index[:4].tolist() == [0, 1, 2, 3]
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["dpo/pairs_seen"] == 3 * 48 and metrics[-1]["dpo/pairs_labelled"] == 48
    assert metrics[-1]["dpo/accuracy"] > 0.9  # the file's preferences were learnt
    assert "dpo/tie_frac" not in metrics[-1] and "dpo/env_reward_gap" not in metrics[-1]
    assert summary["used_env_reward"] is False and math.isfinite(summary["regret_frac"])


def test_pair_file_responses_of_different_lengths_share_one_width(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        '{"prompt": [0], "chosen": [3, 1, 3], "rejected": [2]}\n{"prompt": [1], "chosen": [3], "rejected": [0, 3]}\n'
    )
    trainer = built(dpo_config(tmp_path, "estimator.pairs=file", f"estimator.path={path}", "train.steps=2"))
    pairs = trainer.composition.estimator.pairs
    assert pairs.chosen_ids.shape == pairs.rejected_ids.shape == (2, 3)
    assert rows(pairs) == [((4, 0), (3, 1, 3), (2,)), ((4, 1), (3,), (0, 3))]
    scores = score_pairs(trainer.ctx, pairs)  # both sides in one forward pass
    assert scores.chosen.shape == scores.rejected.shape == (2,)


# --- sampled pairs ----------------------------------------------------------------------


def test_sampled_pairs_drop_ties_and_prefer_the_higher_reward(tmp_path):
    trainer = built(dpo_config(tmp_path, "estimator.num_pairs=200"))
    est = trainer.composition.estimator
    pairs, task = est.pairs, trainer.task
    assert pairs.size == 200
    assert est.tie_frac > 0.1  # Pattern with V=4, H=3 ties often: those candidates were dropped
    assert (pairs.chosen_env_reward > pairs.rejected_env_reward).all()
    # the labels agree with the rewards the single-episode env pays, step by step
    env = TokenMDPEnv(task)
    for i in range(30):
        for ids, mask, label in (
            (pairs.chosen_ids, pairs.chosen_mask, pairs.chosen_env_reward),
            (pairs.rejected_ids, pairs.rejected_mask, pairs.rejected_env_reward),
        ):
            env.reset(options={"prompt_index": int(pairs.prompt_index[i])})
            total = sum(env.step(a)[1] for a in ids[i, : int(mask[i].sum())].tolist())
            assert total == pytest.approx(float(label[i]), abs=1e-6)
    assert (
        sequence_rewards(task, pairs.prompt_index, pairs.chosen_ids, pairs.chosen_mask) == pairs.chosen_env_reward
    ).all()
    # the offline set is fixed: seeded by train.seed, the same on every build
    again = built(dpo_config(tmp_path, "estimator.num_pairs=200", name="again")).composition.estimator.pairs
    assert rows(again) == rows(pairs)


def test_bradley_terry_labels_sometimes_prefer_the_lower_reward(tmp_path):
    pairs = built(
        dpo_config(tmp_path, "estimator.num_pairs=400", "estimator.labels=bradley-terry")
    ).composition.estimator.pairs
    flipped = float((pairs.chosen_env_reward < pairs.rejected_env_reward).float().mean())
    gap = (pairs.chosen_env_reward - pairs.rejected_env_reward).abs()
    assert (gap > 0).all()  # still no ties
    # P(flip) = sigmoid(-|dR| / beta): about 0.27 for |dR| = 1 at beta = 1
    expect = float(torch.sigmoid(-gap).mean())
    assert 0.5 * expect < flipped < 1.5 * expect


def test_offline_pairs_are_used_exactly_epochs_times_over_the_run(tmp_path):
    trainer = built(dpo_config(tmp_path, "estimator.num_pairs=50", "estimator.epochs=3", "train.steps=7"))
    est = trainer.composition.estimator
    served, seen = [], []
    for step in range(1, 8):
        pairs = est.step_pairs(at_step(trainer, step))
        served += rows(pairs)
        seen.append(pairs.info["dpo/pairs_seen"])
    assert Counter(served) == Counter(rows(est.pairs) * 3)  # every pair 3 times, no more
    assert seen == [len(served) * k // 7 for k in range(1, 8)]  # an even share of the passes per step


def test_online_pairs_are_resampled_each_round_from_the_current_policy(tmp_path):
    config = dpo_config(tmp_path, "estimator.num_pairs=300", "train.steps=3", recipe="dpo-online")
    trainer = built(config)
    est = trainer.composition.estimator
    first = est.step_pairs(at_step(trainer, 1))
    second = est.step_pairs(at_step(trainer, 2))
    assert set(rows(first)) != set(rows(second))
    assert first.info["dpo/pairs_labelled"] == 100 and second.info["dpo/pairs_labelled"] == 200
    assert first.size == second.size == 300  # 100 fresh pairs x 3 epochs
    assert (second.chosen_env_reward > second.rejected_env_reward).all()
    # make the policy prefer token 0 strongly: the next round's responses follow the policy
    with torch.no_grad():
        trainer.policy.head.bias[0] += 4.0
    third = est.step_pairs(at_step(trainer, 3))
    assert third.info["dpo/pairs_labelled"] == 300

    def share_of_zero(pairs):
        ids = torch.cat([pairs.chosen_ids, pairs.rejected_ids])
        mask = torch.cat([pairs.chosen_mask, pairs.rejected_mask]).bool()
        return float((ids[mask] == 0).float().mean())

    assert share_of_zero(third) > 0.6 > 0.4 > share_of_zero(second)


def test_online_rounds_keep_their_pairs_for_the_round(tmp_path):
    trainer = built(
        dpo_config(tmp_path, "estimator.num_pairs=120", "estimator.rounds=2", "train.steps=4", recipe="dpo-online")
    )
    est = trainer.composition.estimator
    served = [est.step_pairs(at_step(trainer, k)) for k in range(1, 5)]
    round_one = set(rows(served[0])) | set(rows(served[1]))
    round_two = set(rows(served[2])) | set(rows(served[3]))
    assert len(round_one) <= 60 and round_one != round_two
    assert [p.info["dpo/pairs_labelled"] for p in served] == [60, 60, 120, 120]
    assert [p.info["dpo/pairs_seen"] for p in served] == [90, 180, 270, 360]


def test_impossible_budgets_and_rounds_are_config_errors(tmp_path):
    with pytest.raises(tokenmdp.ConfigError, match="every step needs at least one pair"):
        built(dpo_config(tmp_path, "estimator.num_pairs=2", "estimator.epochs=1", "train.steps=4"))
    with pytest.raises(tokenmdp.ConfigError, match="rounds = 9 is more than train.steps = 4"):
        built(dpo_config(tmp_path, "estimator.rounds=9", recipe="dpo-online"))
    with pytest.raises(tokenmdp.ConfigError, match="rounds is read only with online"):
        Trainer(dpo_config(tmp_path, "estimator.rounds=2"))
    with pytest.raises(tokenmdp.ConfigError, match="loss must be one of"):
        Trainer(dpo_config(tmp_path, "updater.loss=hinge"))
    with pytest.raises(tokenmdp.ConfigError, match="labels sampled pairs"):
        Trainer(
            dpo_config(
                tmp_path, "estimator.pairs=file", f"estimator.path={GOOD_FILE}", "estimator.labels=bradley-terry"
            )
        )


# --- training -----------------------------------------------------------------------------


@pytest.mark.parametrize("env", ["Pattern", "Forbidden"])
def test_offline_dpo_beats_the_reference_on_a_small_instance(tmp_path, env):
    summary = Trainer(dpo_config(tmp_path, f"env.id=tokenmdp/{env}-v0", *SMALL)).train()
    assert summary["start"]["regret"] > 0.05
    assert summary["regret_frac"] < 0.75, summary
    assert summary["credit_corr"] is not None and math.isfinite(summary["credit_corr"])
    assert summary["credit_corr"] > 0.3  # the implicit token reward tracks the true A*
    assert summary["used_env_reward"] is False and summary["recipe"] == "dpo"


@pytest.mark.parametrize("recipe", ["tdpo", "dpo-online"])
def test_tdpo_and_online_dpo_train_and_every_metric_is_documented(tmp_path, recipe):
    config = dpo_config(tmp_path, *SMALL, "train.steps=6", "estimator.num_pairs=600", recipe=recipe)
    summary = Trainer(config).train()
    assert summary["regret_frac"] < 0.9, summary
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    assert {
        "losses/dpo",
        "dpo/accuracy",
        "dpo/margin",
        "dpo/chosen_reward",
        "dpo/rejected_reward",
        "dpo/pairs_seen",
        "dpo/pairs_labelled",
        "dpo/pair_tokens",
        "credit_corr",
    } <= keys
    if recipe == "tdpo":
        assert {"tdpo/seq_kl_chosen", "tdpo/seq_kl_rejected"} <= keys
        assert lines[-1]["tdpo/seq_kl_chosen"] > 0
    else:
        assert lines[-1]["dpo/pairs_labelled"] == 600 and lines[1]["dpo/pairs_labelled"] == 100
    documented = set(re.findall(r"`([^`\n]+)`", (ROOT / "docs" / "metrics.md").read_text()))
    assert not sorted(keys - documented), f"undocumented metrics: {sorted(keys - documented)}"


def test_online_dpo_resume_reproduces_an_uninterrupted_run(tmp_path):
    common = [*SMALL, "train.steps=6", "estimator.num_pairs=300", "estimator.rounds=3"]
    Trainer(dpo_config(tmp_path, *common, name="full", recipe="dpo-online")).train()
    trainer = Trainer(dpo_config(tmp_path, *common, "run.checkpoint_every=3", name="part", recipe="dpo-online"))
    # round 2 is steps 3-4: the checkpoint after step 3 must carry its pairs
    train_until_interrupted(trainer, at_step=4)
    Trainer.from_run_dir(tmp_path / "part").train()
    full = (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    part = (tmp_path / "part/metrics.jsonl").read_text().splitlines()
    assert part == full


def test_recipes_and_configs(tmp_path):
    registry = tokenmdp.Registry(tokenmdp.plugin_manager())
    for name in ("dpo", "dpo-online", "tdpo"):
        recipe = registry.recipe(name)
        assert recipe.supervision == "pairs" and recipe.estimator == "preference-pairs"
    for path in ("dpo.toml", "dpo_online.toml", "tdpo.toml"):
        config = load_config(ROOT / "configs" / path, [f"run.dir={tmp_path / path}"])
        trainer = Trainer(config)
        assert trainer.composition.estimator.name == "preference-pairs"
        assert not trainer.composition.needs_env_reward
