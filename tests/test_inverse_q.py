"""Inverse-Q*: exact oracle rewards, the fixed-point fact, convergence, reward-free guide runs."""

import pytest
import torch
from helpers import TINY

import tokenmdp
from tokenmdp import CompositionError
from tokenmdp.config import load_config
from tokenmdp.mdp.solver import prefix_index, solve, tree_logprobs
from tokenmdp.mdp.task import TokenTask
from tokenmdp.plugin.batch import token_logprobs
from tokenmdp.policies import GRUPolicy
from tokenmdp.training.rollout import collect
from tokenmdp.training.trainer import Trainer
from tokenmdp_envs import PatternTask


def iq_config(tmp_path, *overrides, name="run"):
    return load_config(None, [*TINY, "algorithm.name=inverse-q", f"run.dir={tmp_path / name}", *overrides])


def first_batch(trainer):
    trainer.build_models()
    ctx = trainer.ctx
    ctx.step, ctx.generator = 1, torch.Generator().manual_seed(0)
    batch = collect(trainer.policy, trainer.env, seed=0, generator=ctx.generator)
    batch.logprobs = token_logprobs(trainer.policy, batch).detach()
    batch.ref_logprobs = token_logprobs(trainer.reference, batch).detach()
    est, adv, _ = trainer.composition.components
    signals = est.estimate(batch, ctx)
    return batch, signals, adv.construct(batch, signals, ctx)


@pytest.mark.parametrize("env", ["Pattern", "SumMod", "Forbidden"])
def test_oracle_token_rewards_are_the_exact_advantages(tmp_path, env):
    trainer = Trainer(
        iq_config(
            tmp_path,
            f"env.id=tokenmdp/{env}-v0",
            "env.vocab_size=6",
            "env.horizon=5",
            "estimator.source=oracle",
            "train.batch_size=64",
            "advantage.form=return",
        )
    )
    batch, signals, out = first_batch(trainer)
    true = trainer.evaluator.solution.token_advantages(batch.prompt_index, batch.response_ids, batch.response_mask)
    assert (out["token_rewards"].double() - true).abs().max() < 1e-5
    # form="return": the suffix sum at t=0 telescopes to R(x, y) - V*(x)
    v_star = trainer.evaluator.solution.v[0][batch.prompt_index, 0]
    task_rewards = trainer.env.task  # env is reward-free here: recompute R through the task
    rewards = torch.zeros(batch.size, dtype=torch.float64)
    for t in range(batch.response_ids.shape[1]):
        table = task_rewards.next_token_rewards(batch.prompt_index, batch.response_ids[:, :t])
        rewards += table.gather(1, batch.response_ids[:, t : t + 1]).squeeze(1).double() * batch.response_mask[:, t]
    assert torch.allclose(out["advantages"][:, 0].double(), rewards - v_star, atol=1e-5)


class RatioTask(TokenTask):
    """A task whose token reward is ``beta * log pi_hat/pi_ref``, read off the prefix tree."""

    def __init__(self, base, hat_logp, ref_logp, beta):
        super().__init__(base.vocab_size, base.horizon, base.seed)
        self.base, self.hat, self.ref, self.beta = base, hat_logp, ref_logp, beta

    @property
    def prompts(self):
        return self.base.prompts

    def base_logits(self, prompt_index, prefix):
        return self.base.base_logits(prompt_index, prefix)

    def dense_rewards(self, prompt_index, prefix):
        t, index = prefix.shape[1], prefix_index(prefix, self.vocab_size)
        return (self.beta * (self.hat[t] - self.ref[t])[prompt_index, index]).float()


def test_fixed_point_fact(tmp_path):
    """Token reward beta*log(pi_hat/pi_ref) with KL coefficient beta: the objective is
    -beta * KL(pi || pi_hat), so the optimum is pi_hat itself."""
    base = PatternTask(vocab_size=3, horizon=3)
    torch.manual_seed(0)
    ref, hat, other = (GRUPolicy(base.input_vocab_size, 3, hidden=8) for _ in range(3))
    ref_logp, hat_logp = tree_logprobs(ref, base), tree_logprobs(hat, base)
    beta = 0.7
    solution = solve(RatioTask(base, hat_logp, ref_logp, beta), ref, beta, ref_logp=ref_logp)
    for t in range(3):
        assert torch.allclose(solution.opt_logp[t], hat_logp[t], atol=1e-6)
    assert abs(solution.j_star) < 1e-6  # J(pi_hat) = 0 = max
    scores = solution.evaluate(tree_logprobs(other, base))
    # J(pi) = E[sum r] - beta KL(pi||pi_ref) = -beta KL(pi || pi_hat)
    kl_to_hat = solve(base, hat, beta).evaluate(tree_logprobs(other, base))["kl_ref"]
    assert scores["objective"] == pytest.approx(-beta * kl_to_hat, rel=1e-5)


