"""Toy-vocabulary token MDPs, contributed through the ``tokenmdp_envs`` hook.

Every task takes ``vocab_size``, ``horizon`` and ``seed`` and ships a base distribution
(a seeded Markov chain over tokens) so a reference model can be built by SFT.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenmdp import EnvSpec, RewardSet, TextTask, TokenMDPEnv, TokenTask, TokenVectorEnv, hookimpl


def finite(name: str, value) -> None:
    """``env.<name>`` must be a finite number (NaN or inf would poison every table)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"env.{name} must be a finite number (got {value!r})")


class ToyTask(TokenTask):
    """Shared parts: seeded prompts ``[BOS, p_1..p_k]`` and a Markov-chain base distribution."""

    def __init__(
        self,
        vocab_size: int = 6,
        horizon: int = 5,
        seed: int = 0,
        eos_token: int | None = None,
        num_prompts: int | None = None,
        prompt_len: int = 1,
        base_scale: float = 1.0,
        reward=None,
        reward_weights=None,
        step_delimiter=None,
    ):
        super().__init__(vocab_size, horizon, seed, eos_token)
        for name, value in (("num_prompts", num_prompts), ("prompt_len", prompt_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"env.{name} must be an integer (got {value!r})")
        finite("base_scale", base_scale)
        if num_prompts is None:
            num_prompts = min(4, vocab_size**prompt_len)
        if not 1 <= num_prompts <= vocab_size**prompt_len:
            raise ValueError(f"env.num_prompts must be in [1, {vocab_size**prompt_len}] (got {num_prompts})")
        if prompt_len < 1:
            raise ValueError(f"env.prompt_len must be >= 1 (got {prompt_len})")
        # Distinct prompts: the first token cycles through the vocabulary, the rest are random.
        content = torch.randint(0, vocab_size, (num_prompts, prompt_len), generator=self.rng)
        content[:, 0] = torch.arange(num_prompts) % vocab_size
        while len({tuple(r) for r in content.tolist()}) < num_prompts:
            content[:, 1:] = torch.randint(0, vocab_size, (num_prompts, prompt_len - 1), generator=self.rng)
        bos = torch.full((num_prompts, 1), self.bos_token)
        self._prompts = torch.cat([bos, content], dim=1)
        # Base distribution: next-token logits depend on the previous token (prompt's last at t=0).
        self.base_table = torch.randn(self.input_vocab_size, vocab_size, generator=self.rng) * base_scale
        #: ``env.reward``: a Python reward in place of the task's own (the text task's forms,
        #: docs/text.md), on token ids; its text is the ids joined by spaces ("3 0 2").
        self.rewards = None
        if reward is not None:
            self.rewards = RewardSet(reward, reward_weights, None, step_delimiter=step_delimiter)
            self.exact = False  # the prefix tree has no table of such a reward: scored by sampling
            self.pays_on_finish = True
        elif reward_weights is not None or step_delimiter is not None:
            raise ValueError("env.reward_weights and env.step_delimiter need env.reward")

    @property
    def prompts(self) -> Tensor:
        return self._prompts

    def base_logits(self, prompt_index: Tensor, prefix: Tensor) -> Tensor:
        last = prefix[:, -1] if prefix.shape[1] else self._prompts[prompt_index, -1]
        return self.base_table[last]

    def _scoring_batch(self, prompt_index: list[int], responses: list[list[int]]) -> dict:
        """What ``env.reward`` is called with: the prompts (BOS dropped) and whole responses
        (EOS included: on a toy task it is a token like any other) as token ids, and their texts."""
        prompts = [self._prompts[i, 1:].tolist() for i in prompt_index]
        words = [[str(t) for t in r] for r in responses]
        return dict(
            prompts=prompts,
            completions=responses,
            text_prompts=[" ".join(map(str, p)) for p in prompts],
            text_completions=[" ".join(w) for w in words],
            indices=list(prompt_index),
            ids=responses,
            extra={},
            # token k's text ends after its digits, the spaces between tokens included
            char_ends=lambda i: [sum(map(len, words[i][: k + 1])) + k for k in range(len(words[i]))],
        )


class PatternTask(ToyTask):
    """Dense reward: +``reward_scale`` for each token that matches the prompt's target pattern."""

    name = "Pattern"

    def __init__(self, reward_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        finite("reward_scale", reward_scale)
        self.reward_scale = reward_scale
        self.target = torch.randint(0, self.vocab_size, (self.prompts.shape[0], self.horizon), generator=self.rng)

    def dense_rewards(self, prompt_index: Tensor, prefix: Tensor) -> Tensor:
        target = self.target[prompt_index, prefix.shape[1]]
        return torch.nn.functional.one_hot(target, self.vocab_size).float() * self.reward_scale


class SumModTask(ToyTask):
    """Delayed reward: ``reward_scale`` at the end iff the sum of all tokens mod ``modulus``
    hits the prompt's target."""

    name = "SumMod"

    def __init__(self, modulus: int = 3, reward_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        finite("reward_scale", reward_scale)
        if modulus < 2:
            raise ValueError(f"env.modulus must be >= 2 (got {modulus})")
        self.modulus = modulus
        self.reward_scale = reward_scale
        self.goal = self.prompts[:, 1] % modulus

    def terminal_reward(self, prompt_index: Tensor, response: Tensor) -> Tensor:
        hit = response.sum(dim=1) % self.modulus == self.goal[prompt_index]
        return hit.float() * self.reward_scale


class SumThresholdTask(ToyTask):
    """Delayed reward: ``reward_scale`` at the end iff the sum of all tokens reaches the prompt's threshold.

    Like ``SumMod`` it pays only on the last token and depends on every token, but the
    running statistic is monotone, so a model can learn it from samples (SFT) as well as
    from rewards; ``SumMod``'s modulo makes it a parity-like feature that is hard to learn.
    """

    name = "SumThreshold"

    def __init__(self, reward_scale: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        finite("reward_scale", reward_scale)
        self.reward_scale = reward_scale
        middle = self.horizon * (self.vocab_size - 1) / 2
        # thresholds around the base median, one per prompt, so each prompt is a different goal
        offsets = torch.randint(0, self.vocab_size, (self.prompts.shape[0],), generator=self.rng)
        self.threshold = (middle + offsets - self.vocab_size // 2).round().long()

    def terminal_reward(self, prompt_index: Tensor, response: Tensor) -> Tensor:
        return (response.sum(dim=1) >= self.threshold[prompt_index]).float() * self.reward_scale


class ForbiddenTask(ToyTask):
    """Harmlessness analogue: each prompt forbids its own tokens; emitting one costs ``penalty``."""

    name = "Forbidden"

    def __init__(self, num_forbidden: int = 2, penalty: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        finite("penalty", penalty)
        if not 1 <= num_forbidden < self.vocab_size:
            raise ValueError(f"env.num_forbidden must be in [1, {self.vocab_size - 1}] (got {num_forbidden})")
        self.penalty = penalty
        order = torch.stack([torch.randperm(self.vocab_size, generator=self.rng) for _ in range(self.prompts.shape[0])])
        self.forbidden = torch.zeros(self.prompts.shape[0], self.vocab_size, dtype=torch.bool)
        self.forbidden.scatter_(1, order[:, :num_forbidden], True)

    def dense_rewards(self, prompt_index: Tensor, prefix: Tensor) -> Tensor:
        return -self.penalty * self.forbidden[prompt_index].float()


class LengthTask(ToyTask):
    """Delayed reward: ``reward_scale`` iff the response ends with EOS at the prompt's target length.

    The targets, EOS included, are spread evenly over ``1..horizon`` across the prompts
    (``[1, 2, 4, 5]`` for 4 prompts and horizon 5) and assigned to prompts by ``seed``. So
    ``pi*`` is short for some prompts and long for others, and a method whose loss favours
    short or long responses shows it in its regret and its mean length. A response cut at
    the horizon without EOS is never paid. ``eos_token`` defaults to 0 here: without an EOS
    every response has the same length, so the task requires one.
    """

    name = "Length"

    def __init__(self, reward_scale: float = 3.0, eos_token: int | None = 0, **kwargs):
        if eos_token is None:
            raise ValueError("env.eos_token must be set for Length (the task rewards where the response ends)")
        super().__init__(eos_token=eos_token, **kwargs)
        finite("reward_scale", reward_scale)
        self.reward_scale = reward_scale
        n = self.prompts.shape[0]
        spread = torch.linspace(1, self.horizon, n).round().long()
        #: ``[num_prompts]``: each prompt's target length, EOS included.
        self.target = spread[torch.randperm(n, generator=self.rng)]

    def terminal_reward(self, prompt_index: Tensor, response: Tensor) -> Tensor:
        hit = (response[:, -1] == self.eos_token) & (response.shape[1] == self.target[prompt_index])
        return hit.float() * self.reward_scale


class BanditTask(ToyTask):
    """One-step bandit: reward table ``r(prompt, a)``; optimum in closed form
    ``pi*(a) ∝ pi_ref(a) exp(r(a)/beta)``. With ``horizon > 1`` the bandit repeats every step.
    """

    name = "Bandit"
    #: The last pull ends the episode (``terminated``): the horizon is the bandit's own end.
    horizon_terminates = True

    def __init__(self, horizon: int = 1, reward_scale: float = 1.0, **kwargs):
        super().__init__(horizon=horizon, **kwargs)
        finite("reward_scale", reward_scale)
        self.table = torch.randn(self.prompts.shape[0], self.vocab_size, generator=self.rng) * reward_scale

    def dense_rewards(self, prompt_index: Tensor, prefix: Tensor) -> Tensor:
        return self.table[prompt_index]


TASKS = [PatternTask, SumModTask, SumThresholdTask, ForbiddenTask, LengthTask, BanditTask]


@hookimpl
def tokenmdp_envs():
    # tokenmdp/Text-v0: prompts from a file, a real tokenizer, a module:function reward (docs/text.md)
    return [
        EnvSpec(
            name=task.name,
            entry_point=TokenMDPEnv.factory(task),
            vector_entry_point=TokenVectorEnv.factory(task),
            description=(task.__doc__ or "").strip().splitlines()[0],
        )
        for task in [*TASKS, TextTask]
    ]
