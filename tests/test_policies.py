"""Policies share one interface: incremental decoding equals a full forward, padding is
harmless for HF models, sentencepiece tokenizers train locally, SFT learns the base."""

import pytest
import torch
from helpers import TINY_GPT2

from tokenmdp.errors import TokenMDPError
from tokenmdp.plugin.batch import RolloutBatch, token_logprobs
from tokenmdp.policies import TOY_POLICIES, TaskBasePolicy, build_policy
from tokenmdp.policies.hf import HFCausalLMPolicy, train_sentencepiece
from tokenmdp.training.sft import make_sft_data, supervised_finetune
from tokenmdp_envs import PatternTask, SumModTask

CORPUS = [
    "the cat sat on the mat",
    "a kind answer helps",
    "answer kindly and helpfully",
    "the dog ran in the park",
    "tokens are actions in the token mdp",
    "kind words cost nothing",
] * 20


def tiny_gpt2(vocab):
    return HFCausalLMPolicy.from_config(
        {**TINY_GPT2, "vocab_size": vocab},
        seed=0,
    )


@pytest.mark.parametrize("kind", [*TOY_POLICIES, "hf"])
def test_incremental_decoding_matches_full_forward(kind):
    task = PatternTask(vocab_size=5, horizon=4)
    spec = {"kind": kind} if kind != "hf" else {"kind": "hf", "config": {"n_layer": 1, "n_head": 2, "n_embd": 16}}
    policy = build_policy(spec, task, seed=0).eval()
    ids = torch.randint(0, task.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = task.bos_token
    full = policy(ids)
    logits, state = policy.start(ids[:, :2])
    steps = [logits]
    for k in range(2, 6):
        logits, state = policy.advance(state, ids[:, k])
        steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full[:, 1:], atol=1e-5)


def test_sentencepiece_trains_fast_and_round_trips():
    sp = train_sentencepiece(CORPUS, vocab_size=60)
    for text in ["the cat sat on the mat", "answer kindly"]:
        assert sp.decode(sp.encode(text)) == text
    assert sp.get_piece_size() == 60


def test_hf_left_padding_does_not_change_logprobs():
    sp = train_sentencepiece(CORPUS, vocab_size=60)
    policy = tiny_gpt2(sp.get_piece_size()).eval()
    prompts = [sp.encode("the cat"), sp.encode("answer kindly and helpfully")]
    response = torch.tensor([sp.encode("sat on")[:2]] * 2)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = RolloutBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=response,
        response_mask=torch.ones(2, 2),
        rewards=torch.zeros(2, 2),
        prompt_index=torch.zeros(2),
    )
    padded = token_logprobs(policy, batch)
    for i, p in enumerate(prompts):
        alone = RolloutBatch(
            prompt_ids=torch.tensor([p]),
            prompt_mask=torch.ones(1, len(p)),
            response_ids=response[i : i + 1],
            response_mask=torch.ones(1, 2),
            rewards=torch.zeros(1, 2),
            prompt_index=torch.zeros(1),
        )
        assert torch.allclose(token_logprobs(policy, alone)[0], padded[i], atol=1e-5)
    # guide-prefixed scoring equals a direct model(...) call on [guide + prompt + response]
    guide = torch.tensor(sp.encode("kind words"))
    scored = token_logprobs(policy, alone, prefix_ids=guide)
    seq = torch.cat([guide, torch.tensor(p), response[1]])[None]
    direct = torch.log_softmax(policy.model(seq).logits[0], -1)
    start = len(guide) + len(p) - 1
    expect = direct[torch.arange(start, start + 2), response[1]]
    assert torch.allclose(scored[0], expect, atol=1e-5)


def test_toy_policies_reject_padding_and_missing_model_dir(tmp_path):
    task = PatternTask(vocab_size=4, horizon=2)
    policy = build_policy({"kind": "gru"}, task, seed=0)
    with pytest.raises(TokenMDPError, match="unpadded"):
        policy(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]))
    with pytest.raises(TokenMDPError, match="does not exist"):
        build_policy({"kind": "hf", "path": str(tmp_path / "nope")}, task, seed=0)


def test_sft_learns_the_base_distribution_and_the_guide_tag():
    task = SumModTask(vocab_size=4, horizon=3)
    gen = torch.Generator().manual_seed(0)
    groups = make_sft_data(task, untagged=2048, tagged=2048, tilt_beta=0.5, generator=gen)
    assert [g[0].shape[1] for g in groups] == [2, 3]  # untagged [BOS, p], tagged [GUIDE, BOS, p]
    policy = build_policy({"kind": "gru", "hidden": 32}, task, seed=0)
    losses = supervised_finetune(policy, groups, epochs=6, batch_size=128, lr=1e-2, generator=gen)
    assert losses[-1] < losses[0]
    from tokenmdp.mdp.solver import solve, tree_logprobs

    base = solve(task, TaskBasePolicy(task), beta=0.5)
    untagged = base.evaluate(tree_logprobs(policy, task))
    tagged = base.evaluate(tree_logprobs(policy, task, prefix_ids=torch.tensor([task.guide_token])))
    # untagged model ~ pi_base; guide-tagged model ~ the tilted optimum, so it scores much better
    assert untagged["kl_ref"] < 0.05
    assert tagged["kl_to_optimal"] < 0.3 * base.evaluate(base.ref_logp)["kl_to_optimal"]