@pytest.mark.parametrize("updater", ["reverse-kl", "clipped-pg"])
@pytest.mark.parametrize("env", ["Pattern", "SumMod"])
def test_oracle_training_converges(tmp_path, env, updater):
    steps = {"reverse-kl": 40, "clipped-pg": 120}[updater]
    config = iq_config(
        tmp_path,
        f"env.id=tokenmdp/{env}-v0",
        "estimator.source=oracle",
        f"algorithm.updater={updater}",
        "policy.hidden=32",
        "train.batch_size=64",
        f"train.steps={steps}",
        "train.eval_every=1000",
    )
    summary = Trainer(config).train()
    assert summary["start"]["regret"] > 0.05
    assert summary["regret_frac"] < 0.05, summary
    assert summary["credit_corr"] == pytest.approx(1.0, abs=1e-6)  # oracle credit is exact


def test_guide_run_never_reads_the_reward(tmp_path):
    config = iq_config(tmp_path, "reference.tagged_samples=256", "estimator.source=guide")
    trainer = Trainer(config)
    assert not trainer.composition.needs_env_reward
    assert not trainer.env.compute_rewards
    trainer.build_models()  # SFT data + exact evaluator: the only reward reads
    reads = trainer.task.reward_calls
    trainer.build_models = lambda: None
    summary = trainer.train()
    assert trainer.task.reward_calls == reads
    assert summary["used_env_reward"] is False
    assert {"ceiling", "ceiling_kl_ref"} <= set(summary)


def test_guide_scoring_is_one_forward_pass_under_the_guide(tmp_path):
    trainer = Trainer(iq_config(tmp_path, "estimator.source=guide", "estimator.guide=[5]"))
    trainer.build_models()
    calls = []
    trainer.reference.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    batch, signals, _ = first_batch_without_rebuild(trainer)
    assert len(calls) == 2  # ref_logprobs + the guide-prefixed target, one pass each
    direct = token_logprobs(trainer.reference, batch, prefix_ids=torch.tensor([5]))
    assert torch.allclose(signals["target_logprobs"], direct, atol=1e-6)
    assert calls[-1][1] == 1 + batch.prompt_ids.shape[1] + batch.response_ids.shape[1]


def first_batch_without_rebuild(trainer):
    trainer.build_models = lambda: None
    return first_batch(trainer)


def test_teacher_source_scores_under_a_trained_run(tmp_path):
    teacher_dir = tmp_path / "teacher"
    Trainer(load_config(None, [*TINY, f"run.dir={teacher_dir}"])).train()
    trainer = Trainer(iq_config(tmp_path, "estimator.source=teacher", f"estimator.teacher={teacher_dir}"))
    batch, signals, _ = first_batch(trainer)
    teacher = tokenmdp.load_policy(teacher_dir, trainer.task)
    assert torch.allclose(signals["target_logprobs"], token_logprobs(teacher, batch), atol=1e-6)
    with pytest.raises(tokenmdp.ConfigError, match="source='teacher' needs teacher"):
        Trainer(iq_config(tmp_path, "estimator.source=teacher", name="x"))


def test_phi_policy_uses_the_current_policy(tmp_path):
    trainer = Trainer(iq_config(tmp_path, "estimator.phi=policy"))
    trainer.build_models()
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(0.1)
    batch, signals, _ = first_batch_without_rebuild(trainer)
    expect = token_logprobs(trainer.policy, batch, prefix_ids=trainer.ctx.guide_ids)
    assert torch.allclose(signals["target_logprobs"], expect, atol=1e-6)


