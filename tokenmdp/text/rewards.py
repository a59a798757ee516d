"""``env.reward`` of a text task: one or several rewards, each of three kinds, weighted.

- ``module:function`` taking ``(prompt, completion) -> float``: called once per response;
- ``module:function`` written for TRL's ``GRPOTrainer``, ``(prompts, completions, **kwargs)
  -> list[float]`` (its first parameter is named ``prompts`` or it has a ``completions``
  parameter): called once for all the responses that are scored together, with TRL's
  keyword arguments (``completion_ids``, the prompts' other dataset columns);
- ``hf:DIR``: a local ``AutoModelForSequenceClassification`` with one output, scoring
  ``prompt + completion`` in batches on the policy's device.

A batch's reward is ``sum_i w_i r_i`` (``env.reward_weights``, default 1 each). A reward
that raises, calls ``sys.exit()``, takes longer than ``env.reward_timeout``, or returns
anything but finite numbers (one per response) stops the run with a ``RewardError`` that
names it.
"""

from __future__ import annotations

import inspect
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, RewardError


class Reward:
    """One entry of ``env.reward``."""

    def __init__(self, spec: str, weight: float, fn: Callable, batched: bool):
        self.spec, self.weight, self.fn, self.batched = spec, weight, fn, batched

    @classmethod
    def resolve(cls, spec: Any, weight: float) -> Reward:
        from .task import resolve_callable

        if isinstance(spec, str) and spec.startswith("hf:"):
            return cls(spec, weight, SequenceClassifierReward(spec[3:], spec), batched=True)
        if callable(spec):  # a function given to tokenmdp.train
            fn, spec = spec, f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', type(spec).__name__)}"
        else:
            fn = resolve_callable(spec)
        return cls(spec, weight, fn, batched=takes_batches(fn))


def takes_batches(fn: Callable) -> bool:
    """Whether ``fn`` has TRL's reward signature ``(prompts, completions, **kwargs)``."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and (params[0] == "prompts" or "completions" in params)


class RewardSet:
    """The rewards of ``env.reward`` with their weights; scores many responses at once."""

    def __init__(self, specs: str | Sequence[str], weights: Sequence[float] | None, timeout: float | None):
        specs = [specs] if isinstance(specs, str) or callable(specs) else list(specs)
        if not specs:
            raise ConfigError("env.reward: an empty list; name a reward, or leave env.reward unset")
        if weights is None:
            weights = [1.0] * len(specs)
        if isinstance(weights, (int, float)) and not isinstance(weights, bool):
            weights = [weights]
        bad = not isinstance(weights, (list, tuple)) or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights
        )
        if bad or len(weights) != len(specs):
            raise ConfigError(
                f"env.reward_weights must be {len(specs)} finite number(s), one per env.reward (got {weights!r})"
            )
        self.rewards = [Reward.resolve(spec, float(w)) for spec, w in zip(specs, weights)]
        self.timeout = timeout
        names = [r.spec for r in self.rewards]
        self.name = names[0] if len(names) == 1 else " + ".join(f"{w:g}*{s}" for s, w in zip(names, weights))

    def place(self, device: torch.device) -> None:
        """Score with reward models on ``device`` (the policy's)."""
        for reward in self.rewards:
            if isinstance(reward.fn, SequenceClassifierReward):
                reward.fn.device = torch.device(device)

    def score(
        self,
        prompts: list,
        completions: list,
        text_prompts: list[str],
        text_completions: list[str],
        indices: list[int],
        ids: list[list[int]],
        extra: dict,
    ) -> list[float]:
        """The weighted reward of each response. A batch reward receives ``prompts`` and
        ``completions`` as TRL gives them (strings, or conversations for chat prompts),
        ``completion_ids`` and ``extra`` (the prompts' other dataset columns) as keywords;
        a per-response reward receives the texts (a chat prompt after its template).
        ``indices`` are the prompts' rows, for messages."""
        total = [0.0] * len(prompts)
        for reward in self.rewards:
            if reward.batched:
                values = self._batch(reward, prompts, completions, ids, extra)
            else:
                values = [self._one(reward, p, c, i) for p, c, i in zip(text_prompts, text_completions, indices)]
            for i, v in enumerate(values):
                total[i] += reward.weight * v
        return total

    def _one(self, reward: Reward, prompt: str, completion: str, index: int) -> float:
        where = f"on prompt {index} (completion {completion[:60]!r})"
        value = self._call(reward, where, prompt, completion)
        return _checked(reward, value, where)

    def _batch(self, reward: Reward, prompts, completions, ids, extra) -> list[float]:
        where = f"on a batch of {len(prompts)} responses"
        values = self._call(reward, where, prompts, completions, completion_ids=ids, **extra)
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)[:60]
            raise RewardError(
                f"reward {reward.spec!r} returned {got} {where}; a batch reward returns one number per completion"
            )
        return [_checked(reward, v, f"{where} (completion {i})") for i, v in enumerate(values)]

    def _call(self, reward: Reward, where: str, *args, **kwargs):
        """The call, bounded by ``env.reward_timeout`` seconds when set (it runs in a daemon
        thread; a call that does not return in time stops the run)."""
        try:
            if self.timeout is None:
                return reward.fn(*args, **kwargs)
            box: list = []

            def call():
                try:
                    box.append((True, reward.fn(*args, **kwargs)))
                except BaseException as exc:  # handed back to the caller's thread
                    box.append((False, exc))

            worker = threading.Thread(target=call, daemon=True, name="tokenmdp-reward")
            worker.start()
            worker.join(self.timeout)
            if not box:
                raise TimeoutError(f"no answer within env.reward_timeout = {self.timeout:g} s")
            ok, value = box[0]
            if not ok:
                raise value
            return value
        except RewardError:
            raise
        except (Exception, SystemExit) as exc:  # a reward that calls sys.exit() must not end the run as a success
            raise RewardError(f"reward {reward.spec!r} raised {where}: {type(exc).__name__}: {exc}") from exc


