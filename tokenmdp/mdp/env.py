"""The token MDP as Gymnasium environments around a :class:`~tokenmdp.mdp.task.TokenTask`.

:class:`TokenMDPEnv` is the single-episode ``gymnasium.Env``; :class:`TokenVectorEnv` is
the torch-native batched form the trainer uses. Both read the task for prompts, rewards
and the horizon, so the exact solver, the env and the trainer agree by construction.

State ``s_t = (prompt, y_<t)``; action = next token; ``terminated`` when EOS is emitted,
``truncated`` when ``horizon`` (max_new_tokens) tokens have been emitted.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from torch import Tensor

from ..errors import InvalidActionError, TokenMDPError
from .task import TokenTask

#: Action dtypes :meth:`TokenVectorEnv.play` takes in one go (any other goes step by step).
_INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_action(task: TokenTask, action: Any) -> int:
    try:
        a = int(action)
        ok = a == action and 0 <= a < task.vocab_size
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise InvalidActionError(
            f"action {action!r} is outside the vocabulary; valid actions are integers 0..{task.vocab_size - 1}"
        )
    return a


def _observation_space(task: TokenTask) -> spaces.Dict:
    prompt_len = task.prompts.shape[1]
    space = {
        "prompt": spaces.MultiDiscrete(np.full(prompt_len, task.input_vocab_size), dtype=np.int64),
        # Slots not yet generated hold ``vocab_size`` (a padding id that is never an action).
        "response": spaces.MultiDiscrete(np.full(task.horizon, task.vocab_size + 1), dtype=np.int64),
        "length": spaces.Discrete(task.horizon + 1),
    }
    if task.padded_prompts:  # text: 1 on real prompt tokens, 0 on left padding
        space["prompt_mask"] = spaces.MultiBinary(prompt_len)
    return spaces.Dict(space)


class TokenMDPEnv(gymnasium.Env):
    """One episode = one response to one prompt; rewards come from the task."""

    metadata = {"render_modes": ["ansi"]}

    def __init__(self, task: TokenTask, render_mode: str | None = None):
        self.task = task
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(task.vocab_size)
        self.observation_space = _observation_space(task)
        self._prompt_index = 0
        self._response: list[int] = []
        self._done = True

    @classmethod
    def factory(cls, task_cls: type[TokenTask]):
        """An entry point for ``gymnasium.register``: kwargs go to the task."""

        def make(render_mode: str | None = None, **task_kwargs):
            return cls(task_cls(**task_kwargs), render_mode=render_mode)

        make.__name__ = f"make_{task_cls.__name__}"
        make.task_cls = task_cls
        return make

    def _obs(self) -> dict[str, Any]:
        response = np.full(self.task.horizon, self.task.vocab_size, dtype=np.int64)
        response[: len(self._response)] = self._response
        obs = {
            "prompt": self.task.prompts[self._prompt_index].numpy().astype(np.int64),
            "response": response,
            "length": len(self._response),
        }
        if self.task.padded_prompts:
            obs["prompt_mask"] = self.task.prompt_mask[self._prompt_index].numpy().astype(np.int8)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        num_prompts = self.task.prompts.shape[0]
        if options and "prompt_index" in options:
            index = int(options["prompt_index"])
            if not 0 <= index < num_prompts:
                raise TokenMDPError(f"options.prompt_index must be in [0, {num_prompts}) (got {index})")
        else:
            p = self.task.prompt_probs.double().numpy()
            index = int(self.np_random.choice(num_prompts, p=p / p.sum()))
        self._prompt_index = index
        self._response = []
        self._done = False
        return self._obs(), {"prompt_index": index}

    def step(self, action):
        if self._done:
            raise TokenMDPError("step() called on a finished episode; call reset() first")
        a = check_action(self.task, action)
        t = len(self._response)
        prefix = torch.tensor([self._response], dtype=torch.long).view(1, t)
        reward = float(self.task.action_rewards(torch.tensor([self._prompt_index]), prefix, torch.tensor([a]))[0])
        self._response.append(a)
        at_horizon = len(self._response) >= self.task.horizon
        terminated = (self.task.eos_token is not None and a == self.task.eos_token) or (
            at_horizon and self.task.horizon_terminates
        )
        truncated = not terminated and at_horizon
        self._done = terminated or truncated
        return self._obs(), reward, terminated, truncated, {"prompt_index": self._prompt_index}

    def render(self):
        if self.render_mode == "ansi":
            prompt = self.task.prompts[self._prompt_index].tolist()
            return f"prompt={prompt} response={self._response}"
        return None


class TokenVectorEnv(gymnasium.vector.VectorEnv):
    """A batch of token MDPs as torch tensors: no Python loop over environments.

    ``compute_rewards=False`` makes every reward 0 without calling the task's reward
    function, for methods that must never see it (Inverse-Q* with a guide).
    """

    def __init__(
        self,
        task: TokenTask,
        num_envs: int = 1,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        compute_rewards: bool = True,
        render_mode: str | None = None,
    ):
        self.task = task
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.compute_rewards = compute_rewards
        mode = AutoresetMode(autoreset_mode)
        if mode == AutoresetMode.SAME_STEP:
            raise TokenMDPError("TokenVectorEnv supports autoreset_mode NextStep or Disabled")
        self.metadata = {"autoreset_mode": mode, "render_modes": []}
        self.single_action_space = spaces.Discrete(task.vocab_size)
        self.single_observation_space = _observation_space(task)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.prompt_index = torch.zeros(num_envs, dtype=torch.long)
        self.response = torch.full((num_envs, task.horizon), task.vocab_size, dtype=torch.long)
        self.length = torch.zeros(num_envs, dtype=torch.long)
        self.done = torch.ones(num_envs, dtype=torch.bool)
        self._pending_reset = torch.zeros(num_envs, dtype=torch.bool)
        self._torch_rng = torch.Generator()

    @classmethod
    def factory(cls, task_cls: type[TokenTask]):
        """A ``vector_entry_point``: ``make_vec(id, num_envs=..., **task_kwargs)``."""

        def make(
            num_envs: int = 1,
            autoreset_mode=AutoresetMode.NEXT_STEP,
            compute_rewards=True,
            render_mode=None,
            **task_kwargs,
        ):
            return cls(
                task_cls(**task_kwargs),
                num_envs=num_envs,
                autoreset_mode=autoreset_mode,
                compute_rewards=compute_rewards,
                render_mode=render_mode,
            )

        make.__name__ = f"make_vec_{task_cls.__name__}"
        make.task_cls = task_cls
        return make

    def _obs(self) -> dict[str, Tensor]:
        obs = {
            "prompt": self.task.prompts[self.prompt_index],
            "response": self.response.clone(),
            "length": self.length.clone(),
        }
        if self.task.padded_prompts:
            obs["prompt_mask"] = self.task.prompt_mask[self.prompt_index]
        return obs

    def _reset_rows(self, rows: Tensor, prompt_index: Tensor | None = None) -> None:
        n = int(rows.sum())
        if n == 0:
            return
        if prompt_index is None:
            prompt_index = torch.multinomial(self.task.prompt_probs, n, replacement=True, generator=self._torch_rng)
        self.prompt_index[rows] = prompt_index
        self.response[rows] = self.task.vocab_size
        self.length[rows] = 0
        self.done[rows] = False

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Options: ``prompt_index`` (fix the prompts), ``reset_mask`` (reset only these
        rows) and ``samples_per_prompt = G``: every row is reset and the ``num_envs / G``
        drawn prompts are each given to G consecutive rows; ``info["group_index"]`` then
        numbers the draws (rows with one value answer one draw of a prompt)."""
        super().reset(seed=seed)
        if seed is not None:
            self._torch_rng.manual_seed(seed)
        elif not hasattr(self, "_seeded"):
            self._torch_rng.manual_seed(int(self.np_random.integers(2**62)))
        self._seeded = True
        options = options or {}
        group_size = options.get("samples_per_prompt", 1)
        if group_size != 1:
            return self._reset_groups(group_size, options)
        rows = options.get("reset_mask")
        rows = torch.ones(self.num_envs, dtype=torch.bool) if rows is None else torch.as_tensor(rows, dtype=torch.bool)
        given = self._given_prompts(options)
        if given is not None:
            given = given[rows] if given.numel() == self.num_envs else given
        self._reset_rows(rows, given)
        self._pending_reset[rows] = False
        return self._obs(), {"prompt_index": self.prompt_index.clone()}

    def _reset_groups(self, group_size: int, options: dict):
        if (
            isinstance(group_size, bool)
            or not isinstance(group_size, int)
            or group_size < 1
            or self.num_envs % group_size
        ):
            raise TokenMDPError(
                f"options.samples_per_prompt must be a positive integer that divides num_envs = "
                f"{self.num_envs} (got {group_size!r})"
            )
        if options.get("reset_mask") is not None:
            raise TokenMDPError("options.samples_per_prompt resets every row; it takes no reset_mask")
        groups = self.num_envs // group_size
        index = self._given_prompts(options)  # the caller's prompts, one per row, grouped in order
        if index is None:
            probs = self.task.prompt_probs
            # Distinct prompts within a step whenever the task has enough of them (as TRL's
            # sampler), so no two groups answer the same prompt.
            distinct = int((probs > 0).sum()) >= groups
            drawn = torch.multinomial(probs, groups, replacement=not distinct, generator=self._torch_rng)
            index = drawn.repeat_interleave(group_size)
        elif index.numel() != self.num_envs:
            raise TokenMDPError(
                f"options.prompt_index with samples_per_prompt needs one prompt per row "
                f"({self.num_envs}; got {index.numel()})"
            )
        self._reset_rows(torch.ones(self.num_envs, dtype=torch.bool), index)
        self._pending_reset[:] = False
        info = {
            "prompt_index": self.prompt_index.clone(),
            "group_index": torch.arange(groups).repeat_interleave(group_size),
        }
        return self._obs(), info

    def _given_prompts(self, options: dict) -> Tensor | None:
        given = options.get("prompt_index")
        if given is None:
            return None
        given = torch.as_tensor(given, dtype=torch.long)
        if given.min() < 0 or given.max() >= self.task.prompts.shape[0]:
            raise TokenMDPError(f"options.prompt_index must be in [0, {self.task.prompts.shape[0]})")
        return given

    def play(self, actions: Tensor) -> Tensor:
        """Step the envs (just reset) through every column of ``actions`` (``[num_envs, T]``)
        until all are done; the ``[num_envs, T]`` rewards. The same as calling :meth:`step`
        column by column, except that in an env without autoreset a task paid on the finished
        response (``pays_on_finish``) scores the whole batch at the end with one
        :meth:`TokenTask.response_rewards` call (a batch reward is called once, not once
        per step at which some response ended), which also places a dense or step reward
        on the tokens it names."""
        rewards = torch.zeros(actions.shape)
        # with autoreset a finished row restarts on the next step, so only a non-resetting
        # env still holds every finished response at the end
        still_held = self.metadata["autoreset_mode"] == AutoresetMode.DISABLED
        deferred = self.compute_rewards and self.task.pays_on_finish and still_held
        self.compute_rewards = not deferred and self.compute_rewards
        try:
            if self.compute_rewards or not still_held or not self._play_at_once(actions):
                for t in range(actions.shape[1]):
                    if bool(self.done.all()):
                        break
                    _, rewards[:, t], _, _, _ = self.step(actions[:, t])
        finally:
            self.compute_rewards = self.compute_rewards or deferred
        if deferred:
            finished = (self.done & (self.length > 0)).nonzero().squeeze(1)
            if finished.numel():
                lengths = self.length[finished]
                mask = (torch.arange(self.task.horizon)[None] < lengths[:, None]).float()
                values = self.task.response_rewards(self.prompt_index[finished], self.response[finished], mask)
                width = min(values.shape[1], rewards.shape[1])  # a response never outgrows the actions
                rewards[finished, :width] = values[:, :width].to(rewards.dtype)
        return rewards

    def _play_at_once(self, actions: Tensor) -> bool:
        """:meth:`play`'s column-by-column :meth:`step` calls in one go, for an env that pays
        nothing per step and never restarts a row (the state they would leave, without 25
        small tensor operations per token); False, having changed nothing, where rows are
        already under way or an action is out of range (the steps then raise as usual)."""
        if type(self).step is not TokenVectorEnv.step:  # a subclass's own step is always called
            return False
        if actions.dim() != 2 or actions.shape[0] != self.num_envs or actions.dtype not in _INTEGERS:
            return False
        if bool((self.length != 0).any()) or bool(((actions < 0) | (actions >= self.task.vocab_size)).any()):
            return False
        columns = min(actions.shape[1], self.task.horizon)
        taken = actions[:, :columns].long()
        ends = torch.full((self.num_envs,), columns, dtype=torch.long)
        eos = torch.zeros(self.num_envs, dtype=torch.bool)
        if self.task.eos_token is not None:
            is_eos = taken == self.task.eos_token
            eos = is_eos.any(1)
            ends = torch.where(eos, is_eos.int().argmax(1) + 1, ends)
        active = ~self.done
        ends = torch.where(active, ends, 0)
        written = torch.arange(columns)[None] < ends[:, None]
        self.response[:, :columns] = torch.where(written, taken, self.response[:, :columns])
        self.length.copy_(ends)
        at_horizon = active & (ends >= self.task.horizon)
        terminated = active & eos
        if self.task.horizon_terminates:
            terminated = terminated | at_horizon
        self.done |= terminated | (~terminated & at_horizon)
        return True

    def step(self, actions):
        given = actions
        try:
            actions = torch.as_tensor(np.asarray(actions) if not isinstance(actions, Tensor) else actions)
            bad = (
                actions.shape != (self.num_envs,)
                or actions.dtype.is_floating_point
                or actions.dtype.is_complex
                or bool(((actions < 0) | (actions >= self.task.vocab_size)).any())
            )
        except (TypeError, ValueError, RuntimeError, OverflowError):
            bad = True
        if bad:
            shown = given.tolist() if isinstance(given, (Tensor, np.ndarray)) else given
            raise InvalidActionError(
                f"actions must be {self.num_envs} integers in 0..{self.task.vocab_size - 1} (got {shown!r})"
            )
        actions = actions.long()
        rewards = torch.zeros(self.num_envs)
        terminated = torch.zeros(self.num_envs, dtype=torch.bool)
        truncated = torch.zeros(self.num_envs, dtype=torch.bool)
        # NEXT_STEP autoreset: envs that finished on the previous step restart and ignore their action.
        restarting = self._pending_reset.clone()
        self._reset_rows(restarting)
        active = ~self.done & ~restarting
        if self.compute_rewards and active.any():
            for t in self.length[active].unique().tolist():
                rows = active & (self.length == t)
                rewards[rows] = self.task.action_rewards(
                    self.prompt_index[rows], self.response[rows, :t], actions[rows]
                )
        rows = active.nonzero().squeeze(1)
        self.response[rows, self.length[rows]] = actions[rows]
        self.length[rows] += 1
        if self.task.eos_token is not None:
            terminated = active & (actions == self.task.eos_token)
        at_horizon = active & (self.length >= self.task.horizon)
        if self.task.horizon_terminates:
            terminated = terminated | at_horizon
        truncated = ~terminated & at_horizon
        self.done |= terminated | truncated
        if self.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP:
            self._pending_reset = terminated | truncated
        return self._obs(), rewards, terminated, truncated, {"prompt_index": self.prompt_index.clone()}
