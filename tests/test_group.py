"""RLOO and GRPO: group-relative advantages against direct loops, singleton groups, the
recipes' composition, and convergence on small instances."""

import types

import pytest
import torch
from helpers import TINY
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmdp.config import load_config
from tokenmdp.training.trainer import Trainer
from tokenmdp_group import GRPO, RLOO, SequenceCredit


def fake_batch(rewards, prompt_index, lengths, kl=None, horizon=4):
    """A batch whose responses have sequence reward ``rewards`` (on the last real token)
    and sequence k1 KL ``kl`` (spread over the tokens)."""
    b = len(rewards)
    mask = (torch.arange(horizon)[None] < torch.tensor(lengths)[:, None]).float()
    env = torch.zeros(b, horizon)
    env[torch.arange(b), torch.tensor(lengths) - 1] = torch.tensor(rewards, dtype=torch.float32)
    kl = torch.zeros(b) if kl is None else torch.tensor(kl, dtype=torch.float32)
    logprobs = -torch.rand(b, horizon, generator=torch.Generator().manual_seed(0)) * mask
    ref = logprobs - (kl / torch.tensor(lengths))[:, None] * mask
    ref = ref + 9.0 * (1 - mask)  # garbage on padding (real batches have 0 there)
    return types.SimpleNamespace(
        rewards=env,
        response_mask=mask,
        logprobs=logprobs * mask,
        ref_logprobs=ref,
        prompt_index=torch.tensor(prompt_index),
        groups=torch.tensor(prompt_index),
        sequence_rewards=(env * mask).sum(1),
        token_kl=(logprobs * mask - ref) * mask,  # as RolloutBatch.token_kl
    )


def advantages_of(cls, batch, beta=1.0, **options):
    estimator = cls(cls.Options(**options))
    ctx = types.SimpleNamespace(beta=beta)
    token_rewards = estimator.estimate(batch, ctx)["token_rewards"]
    mask = batch.response_mask
    first = token_rewards[:, 0]
    assert torch.allclose(token_rewards, first[:, None] * mask)  # uniform over each response, 0 on padding
    out = SequenceCredit(SequenceCredit.Options()).construct(batch, {"token_rewards": token_rewards}, None)
    assert torch.equal(out["advantages"], token_rewards)  # bit-equal: sequence credit passes them through
    return first


def loop_advantages(kind, r, prompt_index, eps=1e-6):
    out = []
    for i, (ri, p) in enumerate(zip(r, prompt_index)):
        others = [rj for j, (rj, q) in enumerate(zip(r, prompt_index)) if q == p and j != i]
        group = [ri, *others]
        if not others:
            out.append(0.0)
        elif kind == "rloo":
            out.append(ri - sum(others) / len(others))
        else:
            mean = sum(group) / len(group)
            std = (sum((g - mean) ** 2 for g in group) / (len(group) - 1)) ** 0.5
            out.append((ri - mean) / (std + eps))
    return torch.tensor(out)


def test_rloo_by_hand():
    batch = fake_batch([1.0, 0.0, 0.0, 2.0, 5.0], prompt_index=[3, 3, 3, 0, 0], lengths=[4, 2, 3, 4, 1])
    a = advantages_of(RLOO, batch)
    assert torch.allclose(a, torch.tensor([1.0, -0.5, -0.5, -3.0, 3.0]))


def test_singleton_groups_get_zero_advantage():
    batch = fake_batch([1.0, 4.0, 2.0], prompt_index=[0, 1, 1], lengths=[4, 4, 4])
    for cls in (RLOO, GRPO):
        a = advantages_of(cls, batch)
        assert a[0] == 0 and torch.isfinite(a).all()
    assert torch.allclose(advantages_of(RLOO, batch)[1:], torch.tensor([2.0, -2.0]))


def test_sequence_reward_subtracts_beta_times_the_k1_sequence_kl():
    batch = fake_batch([1.0, 1.0], prompt_index=[0, 0], lengths=[4, 2], kl=[0.5, 0.0])
    assert torch.allclose(advantages_of(RLOO, batch, beta=2.0), torch.tensor([-1.0, 1.0]))
    assert torch.allclose(advantages_of(RLOO, batch, beta=2.0, kl_coef=0.0), torch.zeros(2))


@settings(max_examples=25, deadline=None)
@given(rewards=st.lists(st.floats(-5, 5), min_size=1, max_size=12), data=st.data())
def test_group_advantages_agree_with_a_loop(rewards, data):
    n = len(rewards)
    prompts = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    lengths = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    kl = data.draw(st.lists(st.floats(0, 2), min_size=n, max_size=n))
    batch = fake_batch(rewards, prompts, lengths, kl=kl)
    r = (torch.tensor(rewards, dtype=torch.float32) - torch.tensor(kl, dtype=torch.float32)).tolist()
    assert torch.allclose(advantages_of(RLOO, batch), loop_advantages("rloo", r, prompts), atol=1e-4)
    got, want = advantages_of(GRPO, batch), loop_advantages("grpo", r, prompts)
    group_of = [[r[j] for j in range(n) if prompts[j] == prompts[i]] for i in range(n)]
    spread = [max(g) - min(g) for g in group_of]
    close = [abs(g - w) <= 1e-3 * max(1.0, abs(w)) or s < 1e-2 for g, w, s in zip(got.tolist(), want.tolist(), spread)]
    assert all(close), (got, want)
    # RLOO advantages sum to 0 within every group of two or more
    a = advantages_of(RLOO, batch)
    for p in set(prompts):
        members = [i for i in range(n) if prompts[i] == p]
        assert abs(float(a[members].sum())) < 1e-3


def test_grpo_group_has_mean_0_and_std_1():
    batch = fake_batch([0.0, 1.0, 1.0, 3.0, 7.0, 7.0], prompt_index=[1, 1, 1, 2, 2, 2], lengths=[4] * 6)
    a = advantages_of(GRPO, batch)
    for group in (a[:3], a[3:]):
        assert abs(float(group.mean())) < 1e-5 and float(group.std()) == pytest.approx(1.0, abs=1e-4)


def group_config(tmp_path, recipe, *overrides):
    return load_config(None, [*TINY, f"algorithm.name={recipe}", f"run.dir={tmp_path / recipe}", *overrides])


@pytest.mark.parametrize("recipe", ["rloo", "grpo"])
def test_recipe_composition(tmp_path, recipe):
    trainer = Trainer(group_config(tmp_path, recipe))
    est, adv, upd = trainer.composition.components
    assert (est.name, adv.name, upd.name) == (recipe, "sequence-credit", "clipped-pg")
    assert upd.options.kl_coef == 0.0  # the KL is inside the sequence reward, not added twice
    assert trainer.composition.needs_env_reward


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


@pytest.mark.parametrize("recipe", ["rloo", "grpo"])
@pytest.mark.parametrize("env", ["Pattern", "SumMod"])
def test_group_recipes_converge_on_a_small_instance(tmp_path, recipe, env):
    config = group_config(tmp_path, recipe, *SMALL, f"env.id=tokenmdp/{env}-v0")
    summary = Trainer(config).train()
    assert summary["start"]["regret"] > 0.05
    assert summary["regret_frac"] < 0.15, summary
