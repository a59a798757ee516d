"""PPO: GAE against a direct loop and its properties, the loss, the KL controller, the critic,
checkpoints, impossible compositions, and convergence on small instances."""

import json
import math
import types

import pytest
import torch
from helpers import TINY, train_until_interrupted
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenmdp
import tokenmdp.plugin.batch
import tokenmdp.training.rollout
from tokenmdp import CompositionError, ConfigError
from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.plugin.ops import suffix_sums
from tokenmdp.training.trainer import Trainer
from tokenmdp_ppo import GAE, KLController, PPORewards, gae, ppo_loss


def ppo_config(tmp_path, *overrides, name="run"):
    return load_config(None, [*TINY, "algorithm.name=ppo", f"run.dir={tmp_path / name}", *overrides])


# --- GAE ------------------------------------------------------------------------------------


def gae_loop(rewards, values, mask, gamma, lam):
    """The textbook recursion, one response and one token at a time, in float64."""
    advantages = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_value = float(values[b, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            last = delta + gamma * lam * last
            advantages[b, t] = last
    return advantages


def random_rollout(seed, batch=6, length=5, garbage=None):
    """Rewards, values and a prefix mask (1s then 0s; some rows may be empty or full)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).float()
    rewards = torch.randn(batch, length, generator=gen) * mask
    values = torch.randn(batch, length, generator=gen) * mask
    if garbage is not None:
        pad = mask == 0
        rewards = torch.where(pad, torch.full_like(rewards, garbage), rewards)
        values = torch.where(pad, torch.full_like(values, -garbage), values)
    return rewards, values, mask


def construct(rewards, values, mask, **options):
    constructor = GAE(GAE.Options(**options))
    batch = types.SimpleNamespace(response_mask=mask)
    return constructor.construct(batch, {"token_rewards": rewards, "values": values}, ctx=None)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_agrees_with_a_python_loop(gamma, lam):
    for seed in range(5):
        rewards, values, mask = random_rollout(seed, batch=8, length=6)
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        expected = gae_loop(rewards, values, mask, gamma, lam)
        assert torch.allclose(advantages.double(), expected, atol=1e-5)
        assert torch.allclose(returns, (advantages + values) * mask, atol=1e-6)


def test_gae_last_real_token_bootstraps_from_zero():
    rewards = torch.tensor([[1.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 100.0]])  # 100 sits on padding: never read
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[3.0 - 0.5, 2.0 - 0.25, 0.0]]
    assert returns.tolist() == [[3.0, 2.0, 0.0]]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 6),
    length=st.integers(1, 7),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
    garbage=st.sampled_from([1e6, -3.0, float("nan"), float("inf"), -float("inf")]),
)
def test_padding_garbage_never_changes_gae(seed, batch, length, gamma, lam, garbage):
    clean = random_rollout(seed, batch, length)
    dirty = random_rollout(seed, batch, length, garbage=garbage)
    for whiten in (False, True):
        a = construct(*clean, gamma=gamma, lam=lam, whiten=whiten)
        b = construct(*dirty, gamma=gamma, lam=lam, whiten=whiten)
        for key in ("advantages", "returns"):
            assert torch.equal(a[key], b[key]), key  # bit-equal: padding is zeroed before any sum
            assert bool(torch.isfinite(b[key]).all())
            assert bool((b[key][clean[2] == 0] == 0).all())  # padding stays 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 6), length=st.integers(1, 7))
def test_gae_with_lambda_one_is_reward_to_go_minus_values(seed, batch, length):
    rewards, values, mask = random_rollout(seed, batch, length, garbage=7.0)
    out = construct(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    real = mask.bool()
    assert torch.allclose(out["advantages"][real], (out["returns"] - values)[real], atol=1e-5)
    assert torch.allclose(out["returns"], suffix_sums(rewards, mask), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 6), length=st.integers(2, 7), lam=st.floats(0.0, 1.0))
def test_whitened_advantages_have_mean_0_std_1_over_real_tokens(seed, batch, length, lam):
    rewards, values, mask = random_rollout(seed, batch, length, garbage=1e3)
    mask[0, :2] = 1.0  # at least two real tokens
    rewards[0, 0] += 1.0
    out = construct(rewards, values, mask, lam=lam, whiten=True)
    raw = construct(rewards, values, mask, lam=lam, whiten=False)
    real = out["advantages"][mask.bool()].double()
    raw_real = raw["advantages"][mask.bool()].double()
    if raw_real.std(unbiased=False) < 1e-3:
        return  # constant advantages: nothing to whiten
    # Whitening statistics are float64, so the float32 outputs carry only their own final
    # rounding (about 6e-8 * |value|, |value| <= sqrt(42) here): 1e-6 has a 2x margin.
    assert abs(float(real.mean())) < 1e-6
    # rsqrt(var + eps), eps = 1e-8: the std is sqrt(var / (var + eps)), just below 1.
    var = float(raw_real.var(unbiased=False))
    assert float(real.std(unbiased=False)) == pytest.approx(math.sqrt(var / (var + 1e-8)), abs=1e-6)
    assert bool((out["advantages"][mask == 0] == 0).all())
    assert torch.equal(out["returns"], raw["returns"])  # returns are never whitened


def test_gae_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) lambda_; valid options: gamma, lam, whiten"):
        Trainer(ppo_config(tmp_path, "advantage.lambda_=0.9"))
    with pytest.raises(ConfigError, match=r"lam must be in \[0, 1\]"):
        Trainer(ppo_config(tmp_path, "advantage.lam=1.5"))


# --- the PPO loss ---------------------------------------------------------------------------


def test_ppo_loss_at_the_behaviour_policy_ignores_padding():
    """At pi = pi_old and V = V_old nothing is clipped: the surrogate is -mean(A), the value
    loss half the squared error, and garbage on padding changes nothing."""
    rewards, values, mask = random_rollout(3, batch=6, length=5)
    mask[0, :2] = 1.0
    advantages, returns = gae(rewards, values, mask, 1.0, 0.95)
    logits = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(logits, -1)[..., 0]
    pad = mask == 0

    def loss(garbage):
        def dirty(x):
            return torch.where(pad, torch.full_like(x, garbage), x)

        return ppo_loss(
            logprobs=dirty(logp),
            old_logprobs=logp,
            advantages=dirty(advantages),
            values=dirty(values),
            old_values=values,
            returns=dirty(returns),
            entropy=-(torch.log_softmax(logits, -1).exp() * torch.log_softmax(logits, -1)).sum(-1),
            mask=mask,
            num_tokens=mask.sum(),
            clip=0.2,
            vf_clip=0.2,
            vf_coef=0.5,
            entropy_coef=0.0,
        )

    clean = loss(0.0)
    real = mask.bool()
    assert float(clean.policy) == pytest.approx(-float(advantages[real].mean()), abs=1e-6)
    assert float(clean.value) == pytest.approx(0.5 * float(((values - returns)[real] ** 2).mean()), abs=1e-6)
    assert float(clean.total) == pytest.approx(float(clean.policy) + 0.5 * float(clean.value), abs=1e-6)
    assert clean.metrics["policy/approxkl"] == 0 and clean.metrics["policy/clipfrac"] == 0
    assert clean.metrics["val/clipfrac"] == 0
    for garbage in (1e6, float("nan"), float("inf")):
        assert all(torch.equal(a, b) for a, b in zip(clean.metrics.values(), loss(garbage).metrics.values()))


# --- KL controller ---------------------------------------------------------------------------


def test_adaptive_controller_moves_beta_towards_the_target():
    up = KLController(1.0, adaptive=True, target=0.5, horizon=100)
    up.update(kl=0.6, n_steps=10)  # error (0.6 - 0.5) / 0.5 = 0.2
    assert up.value == pytest.approx(1.0 * (1 + 0.2 * 10 / 100))
    up.update(kl=5.0, n_steps=10)  # the error is clipped at +0.2
    assert up.value == pytest.approx(1.02 * 1.02)
    down = KLController(1.0, adaptive=True, target=0.5, horizon=100)
    down.update(kl=0.45, n_steps=20)  # error -0.1
    assert down.value == pytest.approx(1 - 0.1 * 0.2)
    down.update(kl=0.0, n_steps=20)  # clipped at -0.2
    assert down.value == pytest.approx(0.98 * 0.96)
    fixed = KLController(0.3, adaptive=False, target=0.5, horizon=100)
    for kl in (0.0, 0.5, 100.0):
        fixed.update(kl=kl, n_steps=64)
    assert fixed.value == 0.3


def test_token_rewards_use_the_controllers_beta(tmp_path):
    trainer = Trainer(ppo_config(tmp_path, "estimator.init_kl_coef=0.25", "env.id=tokenmdp/SumMod-v0"))
    trainer.build_models()
    estimator = trainer.composition.estimator
    gen = torch.Generator().manual_seed(0)
    batch = tokenmdp.training.rollout.collect(trainer.policy, trainer.env, seed=0, generator=gen)
    batch.logprobs = tokenmdp.plugin.batch.token_logprobs(trainer.policy, batch).detach() + 0.1 * batch.response_mask
    batch.ref_logprobs = tokenmdp.plugin.batch.token_logprobs(trainer.reference, batch).detach()
    signals = estimator.estimate(batch, trainer.ctx)
    kl = (batch.logprobs - batch.ref_logprobs) * batch.response_mask
    assert torch.allclose(signals["token_rewards"], batch.rewards - 0.25 * kl)
    assert batch.rewards[:, -1].abs().sum() > 0 and batch.rewards[:, :-1].abs().sum() == 0  # terminal reward
    assert trainer.ctx.extras["kl_coef"] == 0.25
    assert estimator.kl_controller.value == 0.25  # "fixed" by default
    assert signals["values"].shape == batch.response_ids.shape


def test_kl_coef_critic_and_optimiser_survive_a_checkpoint(tmp_path):
    adaptive = [
        "estimator.kl_controller=adaptive",
        "estimator.target=0.001",
        "estimator.horizon=50",
        "train.steps=5",
        "run.checkpoint_every=2",
    ]
    full = Trainer(ppo_config(tmp_path, *adaptive, name="full"))
    full.train()
    beta = full.composition.estimator.kl_controller.value
    assert beta > 1.0  # step 1 has KL 0 (beta down), later KLs are far above a tiny target (beta up)
    train_until_interrupted(Trainer(ppo_config(tmp_path, *adaptive, name="cut")), at_step=3)
    saved = torch.load(tmp_path / "cut/checkpoints/step_00000002.pt", weights_only=False)["components"]
    assert saved["estimator"]["kl_controller"]["value"] not in (1.0, pytest.approx(beta))  # moved, not final
    assert saved["estimator"]["critic"]  # the critic's parameters ...
    assert len(saved["updater"]["optimizer"]["param_groups"]) == 2  # ... and its optimiser state
    resumed = Trainer.from_run_dir(tmp_path / "cut")
    resumed.train()
    assert resumed.composition.estimator.kl_controller.value == pytest.approx(beta, rel=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    for got, want in zip(rows[1:], expected[1:]):  # val/* would differ if the critic or its Adam state were lost
        for key in ("objective/kl_coef", "val/vpred", "val/error", "losses/value", "losses/policy"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)


# --- the critic -----------------------------------------------------------------------------


def test_separate_critic_is_trained_by_the_updater(tmp_path):
    trainer = Trainer(ppo_config(tmp_path, "estimator.critic_hidden=8", "train.steps=3"))
    trainer.build_models()
    critic = trainer.ctx.extras["critic"]
    assert critic is trainer.composition.estimator.critic
    assert critic.net.rnn.hidden_size == 8 and critic.net.head.out_features == 1
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    trainer.build_models = lambda: None
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in critic.state_dict().items())


def test_value_head_shares_the_gru_trunk(tmp_path):
    trainer = Trainer(ppo_config(tmp_path, "estimator.critic=head", "train.steps=2"))
    trainer.build_models()
    head = trainer.ctx.extras["critic"]
    assert set(head.state_dict()) == {"head.weight", "head.bias"}  # the trunk is the policy's
    gen = torch.Generator().manual_seed(0)
    batch = tokenmdp.training.rollout.collect(trainer.policy, trainer.env, seed=0, generator=gen)
    head(trainer.policy, batch).sum().backward()
    assert trainer.policy.rnn.weight_hh_l0.grad.abs().sum() > 0  # value loss reaches the trunk
    trainer.policy.zero_grad()
    trainer.build_models = lambda: None
    summary = trainer.train()
    assert summary["updater"] == "ppo"
    with pytest.raises(ConfigError, match="critic='head' is available only for policy.kind='gru'"):
        Trainer(
            ppo_config(tmp_path, "estimator.critic=head", "policy.kind=mlp", "policy.hidden=16", name="mlp")
        ).train()


def test_a_shared_trunk_is_run_once_per_minibatch_with_the_same_scores_and_gradients(tmp_path):
    trainer = Trainer(ppo_config(tmp_path, "estimator.critic=head"))
    trainer.build_models()
    head, policy, ctx = trainer.ctx.extras["critic"], trainer.policy, trainer.ctx
    batch = tokenmdp.training.rollout.collect(policy, trainer.env, seed=0, generator=torch.Generator().manual_seed(0))
    passes = []
    policy.rnn.register_forward_hook(lambda *_: passes.append(1))

    def scored(scores):
        logp, entropy, values = scores
        policy.zero_grad()
        head.zero_grad()
        (logp.sum() + entropy.square().sum() + values.square().sum()).backward()
        grads = [p.grad.clone() for p in [*policy.parameters(), *head.parameters()]]
        return [logp.detach(), entropy.detach(), values.detach()], grads

    one, one_grads = scored(head.score_with_policy(ctx, batch))
    assert len(passes) == 1
    apart, apart_grads = scored((*ctx.token_logprobs(policy, batch, return_entropy=True), head(policy, batch)))
    assert len(passes) == 3
    for a, b in zip(one, apart):
        # bit-equal: both run the same modules on the same tensors (the shared pass keeps the
        # trunk's output instead of recomputing it with the same operations)
        assert torch.equal(a, b)  # the same forward
    for a, b in zip(one_grads, apart_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # one backward through the trunk, not two


def test_updater_without_a_shared_critic_is_a_clear_error(tmp_path):
    class ValuesWithoutCritic(tokenmdp.TrajectoryEstimator):
        name = "values-without-critic"
        requires = frozenset({"rewards"})
        provides = frozenset({"token_rewards", "values"})

        def estimate(self, batch, ctx):
            return {"token_rewards": batch.rewards, "values": torch.zeros_like(batch.rewards)}

    plugin = types.ModuleType("no_critic_plugin")
    plugin.tokenmdp_trajectory_estimators = tokenmdp.hookimpl(lambda: [ValuesWithoutCritic])
    pm = tokenmdp.plugin_manager(extra_plugins=[plugin])
    # a declared contract: refused at start-up, before any model is built
    with pytest.raises(
        CompositionError, match=r"updater 'ppo' uses resource\(s\) critic \(ctx.extras\), which no earlier"
    ):
        Trainer(ppo_config(tmp_path, "algorithm.estimator=values-without-critic"), pm=pm)


# --- compositions, options and metrics -------------------------------------------------------


def test_gae_without_values_fails_at_start_up_naming_values(tmp_path, capsys):
    with pytest.raises(CompositionError, match=r"advantage 'gae' requires signal\(s\) values, which no earlier"):
        Trainer(ppo_config(tmp_path, "algorithm.estimator=kl-penalised-reward"))
    sets = [a for s in [*TINY, "algorithm.name=ppo", "algorithm.estimator=kl-penalised-reward"] for a in ("--set", s)]
    code = main(["train", *sets, "--set", f"run.dir={tmp_path / 'cli'}"])
    err = capsys.readouterr().err
    assert code == 2 and "requires signal(s) values" in err
    assert not (tmp_path / "cli").exists()


PPO_METRICS = {
    "policy/approxkl",
    "policy/clipfrac",
    "val/vpred",
    "val/error",
    "val/clipfrac",
    "objective/kl",
    "objective/kl_coef",
    "policy/entropy",
    "losses/policy",
    "losses/value",
    "charts/learning_rate",
}


def test_metrics_are_logged_and_documented(tmp_path):
    Trainer(ppo_config(tmp_path, "updater.vf_clip=0.01")).train()
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert PPO_METRICS <= set(rows[1])
    assert rows[-1]["val/clipfrac"] > 0  # a tiny vf_clip clips
    assert rows[1]["objective/kl_coef"] == 1.0 and rows[1]["policy/clipfrac"] >= 0
    assert all(math.isfinite(rows[-1][k]) for k in PPO_METRICS)
    from test_docs import DOCS, backticked

    assert not PPO_METRICS - backticked((DOCS / "metrics.md").read_text())


def test_target_kl_stops_the_epochs_early(tmp_path, monkeypatch):
    trainer = Trainer(ppo_config(tmp_path, "updater.target_kl=1e-9", "updater.lr=0.05", "train.steps=1"))
    updater = trainer.composition.updater
    calls, original = [], type(updater).apply_gradients

    def counted(self, loss, ctx):
        calls.append(1)
        return original(self, loss, ctx)

    monkeypatch.setattr(type(updater), "apply_gradients", counted)
    trainer.train()
    assert 1 <= len(calls) < updater.options.epochs * updater.options.minibatches


# --- convergence on small instances ---------------------------------------------------------

#: V=4, H=2, GRU 32, 64 responses x 30 steps, 2 epochs x 2 minibatches: a few seconds per run.
#: Measured regret_frac at the end: 0.01-0.04 (Pattern), 0.02-0.05 (SumMod) for all three recipes.
SMALL = [
    "env.vocab_size=4",
    "env.horizon=2",
    "policy.hidden=32",
    "reference.sft_samples=1024",
    "reference.sft_epochs=4",
    "train.batch_size=64",
    "train.steps=30",
    "train.eval_every=1000",
    "updater.epochs=2",
    "updater.minibatches=2",
    "updater.lr=1e-2",
]


@pytest.mark.parametrize("env", ["Pattern", "SumMod"])
def test_ppo_converges_on_a_small_instance(tmp_path, env):
    config = ppo_config(tmp_path, *SMALL, f"env.id=tokenmdp/{env}-v0")
    summary = Trainer(config).train()
    assert summary["start"]["regret"] > 0.05
    assert summary["regret_frac"] < 0.15, summary


# --- learned reward model (recipe ppo-rm) ---------------------------------------------------


def test_reward_model_ranks_held_out_pairs(tmp_path):
    """A Bradley-Terry fit on oracle-labelled pairs from pi_ref orders unseen pairs as the
    task's reward does, far above chance."""
    from tokenmdp.policies import TaskBasePolicy
    from tokenmdp.training.preferences import sample_pairs
    from tokenmdp_ppo import ValueNetwork
    from tokenmdp_ppo.reward_model import pair_margins, train_reward_model

    task = Trainer(ppo_config(tmp_path, *SMALL, "env.id=tokenmdp/Pattern-v0")).task
    generator = torch.Generator().manual_seed(0)
    pairs, _ = sample_pairs(TaskBasePolicy(task), task, 1200, generator)
    model = ValueNetwork({"kind": "gru", "hidden": 32}, task, seed=0)
    report = train_reward_model(
        model, pairs.select(torch.arange(1000)), epochs=3, lr=3e-3, batch_size=64, generator=generator
    )
    unseen = pairs.select(torch.arange(1000, 1200))
    assert float((pair_margins(model, unseen) > 0).float().mean()) > 0.85
    assert report["reward_model/heldout_accuracy"] > 0.85 and report["reward_model/loss"] < 0.4


def test_ppo_on_a_learned_reward_model_never_reads_the_env_reward(tmp_path, monkeypatch, capsys):
    config = ppo_config(
        tmp_path,
        *SMALL,
        "env.id=tokenmdp/Pattern-v0",
        "algorithm.name=ppo-rm",
        "estimator.reward_pairs=2000",
        "estimator.reward_lr=1e-2",
        "estimator.reward_epochs=5",
    )
    trainer = Trainer(config)
    assert not trainer.composition.needs_env_reward
    estimator = trainer.composition.estimator
    seen = []
    original = estimator.estimate

    def spy(batch, ctx):
        seen.append(float(batch.rewards.abs().sum()))
        out = original(batch, ctx)
        # r_phi sits on the last real token only; the other tokens carry just the KL penalty
        kl = (batch.logprobs - batch.ref_logprobs) * batch.response_mask
        off_last = out["token_rewards"][:, :-1] + ctx.extras["kl_coef"] * kl[:, :-1]
        assert torch.allclose(off_last, torch.zeros_like(off_last), atol=1e-6)
        return out

    monkeypatch.setattr(estimator, "estimate", spy)
    summary = trainer.train()
    assert "ppo-rewards: fitted the reward model on 2000 pairs" in capsys.readouterr().out  # a visible step
    assert seen and set(seen) == {0.0}  # no reward was computed for any rollout
    assert summary["used_env_reward"] is False and summary["recipe"] == "ppo-rm"
    # Bradley-Terry labels are noisy (y_1 wins with probability sigmoid(R_1 - R_2)), so the
    # agreement with them stays well below 1; chance is 1/2
    assert summary["reward_model/heldout_accuracy"] > 0.65
    assert summary["regret_frac"] < 0.4, summary  # RLHF on a learned reward closes most of the gap
    # a checkpoint restores the fitted model: it is never fitted again
    restored = PPORewards(estimator.options)
    restored.setup(trainer.ctx)
    restored.load_state_dict(estimator.state_dict())
    monkeypatch.setattr(restored, "fit_reward_model", lambda ctx: pytest.fail("refitted after a restore"))
    batch = trainer._collect(1)
    batch.logprobs = batch.ref_logprobs = torch.zeros_like(batch.response_mask)
    torch.testing.assert_close(
        restored.estimate(batch, trainer.ctx)["token_rewards"], original(batch, trainer.ctx)["token_rewards"]
    )
    assert restored.report() == estimator.report()


def test_the_env_reward_is_required_only_without_a_learned_reward_model():
    assert PPORewards.requires == {"rewards", "ref_logprobs"}  # the class's: the default options'
    assert PPORewards().requires == {"rewards", "ref_logprobs"}
    learned = PPORewards(PPORewards.Options(reward="learned"))
    assert learned.requires == {"ref_logprobs"}


def test_reward_pairs_file_needs_a_learned_reward(tmp_path):
    with pytest.raises(ConfigError, match="reward_pairs_file is read only with reward"):
        Trainer(ppo_config(tmp_path, "estimator.reward_pairs_file=pairs.jsonl"))
