"""A training forward reads a group's shared prompt once (tokenmdp/policies/shared_prompt.py):
the log-probs, entropies and gradients equal those of the forward that reads it per row, to
the chunked kernel's float tolerance, on GPT-2 (fast path and library), Gemma-3 (a sliding
window shorter than the sequences) and LoRA, in fp32 and bf16; rows are matched by value."""

from __future__ import annotations

import types

import pytest
import torch
from test_chunked_logits import TOLERANCE, _policy, assert_grads_close

from tokenmdp.plugin.batch import RolloutBatch, token_logprobs
from tokenmdp.policies import shared_prompt
from tokenmdp.policies.hf import HFCausalLMPolicy


def _grouped_batch(vocab: int, groups: int = 3, per_group: int = 4, p: int = 5, t: int = 7) -> RolloutBatch:
    """``groups`` prompts (the second left-padded) answered ``per_group`` times each, the
    rows shuffled (as a minibatch's are), responses of several lengths."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (groups, p), generator=g)
    prompt_mask = torch.ones(groups, p, dtype=torch.long)
    prompt_mask[1, :2] = 0
    b = groups * per_group
    mask = (torch.arange(t)[None] < torch.randint(1, t + 1, (b, 1), generator=g)).float()
    order = torch.randperm(b, generator=g)
    return RolloutBatch(
        prompt_ids=prompts.repeat_interleave(per_group, 0)[order],
        prompt_mask=prompt_mask.repeat_interleave(per_group, 0)[order],
        response_ids=torch.randint(3, vocab, (b, t), generator=g) * mask.long(),
        response_mask=mask,
        rewards=torch.zeros(b, t),
        prompt_index=torch.arange(groups).repeat_interleave(per_group)[order],
    )


def _stats(policy, batch, share: bool, monkeypatch):
    monkeypatch.setattr(HFCausalLMPolicy, "share_prompt", share)
    policy.zero_grad()
    logp, entropy = token_logprobs(policy, batch, return_entropy=True, chunk=4)
    (logp.sum() + 0.1 * entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return logp.detach(), entropy.detach(), grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "kind, lora", [("gpt2-fast", False), ("gpt2", False), ("gpt2", True), ("gemma", False), ("gemma", True)]
)
def test_reading_a_shared_prompt_once_gives_the_per_row_values_and_gradients(kind, lora, precision, monkeypatch):
    policy = _policy(kind, precision, lora)
    batch = _grouped_batch(policy.vocab_size)
    found = []
    real_find = shared_prompt.find
    monkeypatch.setattr(shared_prompt, "find", lambda *a: found.append(real_find(*a)) or found[-1])
    logp, ent, grads = _stats(policy, batch, False, monkeypatch)
    assert not found  # switched off: never even looked for
    logp_s, ent_s, grads_s = _stats(policy, batch, True, monkeypatch)
    assert found and found[0] is not None and found[0].ids.shape[0] == 3  # three prompts, run once each
    tol = TOLERANCE[precision]
    torch.testing.assert_close(logp_s, logp, **tol)
    torch.testing.assert_close(ent_s, ent, **tol)
    assert_grads_close(grads_s, grads, tol)


def test_rows_share_by_value_and_only_when_it_saves_enough():
    ids = torch.tensor([[5, 6, 7, 1, 2], [9, 9, 9, 3, 4], [5, 6, 7, 8, 8], [9, 9, 9, 1, 1]])
    mask = torch.ones_like(ids)
    shared = shared_prompt.find(ids, mask, keep=2)
    assert shared is not None and shared.length == 3
    assert torch.equal(shared.ids[shared.rows], ids[:, :3]) and torch.equal(shared.mask[shared.rows], mask[:, :3])
    assert shared.ids.shape[0] == 2
    # the same tokens under another padding mask are another prefix
    other = mask.clone()
    other[2, 0] = 0
    assert shared_prompt.find(ids, other, keep=2).ids.shape[0] == 3
    # nothing shared, nothing to share, or too little saved: the plain forward
    assert shared_prompt.find(ids[:2], mask[:2], keep=2) is None
    assert shared_prompt.find(ids, mask, keep=5) is None
    assert shared_prompt.find(ids, mask, keep=4).length == 1  # 2 of 20 positions saved: 1/10
    long = torch.cat([ids[:, :1], torch.arange(4 * 39).view(4, 39)], dim=1)
    assert shared_prompt.find(long, torch.ones_like(long), keep=39) is None  # 2 of 160: under 1/16


@pytest.mark.parametrize("kind", ["gpt2", "gemma"])
def test_a_language_model_critic_reads_the_shared_prompt_once_with_the_same_values(kind, monkeypatch):
    """PPO's separate LM critic (plugins/tokenmdp_ppo/critics.py) takes the last hidden
    states of the response positions through ``response_hidden``: the values and their
    gradients equal those from every position's hidden states (the critic as it was)."""
    from tokenmdp import response_logits
    from tokenmdp_ppo.critics import _ResponseValues

    policy = _policy(kind, "fp32")  # eval mode: no dropout, so the two passes compare
    head = torch.nn.Linear(policy.model.get_input_embeddings().embedding_dim, 1)
    network = types.SimpleNamespace(lm=policy, head=head)
    batch = _grouped_batch(policy.vocab_size)
    found = []
    real_find = shared_prompt.find
    monkeypatch.setattr(shared_prompt, "find", lambda *a: found.append(real_find(*a)) or found[-1])
    out = []
    for values_of in (lambda ids, mask=None: head(policy.hidden_states(ids, mask)), _ResponseValues(network)):
        policy.zero_grad()
        head.zero_grad()
        values = response_logits(values_of, batch)[..., 0] * batch.response_mask
        values.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in [*policy.named_parameters(), *head.named_parameters()]}
        out.append((values.detach(), grads))
    assert found and found[-1] is not None  # the new critic shared the prompt
    (values, grads), (values_s, grads_s) = out
    torch.testing.assert_close(values_s, values, **TOLERANCE["fp32"])
    assert_grads_close(grads_s, grads, TOLERANCE["fp32"])
