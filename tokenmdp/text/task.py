"""The token MDP on real text: prompts from a file, a real tokenizer, a Python reward.

``tokenmdp/Text-v0`` (registered by the ``toy-envs`` plugin next to the toy tasks) is a
:class:`TextTask` behind the same :class:`~tokenmdp.env.TokenMDPEnv` /
:class:`~tokenmdp.env.TokenVectorEnv` as the toy tasks. Differences from a toy task:

* the vocabulary is the tokenizer's; there are no extra input-only ids (no guide token:
  guides are text, tokenized by :meth:`TextTask.encode_guide`);
* prompts have different lengths. The prompt table is ``[num_prompts, width]`` with a 0/1
  ``prompt_mask``; with a BOS token the layout is ``[BOS, pad..., prompt]`` (BOS pinned to
  column 0, left padding after it), so a conditioning prefix goes *after* the BOS
  (``prefix_offset = 1``): ``[BOS, guide, pad..., prompt, response]``;
* the reward is a Python callable ``f(prompt_text, completion_text) -> float`` named by
  ``module:function``, called once per finished response (on the action that ends it);
  ``reward`` unset makes the task reward-free (Inverse-Q* needs none);
* there is no base distribution and no exact solver (``exact = False``): the trainer
  scores text runs by sampling (:class:`tokenmdp.evaluation.SampledEvaluator`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib
import importlib.util
import math
import numbers
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..datafiles import json_line, numbered_lines
from ..errors import ConfigError, RewardError, TokenMDPError
from ..mdp.env import TokenTask
from .tokenizers import TextTokenizer, load_tokenizer

# --- prompts ----------------------------------------------------------------------------


def read_prompts(path: str | Path, key: str = "env.prompts") -> list[str]:
    """Prompts from a ``.jsonl`` file (each line a JSON string or an object with a
    ``"prompt"`` string) or from a text file (one prompt per line; a literal ``\\n`` in a
    line is a newline). Blank lines are skipped. Any malformed line is a ``ConfigError``
    that quotes ``key``, the file and the line number, so nothing is ever trained (or
    scored) on bad data."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"{key} is required: a .jsonl or text file of prompts")
    jsonl = Path(path).suffix.lower() in (".jsonl", ".json")
    prompts = []
    for where, line in numbered_lines(path, f"{key}: file"):
        if jsonl:
            row = json_line(line, where)
            if isinstance(row, dict):
                if "prompt" not in row:
                    raise ConfigError(f'{where}: the object has no "prompt" key (keys: {", ".join(map(str, row))})')
                row = row["prompt"]
            if not isinstance(row, str):
                raise ConfigError(
                    f'{where}: a prompt must be a string or {{"prompt": string}} (got {type(row).__name__})'
                )
            text = row
        else:
            if "\x00" in line:
                raise ConfigError(f"{where}: holds a NUL character (binary data?)")
            text = line.replace("\\n", "\n")
        if not text.strip():
            raise ConfigError(f"{where}: the prompt is empty")
        prompts.append(text)
    if not prompts:
        raise ConfigError(f"{key}: file {str(path)!r} holds no prompts")
    return prompts


# --- rewards ----------------------------------------------------------------------------


#: Folders code is never imported from (run directories are data): see :func:`code_barrier`.
_BARRIERS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("tokenmdp_code_barriers", default=())


@contextlib.contextmanager
def code_barrier(folder: str | Path):
    """While held, :func:`resolve_callable` refuses a module whose file lies in ``folder``
    (the trainer holds it for its run directory, which is data, not code)."""
    token = _BARRIERS.set((*_BARRIERS.get(), Path(folder).resolve()))
    try:
        yield
    finally:
        _BARRIERS.reset(token)