def _checked(reward: Reward, value, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(
            f"reward {reward.spec!r} returned {value!r} ({type(value).__name__}) {where}; "
            "rewards must be numbers (int or float)"
        )
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"reward {reward.spec!r} returned {value} {where}; rewards must be finite numbers")
    return value


class SequenceClassifierReward:
    """``hf:DIR``: a local sequence-classification model with one output (a reward model),
    scoring ``prompt + completion`` in batches of ``batch_size``, without gradients, on
    ``device``. Built on first use."""

    batch_size = 32

    def __init__(self, path: str, spec: str):
        self.path, self.spec = path, spec
        self.device = torch.device("cpu")
        self._model = self._tokenizer = None
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"env.reward {spec!r}: {path!r} holds no model (no config.json)")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        architectures = getattr(config, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ConfigError(
                f"env.reward {spec!r}: {path!r} is not a sequence-classification model "
                f"(its architectures: {', '.join(architectures) or 'none'}); save one with "
                "AutoModelForSequenceClassification(..., num_labels=1).save_pretrained"
            )
        if getattr(config, "num_labels", 1) != 1:
            raise ConfigError(
                f"env.reward {spec!r}: the model has {config.num_labels} labels; a reward model has one output"
            )

    def _load(self):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        except Exception as exc:
            raise ConfigError(f"env.reward {self.spec!r}: no tokenizer in {self.path!r}: {exc}") from None
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token or self._tokenizer.unk_token
        self._tokenizer.padding_side = "right"
        model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self._tokenizer.pad_token_id
        self._model = model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if self._model is None or next(self._model.parameters()).device != self.device:
            self._load()
        texts = [_text(p) + _text(c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = self._tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True)
            chunk = {k: v.to(self.device) for k, v in chunk.items()}
            scores += self._model(**chunk).logits[:, 0].float().tolist()
        return scores


def _text(x) -> str:
    """A prompt or completion as text (a conversation: its messages' contents, in order)."""
    return x if isinstance(x, str) else "".join(str(m.get("content", "")) for m in x)
