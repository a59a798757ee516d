"""The task base class: one token-MDP problem as batched torch functions.

A :class:`TokenTask` holds the problem (prompts, vocabulary, horizon, reward, base
distribution); the Gymnasium environments (:mod:`tokenmdp.mdp.env`), the exact solver
and the trainer all read the same task, so they agree by construction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import TokenMDPError


class TokenTask:
    """A toy token-MDP problem. Subclasses implement the reward and base distribution.

    Token ids ``0..vocab_size-1`` are actions. Two extra *input-only* ids follow:
    ``bos_token`` starts every prompt and ``guide_token`` is the conditioning tag ``c``
    of METHOD.md section 5. Policies therefore embed ``input_vocab_size`` ids and
    predict ``vocab_size`` actions.
    """

    name = "task"
    #: An exact solver exists (a small prefix tree and a base distribution); text tasks: False.
    exact = True
    #: Prompts of different lengths: the observation carries a 0/1 ``prompt_mask``.
    padded_prompts = False
    #: Whether reaching the horizon ends the episode as the MDP's own end (``terminated``,
    #: e.g. a bandit's single step) rather than as a time limit (``truncated``, the default:
    #: a response cut at ``horizon`` tokens).
    horizon_terminates = False
    #: A text task's ``env.reward`` (``tokenmdp.text.rewards.RewardSet``); None on toy tasks,
    #: whose rewards are tables.
    rewards = None
    #: Whether the reward is paid on the finished response only (text tasks): then
    #: :meth:`TokenVectorEnv.play` scores a whole batch with one :meth:`sequence_rewards`.
    pays_on_finish = False
    #: Leading prompt columns kept in front of a conditioning prefix (1 for a pinned BOS).
    prefix_offset = 0
    #: The tokenizer of a text task; None for a toy task, whose tokens are plain ids.
    tokenizer = None
    #: Whether the task has a reward to score responses with (a reward-free text task has none).
    has_reward = True

    def __init__(self, vocab_size: int, horizon: int, seed: int = 0, eos_token: int | None = None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise TokenMDPError(f"env.vocab_size must be an integer >= 2 (got {vocab_size!r})")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise TokenMDPError(f"env.horizon must be an integer >= 1 (got {horizon!r})")
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
            raise TokenMDPError(f"env.seed must be an integer in [-2**63, 2**64) (got {seed!r})")
        if eos_token is not None and (
            isinstance(eos_token, bool) or not isinstance(eos_token, int) or not 0 <= eos_token < vocab_size
        ):
            raise TokenMDPError(f"env.eos_token must be in [0, {vocab_size}) or unset (got {eos_token!r})")
        self.vocab_size = vocab_size
        self.horizon = horizon
        self.seed = seed
        self.eos_token = eos_token
        self.bos_token = vocab_size
        self.guide_token = vocab_size + 1
        self.input_vocab_size = vocab_size + 2
        self.rng = torch.Generator().manual_seed(seed)
        self.reward_calls = 0  # lets tests prove a reward-free method never looked
        #: What a sampled evaluation scores: this task (a text task may hold out prompts).
        self.eval_task = self

    # --- problem definition (override) --------------------------------------------
    @property
    def prompts(self) -> Tensor:
        """``[num_prompts, prompt_len]`` int64, each row starting with ``bos_token``."""
        raise NotImplementedError

    @property
    def prompt_mask(self) -> Tensor:
        """``[num_prompts, prompt_len]`` 0/1: real prompt tokens (all 1 for toy prompts)."""
        return torch.ones_like(self.prompts)

    @property
    def prompt_probs(self) -> Tensor:
        n = self.prompts.shape[0]
        return torch.full((n,), 1.0 / n, dtype=torch.float64)

    def dense_rewards(self, prompt_index: Tensor, prefix: Tensor) -> Tensor:
        """``[N, V]`` reward of every next token from states ``(prompt, prefix)``."""
        return torch.zeros(prefix.shape[0], self.vocab_size)

    def terminal_reward(self, prompt_index: Tensor, response: Tensor) -> Tensor:
        """``[N]`` reward paid when a complete ``response`` ends the episode."""
        return torch.zeros(response.shape[0])

    def base_logits(self, prompt_index: Tensor, prefix: Tensor) -> Tensor:
        """``[N, V]`` logits of the base distribution ``pi_base(. | prompt, prefix)``."""
        raise NotImplementedError

    # --- derived --------------------------------------------------------------------
    def next_token_rewards(self, prompt_index: Tensor, prefix: Tensor) -> Tensor:
        """``[N, V]``: dense reward plus, for actions that end the episode, the terminal reward."""
        self.reward_calls += 1
        n, t = prefix.shape
        rewards = self.dense_rewards(prompt_index, prefix).to(torch.float32)
        ends = self.ending_actions(t)
        if ends.any():
            actions = torch.arange(self.vocab_size)[ends]
            k = actions.numel()
            full = torch.cat([prefix.repeat_interleave(k, 0), actions.repeat(n)[:, None]], dim=1)
            term = self.terminal_reward(prompt_index.repeat_interleave(k), full).view(n, k)
            rewards[:, ends] += term.to(torch.float32)
        return rewards

    def action_rewards(self, prompt_index: Tensor, prefix: Tensor, actions: Tensor) -> Tensor:
        """``[N]`` reward of taking ``actions`` after ``prefix`` (every row has the same length).

        A task paid on the finished response (``pays_on_finish``) pays its whole reward, a
        dense one's sum included, on the action that ends it: a step-by-step env cannot pay
        a token before the response it is computed from exists. Collecting a batch
        (:meth:`TokenVectorEnv.play`, what training does) places it per token instead."""
        if not self.pays_on_finish:
            return self.next_token_rewards(prompt_index, prefix).gather(1, actions[:, None]).squeeze(1)
        rewards = torch.zeros(actions.shape[0])
        if not self.has_reward:
            return rewards
        rows = self.ending_actions(prefix.shape[1])[actions].nonzero().squeeze(1)
        if rows.numel():
            full = torch.cat([prefix[rows], actions[rows, None]], dim=1)
            values = self.sequence_rewards(prompt_index[rows], full, torch.ones_like(full))
            rewards[rows] = values.to(rewards.dtype)
        return rewards

    def sequence_rewards(self, prompt_index: Tensor, response: Tensor, mask: Tensor) -> Tensor:
        """``[N]`` float64 ``R(x, y) = sum_t r(s_t, y_t)`` of whole responses (0-padded,
        with their 0/1 mask): :meth:`response_rewards` summed token by token, left to right
        (float64, so that ties are exact sums of the task's rewards); a Python reward's
        totals (``RewardSet.score``)."""
        if self.pays_on_finish:
            totals = self.rewards.score(**self._reward_batch(prompt_index, response, mask)[1])
            return torch.tensor(totals, dtype=torch.float64)
        per_token = self.response_rewards(prompt_index, response, mask)
        total = torch.zeros(response.shape[0], dtype=torch.float64)
        for t in range(response.shape[1]):
            total += per_token[:, t]
        return total

    def response_rewards(self, prompt_index: Tensor, response: Tensor, mask: Tensor) -> Tensor:
        """``[N, T]`` float64 reward of every token of whole responses (0-padded, with their
        0/1 mask; 0 on padding): ``r(s_t, y_t)`` from :meth:`next_token_rewards`, or, for a
        task paid on the finished response (a Python ``env.reward``: text tasks, a toy task
        given one), the values its rewards place on the tokens
        (``RewardSet.response_rewards``: a sequence reward on the last token, dense, span
        and step values where they land)."""
        if self.pays_on_finish:
            lengths, batch = self._reward_batch(prompt_index, response, mask)
            return self.rewards.response_rewards(lengths, response.shape[1], **batch)
        out = torch.zeros(response.shape, dtype=torch.float64)
        for t in range(response.shape[1]):
            live = mask[:, t] > 0
            if not bool(live.any()):
                break
            table = self.next_token_rewards(prompt_index[live], response[live, :t])
            out[live, t] = table.gather(1, response[live, t : t + 1]).squeeze(1).double()
        return out

    def _reward_batch(self, prompt_index: Tensor, response: Tensor, mask: Tensor) -> tuple[list[int], dict]:
        """The lengths of whole responses (0-padded, with their 0/1 mask) and what the
        task's Python rewards are called with for them (:meth:`_reward_call`)."""
        lengths = mask.sum(1).long().tolist()
        responses = [row[:n] for row, n in zip(response.tolist(), lengths)]  # one copy off the tensor
        return lengths, self._reward_call([int(i) for i in prompt_index], responses)

    def _reward_call(self, prompt_index: list[int], responses: list[list[int]]) -> dict:
        """What the task's Python rewards are called with for ``responses`` (token ids) to
        the prompts in rows ``prompt_index`` (:meth:`_scoring_batch`), counted in
        ``reward_calls``; a task made without ``env.reward`` refuses."""
        if self.rewards is None:
            raise TokenMDPError(f"tokenmdp/{self.name}-v0 was made without env.reward")
        self.reward_calls += len(responses)
        return self._scoring_batch(prompt_index, responses)

    def _scoring_batch(self, prompt_index: list[int], responses: list[list[int]]) -> dict:
        """The keywords of ``RewardSet.score_tokens`` for ``responses`` (token ids) to the
        prompts in rows ``prompt_index``: a task with a Python ``env.reward`` defines it."""
        raise NotImplementedError(f"{type(self).__name__} has no Python reward to call")

    def encode_guide(self, text: str) -> Tensor:
        """A guide given as text -> the ids of the conditioning prefix; only a task with a
        tokenizer (text) can; toy guides are token ids (or the task's guide token)."""
        raise TokenMDPError(
            f"env {self.name!r} has no tokenizer, so a guide cannot be text; give token ids instead, "
            "e.g. [estimator] guide = [7]"
        )

    def ending_actions(self, t: int) -> Tensor:
        """``[V]`` bool: which next tokens end the episode when ``t`` tokens exist."""
        if t + 1 >= self.horizon:
            return torch.ones(self.vocab_size, dtype=torch.bool)
        ends = torch.zeros(self.vocab_size, dtype=torch.bool)
        if self.eos_token is not None:
            ends[self.eos_token] = True
        return ends

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "vocab_size": self.vocab_size,
            "horizon": self.horizon,
            "eos_token": self.eos_token,
            "num_prompts": int(self.prompts.shape[0]),
        }
