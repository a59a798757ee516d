"""PPO's critics: ``V(s_t)`` on every response position, one class per kind of critic.

Every critic offers the same two calls, so the estimator and the updater never ask which
one they hold:

* ``critic(policy, batch)``: ``[B, T]`` values (0 on padding), in at least float32;
* ``critic.score_with_policy(ctx, batch)``: the updater's minibatch forward, the policy's
  ``[B, T]`` log-probs and entropies (its output layer in chunks) and the ``[B, T]`` values.

``critic = "separate"`` builds, through :func:`value_network`, a :class:`ValueNetwork` (the
toy policy's network class with one output) or, for a causal LM policy, an
:class:`LMValueNetwork` (a copy of the LM with a linear value head). ``critic = "head"``
is a :class:`ValueHead` on the GRU policy's own trunk. The learned reward model
(``reward_model.py``) is a :func:`value_network` too, read after the last token.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from tokenmdp import ConfigError, GRUPolicy, at_least_float32, build_policy, response_logits


class Critic(nn.Module):
    """The interface of every critic (see the module docstring)."""

    def forward(self, policy, batch) -> Tensor:
        """``[B, T]``: ``V(s_t)`` on ``batch``'s response positions, 0 on padding."""
        raise NotImplementedError

    def score_with_policy(self, ctx, batch, entropy_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``(log-probs, entropies, values)`` ``[B, T]`` of the policy and the critic on
        ``batch``'s responses (the entropy with a gradient if ``entropy_grad``). A critic
        with its own network scores them apart: one pass of each (the policy's output layer
        in chunks: ``train.logit_chunk``)."""
        scores = ctx.token_logprobs(ctx.policy, batch, return_entropy=True, entropy_grad=entropy_grad)
        return (*scores, self(ctx.policy, batch))


class ValueNetwork(Critic):
    """``critic = "separate"`` with a toy policy: the policy's network class with one output."""

    def __init__(self, policy_spec: dict, task, seed: int, hidden: int | None = None):
        super().__init__()
        spec = dict(policy_spec)
        if hidden is not None:
            spec["hidden"] = hidden
        one_output = types.SimpleNamespace(input_vocab_size=task.input_vocab_size, vocab_size=1)
        with torch.random.fork_rng():  # seeded, and leaves the global RNG alone
            self.net = build_policy(spec, one_output, seed=seed + 1)

    def forward(self, policy, batch) -> Tensor:
        return at_least_float32(response_logits(self.net, batch)[..., 0]) * batch.response_mask


class LMValueNetwork(Critic):
    """``critic = "separate"`` with a causal LM policy: a separate copy of the LM (never its
    LoRA adapter) with a linear value head, zero at the start, on its last hidden state;
    the LM's output layer is skipped."""

    def __init__(self, policy_spec: dict, task, seed: int):
        super().__init__()
        spec = dict(policy_spec)
        spec.pop("lora", None)
        with torch.random.fork_rng():  # seeded, and leaves the global RNG alone
            self.lm = build_policy(spec, task, seed=seed + 1)
        width = self.lm.model.get_input_embeddings().embedding_dim
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, policy, batch) -> Tensor:
        return at_least_float32(response_logits(_ResponseValues(self), batch)[..., 0]) * batch.response_mask


class _ResponseValues:
    """An :class:`LMValueNetwork`'s values as :func:`response_logits` reads a model: asked
    for the last positions only (``logits_to_keep``), it takes the LM's last hidden states
    of those through ``response_hidden``, which runs a group's shared prompt once
    (tokenmdp/policies/shared_prompt.py) as the policy's own forward does (a sharded LM
    shares nothing there: :func:`tokenmdp.sharding.shard_policy`)."""

    supports_logits_to_keep = True

    def __init__(self, network: LMValueNetwork):
        self.network = network

    def __call__(self, ids, mask=None, logits_to_keep: int = 0) -> Tensor:
        lm, head = self.network.lm, self.network.head
        if mask is None:
            mask = torch.ones_like(ids)
        if logits_to_keep:
            hidden = lm.response_hidden(ids, mask, keep=logits_to_keep)[0]
        else:
            hidden = lm.hidden_states(ids, mask)
        return head(hidden.to(head.weight.dtype))


def value_network(policy_spec: dict, task, seed: int, hidden: int | None = None) -> Critic:
    """A network of the policy's kind with one output per position, seeded from ``seed``:
    an :class:`LMValueNetwork` for ``policy.kind = "hf"`` (``hidden`` is then not read),
    else a :class:`ValueNetwork` (of ``hidden`` units; unset: the policy's)."""
    if policy_spec.get("kind", "gru") == "hf":
        return LMValueNetwork(policy_spec, task, seed)
    return ValueNetwork(policy_spec, task, seed, hidden)


class ValueHead(Critic):
    """``critic = "head"``: a linear value head on the GRU policy's hidden states. The value
    loss also trains the shared trunk. The policy is passed in, not stored, so the head's
    ``state_dict`` and ``parameters`` are the head's alone."""

    def __init__(self, policy):
        super().__init__()
        if type(policy) is not GRUPolicy:
            raise ConfigError(
                f"[estimator] (ppo-rewards): critic='head' is available only for policy.kind='gru' "
                f"(got {type(policy).__name__}); use critic='separate'"
            )
        self.head = nn.Linear(policy.rnn.hidden_size, 1)

    def forward(self, policy, batch) -> Tensor:
        def trunk_values(ids, mask=None):
            return self.head(policy.hidden_states(ids, mask))

        return at_least_float32(response_logits(trunk_values, batch)[..., 0]) * batch.response_mask

    def score_with_policy(self, ctx, batch, entropy_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """One pass of the shared trunk for both (half the GRU work of scoring the policy
        and the values apart)."""
        policy, trunk = ctx.policy, {}

        def logits_keeping_the_trunk(ids, mask=None):
            trunk["hidden"] = policy.hidden_states(ids, mask)
            return policy.head(trunk["hidden"])

        logp, entropy = ctx.token_logprobs(logits_keeping_the_trunk, batch, return_entropy=True)
        # the same response positions of the same pass: response_logits slices this "model"'s
        # output exactly as it sliced the logits
        values = response_logits(lambda ids, mask=None: self.head(trunk["hidden"]), batch)[..., 0]
        return logp, entropy, at_least_float32(values) * batch.response_mask