def _check_barriers(module_name: str, spec: str, what: str) -> None:
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return  # import_module reports it
    origin = Path(found.origin).resolve() if found is not None and found.origin else None
    for folder in _BARRIERS.get():
        if origin is not None and origin.is_relative_to(folder):
            raise ConfigError(
                f"{what} {spec!r}: module {module_name!r} is {origin}, inside the run directory {folder}; "
                "tokenmdp never imports code from a run directory (it is data): move the module elsewhere"
            )


def resolve_callable(spec: str, what: str = "env.reward") -> Callable:
    """``module:function`` (dots allowed after the colon) -> the callable. The module is
    imported, so the config that names it is as trusted as code; a module inside a run
    directory (:func:`code_barrier`) is refused before it is imported."""
    if not isinstance(spec, str) or not re.fullmatch(r"[\w.]+:[\w.]+", spec):
        raise ConfigError(f"{what} must be 'module:function' (got {spec!r})")
    module_name, attr = spec.split(":")
    _check_barriers(module_name, spec, what)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {spec!r}: cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{what} {spec!r} is not callable")
    return obj


POSITIVE_WORDS = frozenset(
    """
good great happy glad joy joyful love lovely loved kind kindly helpful helpfully nice wonderful
beautiful excellent amazing awesome fantastic best better thank thanks grateful gratitude calm
peaceful warm warmly friendly friend friends gentle bright fun enjoy enjoyed enjoying delight
delightful pleasant hope hopeful smile smiles smiling laugh laughter cheerful positive care caring
support supportive welcome fine perfect brilliant success successful win proud safe sweet fresh
comfortable relaxing relaxed lucky gift free easy favorite favourite wow beloved sunny generous
""".split()
)

NEGATIVE_WORDS = frozenset(
    """
bad sad angry hate hated terrible awful horrible worst worse poor pain painful hurt cry crying
fear afraid scared sick ill tired boring bored lonely alone ugly stupid dumb annoying annoyed
upset unhappy miserable wrong fail failed failure problem problems difficult hard cold dark
dead death die died kill killed war fight fighting loss lost broken mess nasty rude cruel
disappointed disappointing worried worry anxious stress stressed tragic disaster never hopeless
""".split()
)

_WORD = re.compile(r"[a-z']+")


def lexicon_score(prompt: str, completion: str) -> float:
    """Rule-based sentiment of a completion: positive-lexicon words minus negative-lexicon
    words (lower-cased whole words; the prompt is ignored). A reward callable, and the
    evaluation score of ``bench/gemma_guide.py``."""
    words = _WORD.findall(completion.lower())
    return float(sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words))


# --- the task ---------------------------------------------------------------------------