def test_log_ratio_options(tmp_path):
    trainer = Trainer(iq_config(tmp_path, "estimator.source=oracle", "advantage.kappa=0.05", "advantage.beta=2.0"))
    batch, signals, out = first_batch(trainer)
    raw = 2.0 * (signals["target_logprobs"] - batch.ref_logprobs) * batch.response_mask
    assert torch.allclose(out["token_rewards"], raw.clamp(-0.05, 0.05))
    assert out["token_rewards"].abs().max() <= 0.05 + 1e-7
    assert (raw.abs() > 0.05).any()  # the clip did something
    white = Trainer(iq_config(tmp_path, "estimator.source=oracle", "advantage.whiten=true", name="w"))
    batch, _, out = first_batch(white)
    real = out["advantages"][batch.response_mask.bool()]
    assert real.mean().abs() < 1e-5 and (real.std(unbiased=False) - 1).abs() < 1e-3


def test_reverse_kl_reads_the_target_distribution_so_full_vocab_changes_nothing(tmp_path):
    """reverse-kl reads ``target_distribution`` (a toy policy's: its whole log-probs), so the
    whole ``target_logits`` are only for components that read them: the two runs are the same."""
    metrics = []
    for flag in ("true", "false"):
        Trainer(iq_config(tmp_path, "algorithm.updater=reverse-kl", f"estimator.full_vocab={flag}", name=flag)).train()
        metrics.append((tmp_path / flag / "metrics.jsonl").read_text())
    assert metrics[0] == metrics[1]


def test_the_whole_target_logits_are_made_only_for_a_component_that_reads_them(tmp_path):
    """conditional-optimal skips the [B, T, V] target_logits that nothing later requires
    (read_later, set when composed), and gives them, equal to the distribution's whole
    log-probs, to a component that does (an outside updater, say)."""
    trainer = Trainer(iq_config(tmp_path, "algorithm.updater=reverse-kl"))
    estimator = trainer.composition.estimator
    assert "target_logits" in estimator.provides and "target_logits" not in estimator.read_later
    _, signals, _ = first_batch(trainer)
    assert "target_logits" not in signals and "target_distribution" in signals
    estimator.read_later = frozenset({"target_logits"})
    batch, signals, _ = first_batch(trainer)
    assert signals["target_logits"].shape == (*batch.response_ids.shape, trainer.task.vocab_size)
    torch.testing.assert_close(signals["target_logits"], signals["target_distribution"].whole(), rtol=0, atol=0)


def test_reverse_kl_after_an_estimator_without_the_distribution_is_an_impossible_composition(tmp_path):
    with pytest.raises(CompositionError, match="updater 'reverse-kl' requires signal\\(s\\) target_distribution"):
        Trainer(iq_config(tmp_path, "algorithm.name=reinforce", "algorithm.updater=reverse-kl"))


def test_clipped_pg_k3_and_metrics(tmp_path):
    summary = Trainer(iq_config(tmp_path, "updater.kl_estimator=k3", "updater.kl_coef=0.5")).train()
    import json

    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert {"policy/clipfrac", "policy/approxkl", "losses/kl", "losses/policy"} <= set(rows[1])
    assert rows[-1]["losses/kl"] > 0
    assert summary["updater"] == "clipped-pg"


GUIDE_SMALL = [
    "algorithm.name=inverse-q-distill",
    "estimator.source=guide",
    "env.vocab_size=4",
    "env.horizon=4",
    "reference.sft_samples=3000",
    "reference.tagged_samples=3000",
    "reference.sft_epochs=12",
    "policy.hidden=48",
    "train.steps=30",
    "train.batch_size=64",
    "updater.epochs=4",
    "updater.minibatches=4",
    "updater.lr=3e-3",
]


@pytest.mark.parametrize("env", ["Pattern", "Forbidden", "SumThreshold"])
def test_no_preference_experiment_small(tmp_path, env):
    """METHOD.md section 5 at small scale: no reward, no pairs, only the guide; the policy
    reaches the guided teacher's ceiling, and its token rewards track the true A*."""
    summary = Trainer(iq_config(tmp_path, f"env.id=tokenmdp/{env}-v0", *GUIDE_SMALL)).train()
    assert summary["used_env_reward"] is False
    assert summary["closure"] == pytest.approx(summary["ceiling"], abs=0.05)
    if env in ("Pattern", "Forbidden"):
        assert summary["closure"] >= 0.7, summary
    else:  # the delayed-reward env: dense credit from a terminal reward, without seeing it
        assert summary["credit_corr"] > 0.8, summary
