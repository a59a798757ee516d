"""``env.reward`` of a text task: one or several rewards, each of three forms, weighted.

- **TRL's form**: a function (or callable object, ``functools.partial``, ``async def``)
  written for TRL's ``GRPOTrainer``, called once for all the responses scored together,
  exactly as TRL 1.16 calls it: keywords only, ``prompts=``, ``completions=``,
  ``completion_ids=``, every other dataset column of the prompts, ``trainer_state=`` (an
  object with ``global_step`` and ``max_steps``), ``log_extra=(column, values)`` (adds a
  column to the logged completions) and ``log_metric=(name, value)`` (adds a scalar to the
  step's metrics). It returns one number or ``None`` per completion. A function has this
  form when it names one of those keywords (``completions``, ``completion_ids``, ...) or
  takes only ``**kwargs``.
- **tokenmdp's per-response form**: ``(prompt, completion) -> float``, two positional
  parameters named anything else (``prompt``, ``text``, ...), called once per response.
- ``hf:DIR``: a local ``AutoModelForSequenceClassification`` with one output, scoring
  ``prompt + completion`` in batches on the policy's device.

A signature that fits neither form, or both (``(*args, **kwargs)``), is a one-line error
that shows both. A batch's reward is ``sum_i w_i r_i`` (``env.reward_weights``, default 1
each) over the rewards that did not return ``None`` for that completion, as TRL's weighted
``nansum``; a completion for which every reward returned ``None`` stops the run (TRL warns
and gives it no advantage; here it is a one-line error naming the completion). Async
rewards of one batch run concurrently (``asyncio.gather``), as TRL runs them. A reward
that raises, calls ``sys.exit()`` or ``os._exit()``, takes longer than
``env.reward_timeout``, or returns anything but finite numbers and ``None`` (one per
response) stops the run with a ``RewardError`` that names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from ..errors import ConfigError, RewardError
from .callables import resolve_callable
from .reward_tokens import Scored, number, place, placed, step_ends, token_at

#: The keywords TRL's GRPOTrainer passes to every reward function (besides dataset columns).
TRL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")

FORMS = (
    "TRL's form, keywords only: def reward(completions, **kwargs) -> list[float | None] "
    "(also prompts=, completion_ids=, dataset columns, trainer_state=, log_extra=, log_metric=); "
    "or tokenmdp's per-response form: def reward(prompt, completion) -> float"
)


@attrs.define
class RewardState:
    """What TRL's ``trainer_state`` offers a reward: the training step being scored (0 for
    the reference's evaluation) and the run's last step."""

    global_step: int = 0
    max_steps: int = 0


def reward_form(fn: Callable, spec: str, key: str = "env.reward") -> str:
    """``"trl"`` or ``"pair"`` (see the module's docstring); anything else is a ConfigError."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key} {spec!r}: its signature cannot be read; write it in one of the forms: {FORMS}"
        ) from None
    kinds = inspect.Parameter
    named = [p for p in params if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
    required = [p for p in named if p.default is kinds.empty]
    var_keyword = any(p.kind is kinds.VAR_KEYWORD for p in params)
    if any(p.name in TRL_KEYWORDS for p in named):
        # TRL calls with keywords only, so a positional-only parameter never receives a value,
        # and without **kwargs every keyword TRL passes must be a parameter
        positional_only = [p.name for p in required if p.kind is kinds.POSITIONAL_ONLY]
        missing = [k for k in TRL_KEYWORDS if k not in {p.name for p in named}]
        if positional_only or (missing and not var_keyword):
            why = (
                f"positional-only {', '.join(positional_only)}"
                if positional_only
                else f"no **kwargs for {', '.join(missing)}"
            )
            raise ConfigError(f"{key} {spec!r}: a TRL-style reward with {why}; write it in one of the forms: {FORMS}")
        return "trl"
    positional = [p for p in named if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind is kinds.VAR_POSITIONAL for p in params)
    pair = (
        (len(positional) >= 2 or var_positional)
        and sum(p in required for p in positional) <= 2
        and not any(p.kind is kinds.KEYWORD_ONLY for p in required)
    )
    trl = var_keyword and not required
    if pair != trl:
        return "pair" if pair else "trl"
    fits = "both forms" if pair else "neither form"
    raise ConfigError(f"{key} {spec!r}: its signature {inspect.signature(fn)} fits {fits}; write it as {FORMS}")


class Reward:
    """One entry of ``env.reward``."""

    def __init__(self, spec: str, weight: float, fn: Callable, form: str, delimiter: str | None = None):
        self.spec, self.weight, self.fn, self.form = spec, weight, fn, form
        #: ``env.step_delimiter``: a step (process) reward, called on each step's prefix
        self.delimiter = delimiter

    @classmethod
    def resolve(cls, spec: Any, weight: float, key: str = "env.reward") -> Reward:
        if isinstance(spec, str) and spec.startswith("hf:"):
            return cls(spec, weight, SequenceClassifierReward(spec[3:], spec), form="trl")
        if callable(spec):  # a function given to tokenmdp.train
            fn, spec = spec, f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', type(spec).__name__)}"
        else:
            fn = resolve_callable(spec, key)
        return cls(spec, weight, fn, form=reward_form(fn, spec, key))


class RewardSet:
    """The rewards of ``env.reward`` with their weights; scores many responses at once.

    ``state`` is what rewards receive as ``trainer_state``; ``drain_logs`` hands over what
    they logged through ``log_metric`` and ``log_extra`` since the last call."""

    def __init__(
        self,
        specs,
        weights: Sequence[float] | None,
        timeout: float | None,
        key: str = "env.reward",
        step_delimiter: str | dict | None = None,
    ):
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
        self.rewards = [Reward.resolve(spec, float(w), key) for spec, w in zip(specs, weights)]
        for reward, delimiter in zip(self.rewards, _delimiters(step_delimiter, [r.spec for r in self.rewards])):
            reward.delimiter = delimiter
        self.timeout = timeout
        self.state = RewardState()
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._columns: dict[str, list] = defaultdict(list)
        names = [r.spec for r in self.rewards]
        self.name = names[0] if len(names) == 1 else " + ".join(f"{w:g}*{s}" for s, w in zip(names, weights))

    def place(self, device: torch.device) -> None:
        """Score with reward models on ``device`` (the policy's)."""
        for reward in self.rewards:
            if isinstance(reward.fn, SequenceClassifierReward):
                reward.fn.device = torch.device(device)

    def drain_logs(self) -> tuple[dict[str, float], dict[str, list]]:
        """What rewards logged since the last call: each ``log_metric`` name's mean (as TRL
        averages them over a logging step) and each ``log_extra`` column's values."""
        metrics = {name: sum(values) / len(values) for name, values in self._metrics.items() if values}
        columns = dict(self._columns)
        self._metrics.clear()
        self._columns.clear()
        return metrics, columns

    def _log_metric(self, name: str, value: float) -> None:
        self._metrics[str(name)].append(float(value))

    def _log_extra(self, column: str, values: list) -> None:
        self._columns[str(column)].extend(values)

    def score(self, **batch) -> list[float]:
        """The weighted reward ``R(x, y)`` of each response (:meth:`score_tokens`' totals)."""
        return [scored.total for scored in self.score_tokens(**batch)]

    def response_rewards(self, lengths: list[int], width: int, **batch) -> torch.Tensor:
        """``[N, width]`` float64: :meth:`score_tokens` placed on the responses' tokens, the
        responses being ``lengths`` tokens long (EOS included; :func:`.reward_tokens.placed`)."""
        return placed(self.score_tokens(**batch), lengths, width)

    def score_tokens(
        self,
        prompts: list,
        completions: list,
        text_prompts: list[str],
        text_completions: list[str],
        indices: list[int],
        ids: list[list[int]],
        extra: dict,
        char_ends: Callable[[int], list[int]] | None = None,
    ) -> list[Scored]:
        """The weighted reward of each response, with where it lands (:class:`Scored`). A
        TRL-form reward receives ``prompts`` and ``completions`` as TRL gives them (strings,
        or conversations for chat prompts), ``completion_ids``, ``extra`` (the prompts' other
        dataset columns) and TRL's ``trainer_state``, ``log_extra`` and ``log_metric``, all as
        keywords; a per-response reward receives the texts (a chat prompt after its
        template). ``indices`` are the prompts' rows, for messages. ``char_ends(i)``: where
        each token of completion ``i`` ends in its text (:func:`.reward_tokens.token_char_ends`),
        read for spans and steps only. A step reward (``env.step_delimiter``) is called on
        every step's prefix of every completion instead."""
        n = len(prompts)
        batch = dict(
            prompts=prompts,
            completions=completions,
            text_prompts=text_prompts,
            text_completions=text_completions,
            indices=indices,
            ids=ids,
            extra=extra,
        )
        ends_cache: dict[int, list[int]] = {}

        def ends(i: int) -> list[int]:
            if char_ends is None:
                raise RewardError(f"reward {self.name!r}: spans and steps need the completions' token offsets")
            if i not in ends_cache:
                ends_cache[i] = char_ends(i)
            return ends_cache[i]

        calls = []  # per reward: (the batch it is called on, where each of its values lands)
        for reward in self.rewards:
            if reward.delimiter is None:
                calls.append((batch, None))
            else:
                calls.append(self._step_batch(reward, batch, ends))
        outputs = self._await_all([self._call_on(reward, b) for reward, (b, _) in zip(self.rewards, calls)])
        total: list[float | None] = [None] * n
        tokens: list[list[float] | None] = [None] * n
        for reward, (b, steps), out in zip(self.rewards, calls, outputs):
            m = len(b["prompts"])
            if reward.form == "trl":
                values = _batch_values(reward, out, m, f"on a batch of {m} responses")
            else:
                values = out
            for j, value in enumerate(values):
                where = _where(b["indices"][j], b["text_completions"][j])
                if steps is None:
                    i = j
                    placed = place(value, reward.spec, where, len(ids[i]), text_completions[i], lambda i=i: ends(i))
                else:
                    i, position = steps[j]
                    placed = None if value is None else _step_value(reward, value, where)
                    if placed is not None and position is not None:
                        placed = tuple(placed if k == position else 0.0 for k in range(len(ids[i])))
                if placed is None:  # TRL's nansum: a reward that does not apply is left out
                    continue
                if isinstance(placed, tuple):
                    row = tokens[i] if tokens[i] is not None else [0.0] * len(placed)
                    tokens[i] = [a + reward.weight * v for a, v in zip(row, placed)]
                    total[i] = total[i] or 0.0
                else:
                    total[i] = (total[i] or 0.0) + reward.weight * placed
        for i, value in enumerate(total):
            if value is None:
                raise RewardError(
                    f"reward {self.name!r} returned None {_where(indices[i], text_completions[i])}, and no other "
                    "reward scored that completion; None means 'does not apply', and one reward must apply"
                )
        return [Scored(final, None if row is None else tuple(row)) for final, row in zip(total, tokens)]

    def _call_on(self, reward: Reward, b: dict) -> Any:
        """``reward`` called on batch ``b``: once (TRL's form) or once per response."""
        if reward.form == "trl":
            keywords = dict(
                prompts=b["prompts"],
                completions=b["completions"],
                completion_ids=b["ids"],
                **b["extra"],
                trainer_state=self.state,
                log_extra=self._log_extra,
                log_metric=self._log_metric,
            )
            where = f"on a batch of {len(b['prompts'])} responses"
            return self._call(reward, where, lambda: reward.fn(**keywords))
        return [
            self._call(reward, _where(i, c), lambda p=p, c=c: reward.fn(p, c))
            for p, c, i in zip(b["text_prompts"], b["text_completions"], b["indices"])
        ]

    def _step_batch(self, reward: Reward, batch: dict, ends) -> tuple[dict, list[tuple[int, int | None]]]:
        """The prefixes a step reward scores: every step of every completion, with where each
        value lands, ``(completion, token)``: the step's last token (None for an empty
        completion, scored as one empty step: its value lands on the response's last token)."""
        texts, delimiter = batch["text_completions"], reward.delimiter
        if texts and not any(delimiter in t for t in texts):
            raise RewardError(
                f"reward {reward.spec!r}: its step delimiter {delimiter!r} occurs in none of the {len(texts)} "
                f"completions {_where(batch['indices'][0], texts[0])}; check env.step_delimiter"
            )
        rows: dict[str, list] = {k: [] for k in ("prompts", "completions", "text_prompts", "text_completions")}
        rows.update(indices=[], ids=[], extra={name: [] for name in batch["extra"]})
        lands: list[tuple[int, int | None]] = []
        for i, text in enumerate(texts):
            start = 0
            for end in step_ends(text, delimiter) or [0]:
                position = token_at(ends(i), end, start) if end else None
                start = end
                prefix = text[:end]
                chat = not isinstance(batch["completions"][i], str)
                rows["prompts"].append(batch["prompts"][i])
                rows["completions"].append([{"role": "assistant", "content": prefix}] if chat else prefix)
                rows["text_prompts"].append(batch["text_prompts"][i])
                rows["text_completions"].append(prefix)
                rows["indices"].append(batch["indices"][i])
                rows["ids"].append(batch["ids"][i][: 0 if position is None else position + 1])
                for name, column in batch["extra"].items():
                    rows["extra"][name].append(column[i])
                lands.append((i, position))
        return rows, lands

    def _call(self, reward: Reward, where: str, call: Callable[[], Any]) -> Any:
        """``call()`` with ``os._exit`` refused, bounded by ``env.reward_timeout`` seconds
        when set (it then runs in a daemon thread; a call that does not return in time stops
        the run). Awaitables come back as they are; :meth:`_await_all` runs them."""
        with exit_refused(reward.spec, where):
            return _bounded(reward, where, call, self.timeout)

    def _await_all(self, outputs: list[Any]) -> list[Any]:
        """Run every awaitable among ``outputs`` (an async reward's batch, or each response
        of an async per-response reward) concurrently in one event loop, as TRL gathers its
        async rewards, on a thread of its own (so a caller's running loop is no obstacle)."""
        pending = []
        for k, out in enumerate(outputs):
            if inspect.isawaitable(out):
                pending.append((k, None, out))
            elif isinstance(out, list):
                pending += [(k, j, v) for j, v in enumerate(out) if inspect.isawaitable(v)]
        if not pending:
            return outputs

        async def named(k, awaitable):
            try:
                return await awaitable
            except BaseException as exc:  # which reward failed, for the message
                raise _Failed(self.rewards[k], exc) from exc

        async def gather():
            return await asyncio.gather(*(named(k, a) for k, _, a in pending))

        first = self.rewards[pending[0][0]]
        # the loop runs on a thread of its own, so that a caller's running loop is no obstacle
        run = lambda: _in_thread(lambda: asyncio.run(gather()), None, "tokenmdp-async-rewards")
        try:
            with exit_refused(first.spec if len(self.rewards) == 1 else self.name, "while awaiting async rewards"):
                results = _bounded(first, "while awaiting async rewards", run, self.timeout)
        except _Failed as failed:
            raise RewardError(
                f"reward {failed.reward.spec!r} raised while awaited: {type(failed.error).__name__}: {failed.error}"
            ) from failed.error
        for (k, j, _), value in zip(pending, results):
            if j is None:
                outputs[k] = value
            else:
                outputs[k][j] = value
        return outputs


def _delimiters(given: str | dict | None, specs: list[str]) -> list[str | None]:
    """``env.step_delimiter`` per reward: one string for every reward, or a table from a
    reward's ``module:function`` to its delimiter (the others are not step rewards)."""
    if given is None:
        return [None] * len(specs)
    if isinstance(given, str):
        return [given] * len(specs)
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise ConfigError(
            f"env.step_delimiter names {', '.join(map(repr, unknown))}, which is not in env.reward; "
            f"the rewards are: {', '.join(map(repr, specs))}"
        )
    return [given.get(spec) for spec in specs]


class _Failed(Exception):
    def __init__(self, reward: Reward, error: BaseException):
        super().__init__(str(error))
        self.reward, self.error = reward, error


def _in_thread(call: Callable[[], Any], timeout: float | None, name: str) -> Any:
    """``call()`` on a daemon thread, its result or exception handed back to this thread; a
    call still running after ``timeout`` seconds is a TimeoutError here (it goes on in its
    thread until the process exits: docs/reliability.md)."""
    box: list = []

    def run():
        try:
            box.append((True, call()))
        except BaseException as exc:  # handed back to the caller's thread
            box.append((False, exc))

    worker = threading.Thread(target=run, daemon=True, name=name)
    worker.start()
    worker.join(timeout)
    if not box:
        raise TimeoutError(f"no answer within env.reward_timeout = {timeout:g} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _bounded(reward: Reward, where: str, call: Callable[[], Any], timeout: float | None) -> Any:
    """``call()``, bounded by ``timeout``; what it raises becomes a RewardError naming
    ``reward`` (an async reward's own failure, :class:`_Failed`, passes through to be named)."""
    try:
        return call() if timeout is None else _in_thread(call, timeout, "tokenmdp-reward")
    except (RewardError, _Failed):
        raise
    except (Exception, SystemExit) as exc:  # a reward that calls sys.exit() must not end the run as a success
        if isinstance(exc, TypeError) and reward.form == "trl" and "argument" in str(exc):
            # e.g. a parameter named after a dataset column the prompts do not have
            raise RewardError(
                f"reward {reward.spec!r} cannot take TRL's keywords {where}: {exc} "
                "(a required parameter must be one of TRL's keywords or a column of the prompts)"
            ) from exc
        raise RewardError(f"reward {reward.spec!r} raised {where}: {type(exc).__name__}: {exc}") from exc


def _where(index: int, completion: str) -> str:
    return f"on prompt {index} (completion {completion[:60]!r})"


def _batch_values(reward: Reward, values: Any, n: int, where: str) -> list:
    """A batch reward's values, one per completion (each checked where it is placed)."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)[:60]
        raise RewardError(
            f"reward {reward.spec!r} returned {got} {where}; a batch reward returns one value (or None) per completion"
        )
    return list(values)


def _step_value(reward: Reward, value, where: str) -> float:
    """A step reward's value for one step's prefix: one number."""
    if isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.numel() != 1):
        raise RewardError(
            f"reward {reward.spec!r} returned {value!r} {where}; a step reward (env.step_delimiter) gives one "
            "number per step prefix"
        )
    return number(value, reward.spec, where)


@contextlib.contextmanager
def exit_refused(spec: str, where: str):
    """While a reward runs, ``os._exit`` raises a :class:`RewardError` instead of ending the
    process. ``os._exit`` skips every ``finally``, so a reward calling ``os._exit(0)`` would
    otherwise end the run with status 0 and no message. Only this process is guarded: a
    child it forks (multiprocessing) must still be able to leave through ``os._exit``.
    Not covered (docs/reliability.md): ``posix._exit`` or an ``_exit`` bound before the call,
    a C extension calling ``exit()``, and a call still running after ``env.reward_timeout``."""
    real, owner = os._exit, os.getpid()

    def refuse(status: int) -> None:
        if os.getpid() != owner:
            real(status)
        raise RewardError(
            f"reward {spec!r} called os._exit({status}) {where}; a reward returns a number and never ends the process"
        )

    os._exit = refuse
    try:
        yield
    finally:
        os._exit = real


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