class TextTask(TokenTask):
    """Prompts from a file, a real tokenizer, and an optional ``module:function`` reward."""

    name = "Text"
    #: No exact solver: the prefix tree of a real vocabulary is far too large.
    exact = False
    #: The observation carries ``prompt_mask`` (prompts have different lengths).
    padded_prompts = True

    def __init__(
        self,
        prompts: str | None = None,
        tokenizer: str | None = None,
        reward: str | None = None,
        horizon: int = 32,
        seed: int = 0,
        max_prompt_tokens: int = 256,
        add_bos: bool | None = None,
        stop_at_eos: bool = True,
        guide_separator: str = "\n",
        eval_prompts: str | list | None = None,
        reward_timeout: float | None = None,
    ):
        tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
        eos = tok.eos_token_id if stop_at_eos else None
        if eos is not None and not 0 <= eos < tok.vocab_size:
            eos = None
        super().__init__(tok.vocab_size, horizon, seed, eos)
        self.tokenizer = tok
        self.input_vocab_size = tok.vocab_size
        self.guide_token = None
        if add_bos is not None and not isinstance(add_bos, bool):
            raise ConfigError(f"env.add_bos must be true, false or unset (got {add_bos!r})")
        if reward_timeout is not None and (
            isinstance(reward_timeout, bool)
            or not isinstance(reward_timeout, (int, float))
            or not 0 < reward_timeout < math.inf
        ):
            raise ConfigError(f"env.reward_timeout must be a number of seconds > 0, or unset (got {reward_timeout!r})")
        self.reward_timeout = reward_timeout
        self.add_bos = tok.adds_bos if add_bos is None else add_bos
        if self.add_bos and tok.bos_token_id is None:
            raise ConfigError(f"env.add_bos = true, but tokenizer {tok.source!r} has no BOS token")
        self.bos_token = tok.bos_token_id if self.add_bos else None
        self.pad_token = tok.pad_token_id if tok.pad_token_id is not None and tok.pad_token_id < tok.vocab_size else 0
        self.guide_separator = guide_separator
        self.prefix_offset = 1 if self.add_bos else 0
        self.max_prompt_tokens = max_prompt_tokens
        self.reward_name = reward
        self.reward_fn = resolve_callable(reward) if reward is not None else None
        self._set_prompts(prompts, "env.prompts")
        #: The task the sampled evaluator scores: the same task on ``eval_prompts`` (held
        #: out), or this task itself (its training prompts) when they are unset.
        self.eval_task = self
        if eval_prompts is not None:
            self.eval_task = copy.copy(self)
            self.eval_task._set_prompts(eval_prompts, "env.eval_prompts")
            self.eval_task.eval_task = self.eval_task

    def _set_prompts(self, prompts: str | list, key: str) -> None:
        """Read (``key`` names them in errors), tokenize and lay out the prompt table."""
        self.prompts_path = str(prompts)
        self.texts = read_prompts(prompts, key) if not isinstance(prompts, list) else list(prompts)
        rows = []
        for lineno, text in enumerate(self.texts, 1):
            ids = self.tokenizer.encode(text)
            if not ids:
                raise ConfigError(f"{key}: prompt {lineno} ({text[:40]!r}) has no tokens")
            if len(ids) > self.max_prompt_tokens:
                raise ConfigError(
                    f"{key}: prompt {lineno} ({text[:40]!r}...) has {len(ids)} tokens, "
                    f"more than env.max_prompt_tokens = {self.max_prompt_tokens}"
                )
            rows.append(ids)
        self._prompts, self._prompt_mask = self.lay_out_prompts(rows)
        #: prompt tokens (BOS excluded) -> first row with them, for pair files' prompts
        self._row_of = {}
        for i, ids in enumerate(rows):
            self._row_of.setdefault(tuple(ids), i)

    def lay_out_prompts(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Token-id prompts as the env lays them out: ``[BOS, pad..., prompt]`` (no BOS
        without ``add_bos``), with a 0/1 mask. The BOS stays first so that a guide can be
        inserted after it (``prefix_offset``)."""
        width = max(map(len, rows)) + self.prefix_offset
        ids = torch.full((len(rows), width), self.pad_token, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        if self.add_bos:
            ids[:, 0], mask[:, 0] = self.bos_token, 1
        return ids, mask

    def prompt_row(self, ids: list[int]) -> int:
        """Row of ``prompts`` whose tokens (BOS excluded) are ``ids``; -1 for any other prompt."""
        return self._row_of.get(tuple(ids), -1)

    # --- problem definition ----------------------------------------------------------
    @property
    def prompts(self) -> Tensor:
        return self._prompts

    @property
    def prompt_mask(self) -> Tensor:
        return self._prompt_mask

    @property
    def has_reward(self) -> bool:
        return self.reward_fn is not None

    def base_logits(self, prompt_index, prefix):
        raise TokenMDPError(
            'tokenmdp/Text-v0 has no base distribution; the loaded model is the reference (reference.init = "init")'
        )

    def next_token_rewards(self, prompt_index, prefix):
        raise TokenMDPError(
            "tokenmdp/Text-v0 pays its reward on the finished response; it has no per-token "
            "reward table (and no exact solver)"
        )

    def encode_guide(self, text: str) -> Tensor:
        """Guide text -> the ids placed after BOS, in front of the prompt (scoring only)."""
        ids = self.tokenizer.encode(text + self.guide_separator)
        if not ids:
            raise ConfigError(f"guide {text!r} has no tokens")
        return torch.tensor(ids, dtype=torch.long)

    def prompt_text(self, index: int) -> str:
        return self.texts[index]

    def completion_text(self, response) -> str:
        ids = [int(i) for i in response]
        if self.eos_token is not None and self.eos_token in ids:
            ids = ids[: ids.index(self.eos_token)]
        return self.tokenizer.decode(ids)

    def score(self, prompt_index: int, response) -> float:
        """The reward of one finished response (one call of the reward callable)."""
        if self.reward_fn is None:
            raise TokenMDPError("tokenmdp/Text-v0 was made without env.reward")
        prompt, completion = self.prompt_text(int(prompt_index)), self.completion_text(response)
        self.reward_calls += 1
        where = f"on prompt {int(prompt_index)} (completion {completion[:60]!r})"
        try:
            value = self._call_reward(prompt, completion)
        except (Exception, SystemExit) as exc:  # a reward that calls sys.exit() must not end the run as a success
            raise RewardError(f"reward {self.reward_name!r} raised {where}: {type(exc).__name__}: {exc}") from exc
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward {self.reward_name!r} returned {value!r} ({type(value).__name__}) {where}; "
                "rewards must be numbers (int or float)"
            )
        value = float(value)
        if not math.isfinite(value):
            raise RewardError(
                f"reward {self.reward_name!r} returned {value} on prompt {int(prompt_index)}; "
                "rewards must be finite numbers"
            )
        return value

    def _call_reward(self, prompt: str, completion: str):
        """The reward callable, bounded by ``env.reward_timeout`` seconds when set (the call
        runs in a daemon thread; a call that does not return in time stops the run)."""
        if self.reward_timeout is None:
            return self.reward_fn(prompt, completion)
        box: list = []

        def call():
            try:
                box.append((True, self.reward_fn(prompt, completion)))
            except BaseException as exc:  # handed back to the caller's thread
                box.append((False, exc))

        worker = threading.Thread(target=call, daemon=True, name="tokenmdp-reward")
        worker.start()
        worker.join(self.reward_timeout)
        if not box:
            raise TimeoutError(f"no answer within env.reward_timeout = {self.reward_timeout:g} s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def action_rewards(self, prompt_index: Tensor, prefix: Tensor, actions: Tensor) -> Tensor:
        """The reward is paid on the action that ends the response (EOS, or the last allowed token)."""
        rewards = torch.zeros(actions.shape[0])
        if self.reward_fn is None:
            return rewards
        t = prefix.shape[1]
        ends = torch.full_like(actions, t + 1 >= self.horizon, dtype=torch.bool)
        if self.eos_token is not None:
            ends |= actions == self.eos_token
        for row in ends.nonzero().flatten().tolist():
            rewards[row] = self.score(prompt_index[row], [*prefix[row].tolist(), int(actions[row])])
        return rewards

    def sequence_rewards(self, prompt_index: Tensor, response: Tensor, mask: Tensor) -> Tensor:
        """``[N]`` float64 rewards of whole responses (0-padded, with their 0/1 mask)."""
        out = torch.zeros(response.shape[0], dtype=torch.float64)
        for i in range(response.shape[0]):
            length = int(mask[i].sum())
            out[i] = self.score(prompt_index[i], response[i, :length].tolist())
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "prompts": self.prompts_path,
            "num_prompts": len(self.texts),
            "eval_prompts": self.eval_task.prompts_path if self.eval_task is not self else None,
            "tokenizer": self.tokenizer.source,
            "vocab_size": self.vocab_size,
            "horizon": self.horizon,
            "eos_token": self.eos_token,
            "reward": self.reward_name,
        }
