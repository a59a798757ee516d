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

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..datafiles import json_line, numbered_lines
from ..errors import ConfigError, TokenMDPError
from ..mdp.env import TokenTask
from ..plugin.batch import GuidedPrompts
from .rewards import RewardSet
from .tokenizers import TextTokenizer, load_tokenizer

# --- prompts ----------------------------------------------------------------------------


#: Files read with ``datasets.load_dataset`` (by suffix), beside ``.txt``/``.jsonl`` read by line.
DATASET_FILES = {".parquet": "parquet", ".csv": "csv"}


def read_prompts(
    path: str | Path, key: str = "env.prompts", prompt_key: str = "prompt", split: str | None = None
) -> list[str | list[dict]]:
    """The prompts of :func:`read_prompt_table` (without the other columns)."""
    return read_prompt_table(path, key, prompt_key, split)[0]


def read_prompt_table(
    path: str | Path, key: str = "env.prompts", prompt_key: str = "prompt", split: str | None = None
) -> tuple[list[str | list[dict]], dict[str, list]]:
    """Prompts from a ``.jsonl``/``.json`` file (each line a JSON string or an object whose
    ``prompt_key`` is a string or a conversation), a text file (one prompt per line; a
    literal ``\\n`` in a line is a newline), a parquet or CSV file (``datasets.load_dataset``)
    or a folder written by ``datasets.save_to_disk`` (its ``split`` of a ``DatasetDict``;
    default ``train``, or the only one). A conversation is TRL's format: a list of
    ``{"role", "content"}`` messages. Blank text lines are skipped. Any malformed row is a
    ``ConfigError`` that quotes ``key``, the file and the line or row, so nothing is ever
    trained (or scored) on bad data. Also returns the other columns (a JSON object's other
    keys, a dataset's other columns; None where a row lacks one), which batch rewards
    receive as keyword arguments, as TRL passes them."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"{key} is required: a .jsonl, .txt, .parquet or .csv file of prompts, or a dataset folder")
    suffix = Path(path).suffix.lower()
    if Path(path).is_dir() or suffix in DATASET_FILES:
        columns = _dataset_columns(Path(path), key, prompt_key, split)
        rows = columns.pop(prompt_key)
        prompts = [_checked_prompt(row, f"{key}: {str(path)!r} row {i}") for i, row in enumerate(rows, 1)]
        return prompts, columns
    if split is not None:
        raise ConfigError(f"env.split = {split!r}, but {key} {str(path)!r} is a single file without splits")
    jsonl = suffix in (".jsonl", ".json")
    prompts, others = [], []
    for where, line in numbered_lines(path, f"{key}: file"):
        if jsonl:
            row = json_line(line, where)
            others.append({k: v for k, v in row.items() if k != prompt_key} if isinstance(row, dict) else {})
            if isinstance(row, dict):
                if prompt_key not in row:
                    raise ConfigError(
                        f'{where}: the object has no "{prompt_key}" key (keys: {", ".join(map(str, row))}); '
                        "env.prompt_key names the field"
                    )
                row = row[prompt_key]
            prompts.append(_checked_prompt(row, where))
        else:
            if "\x00" in line:
                raise ConfigError(f"{where}: holds a NUL character (binary data?)")
            prompts.append(_checked_prompt(line.replace("\\n", "\n"), where))
    if not prompts:
        raise ConfigError(f"{key}: file {str(path)!r} holds no prompts")
    names = sorted({k for row in others for k in row})
    return prompts, {name: [row.get(name) for row in others] for name in names}


def _checked_prompt(row: Any, where: str) -> str | list[dict]:
    """A prompt string or a conversation (TRL's list of ``{role, content}`` messages)."""
    if isinstance(row, str):
        if not row.strip():
            raise ConfigError(f"{where}: the prompt is empty")
        _check_unicode(row, where)
        return row
    if isinstance(row, list) and row and all(isinstance(m, dict) for m in row):
        for m in row:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ConfigError(
                    f'{where}: every message of a conversation needs a "role" and a "content" string (got {m!r})'
                )
            _check_unicode(m["content"], where)
        return [{"role": m["role"], "content": m["content"]} for m in row]
    raise ConfigError(
        f"{where}: a prompt must be a string or a conversation (a list of {{role, content}} messages); "
        f"got {type(row).__name__}"
    )


def _check_unicode(text: str, where: str) -> None:
    """A lone surrogate (JSON's ``"\\ud800"``) is not text: no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{where}: holds a lone surrogate ({text[exc.start]!r} at character {exc.start + 1}), which is not "
            "valid Unicode text"
        ) from None


def _as_messages(row: str | list[dict]) -> list[dict]:
    """A prompt as a conversation: a string is one user message."""
    return [{"role": "user", "content": row}] if isinstance(row, str) else row


def _empty_table(path: Path) -> bool:
    """Whether ``path`` is a parquet file without rows or a CSV file without data lines."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows == 0
        if path.suffix.lower() == ".csv":
            return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) <= 1
    except Exception:
        return False
    return False


def _dataset_columns(path: Path, key: str, prompt_key: str, split: str | None) -> dict[str, list]:
    """Every column of the local dataset at ``path`` (a ``save_to_disk`` folder, or a
    parquet/CSV file), of its ``split``; it must have ``prompt_key`` and a row."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f'{key}: reading {str(path)!r} needs the datasets package: pip install "datasets"') from None
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one line per error on stderr, not a progress bar first
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(DATASET_FILES[path.suffix.lower()], data_files=str(path))
    except Exception as exc:
        if _empty_table(path):  # datasets refuses an empty file with an obscure message
            raise ConfigError(f"{key}: the dataset {str(path)!r} holds no rows") from None
        raise ConfigError(f"{key}: could not read a dataset from {str(path)!r}: {type(exc).__name__}: {exc}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        chosen = split or ("train" if "train" in data else names[0] if len(names) == 1 else None)
        if chosen not in data:
            raise ConfigError(
                f"env.split: {key} {str(path)!r} has the splits {', '.join(names)}"
                + (f", not {split!r}" if split else "; name one")
            )
        data = data[chosen]
    elif split is not None:
        raise ConfigError(f"env.split = {split!r}, but {key} {str(path)!r} is one dataset without splits")
    return _columns_of(data, prompt_key, key, repr(str(path)))


def _columns_of(data, prompt_key: str, key: str, name: str) -> dict[str, list]:
    """Every column of a ``datasets.Dataset``, which must have ``prompt_key`` and a row
    (``key`` and ``name`` say which dataset in errors)."""
    if prompt_key not in data.column_names:
        raise ConfigError(
            f"env.prompt_key: {key} {name} has no column {prompt_key!r}; its columns: {', '.join(data.column_names)}"
        )
    if len(data) == 0:
        raise ConfigError(f"{key}: the dataset {name} holds no rows")
    return {column: list(data[column]) for column in data.column_names}


# --- the task ---------------------------------------------------------------------------


def _is_reward(value: Any) -> bool:
    """``env.reward``: a ``module:function`` (or ``hf:DIR``) string, a callable
    (``tokenmdp.train``), or a list of them (checked one by one when resolved)."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, str) or callable(v) for v in value)
    return isinstance(value, str) or callable(value)


def _check_prompt_source(value: Any, key: str) -> None:
    """A prompt file or dataset folder (a path string), or, from Python, a list of prompts
    or a ``datasets.Dataset``."""
    if value is None:
        raise ConfigError(f"{key} is required: a .jsonl, .txt, .parquet or .csv file of prompts, or a dataset folder")
    dataset = hasattr(value, "column_names") and hasattr(value, "__getitem__")
    if not (isinstance(value, (str, Path, list)) or dataset) or isinstance(value, str) and not value.strip():
        raise ConfigError(
            f"{key} must be a path string: a .jsonl, .txt, .parquet or .csv file of prompts, or a dataset "
            f"folder (got {value!r})"
        )


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
        reward: str | list | None = None,
        horizon: int = 32,
        seed: int = 0,
        max_prompt_tokens: int = 256,
        add_bos: bool | None = None,
        stop_at_eos: bool = True,
        guide_separator: str = "\n",
        eval_prompts: str | list | None = None,
        reward_timeout: float | None = None,
        prompt_key: str = "prompt",
        split: str | None = None,
        chat_template: bool | None = None,
        reward_weights: list | None = None,
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
        if not isinstance(prompt_key, str) or not prompt_key:
            raise ConfigError(f"env.prompt_key must be a column name (got {prompt_key!r})")
        if split is not None and not isinstance(split, str):
            raise ConfigError(f"env.split must be a split name such as 'train' (got {split!r})")
        if chat_template is not None and not isinstance(chat_template, bool):
            raise ConfigError(f"env.chat_template must be true, false or unset (got {chat_template!r})")
        if chat_template and not tok.has_chat_template:
            raise ConfigError(f"env.chat_template = true, but tokenizer {tok.source!r} has no chat template")
        self.prompt_key, self.split, self.chat_template = prompt_key, split, chat_template
        self.add_bos = tok.adds_bos if add_bos is None else add_bos
        if self.add_bos and tok.bos_token_id is None:
            raise ConfigError(f"env.add_bos = true, but tokenizer {tok.source!r} has no BOS token")
        self.bos_token = tok.bos_token_id if self.add_bos else None
        self.pad_token = tok.pad_token_id if tok.pad_token_id is not None and tok.pad_token_id < tok.vocab_size else 0
        self.guide_separator = guide_separator
        self.prefix_offset = 1 if self.add_bos else 0
        self.max_prompt_tokens = max_prompt_tokens
        if reward_weights is not None and reward is None:
            raise ConfigError("env.reward_weights is set, but env.reward is not")
        if reward is not None and not _is_reward(reward):
            raise ConfigError(f"env.reward must be 'module:function' or a list of them (got {reward!r})")
        #: ``env.reward`` (None: a reward-free task); see :mod:`.rewards`
        self.rewards = RewardSet(reward, reward_weights, reward_timeout) if reward is not None else None
        self.reward_name = self.rewards.name if self.rewards is not None else None
        self._set_prompts(prompts, "env.prompts")
        #: The task the sampled evaluator scores: the same task on ``eval_prompts`` (held
        #: out), or this task itself (its training prompts) when they are unset.
        self.eval_task = self
        if eval_prompts is not None:
            self.eval_task = copy.copy(self)
            self.eval_task._set_prompts(eval_prompts, "env.eval_prompts")
            self.eval_task.eval_task = self.eval_task

    def _set_prompts(self, prompts, key: str) -> None:
        """Read (``key`` names them in errors), tokenize and lay out the prompt table.
        ``prompts``: a path, a list of prompts or a ``datasets.Dataset``."""
        _check_prompt_source(prompts, key)
        self.prompts_path = str(prompts) if isinstance(prompts, (str, Path)) else f"<{type(prompts).__name__}>"
        if hasattr(prompts, "column_names") and hasattr(prompts, "__getitem__"):  # a datasets.Dataset
            columns = _columns_of(prompts, self.prompt_key, key, "(a Dataset)")
            prompts = columns.pop(self.prompt_key)
            given = [_checked_prompt(p, f"{key}: row {i}") for i, p in enumerate(prompts, 1)]
            self.prompt_columns = columns
        elif isinstance(prompts, list):
            given, self.prompt_columns = (
                [_checked_prompt(p, f"{key}: prompt {i}") for i, p in enumerate(prompts, 1)],
                {},
            )
        else:
            given, self.prompt_columns = read_prompt_table(prompts, key, self.prompt_key, self.split)
        if not given:
            raise ConfigError(f"{key}: no prompts")
        #: each prompt as given: a string, or a conversation (a list of {role, content})
        self.prompt_rows = given
        self.texts = [self._prompt_text(row, f"{key}: prompt {i}") for i, row in enumerate(given, 1)]
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

    def _prompt_text(self, row: str | list[dict], where: str) -> str:
        """The text the model reads for one prompt: a conversation through the tokenizer's
        chat template (with the generation prompt), a string as it is, or with
        ``env.chat_template = true`` as a one-message user conversation."""
        if isinstance(row, str) and not self.chat_template:
            return row
        if self.chat_template is False:
            raise ConfigError(
                f"{where} is a conversation (a list of messages), but env.chat_template = false; "
                "unset it (or set true) to apply the tokenizer's chat template"
            )
        if not self.tokenizer.has_chat_template:
            raise ConfigError(
                f"{where} is a conversation, but tokenizer {self.tokenizer.source!r} has no chat template; "
                "use a tokenizer with one, or give the prompts as text"
            )
        return self.tokenizer.apply_chat_template(_as_messages(row), strip_bos=self.add_bos)

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
        return self.rewards is not None

    #: The reward is paid on the finished response only: the vector env scores a whole
    #: batch of finished responses in one call (``TokenVectorEnv.play``).
    pays_on_finish = True

    def base_logits(self, prompt_index, prefix):
        raise TokenMDPError(
            'tokenmdp/Text-v0 has no base distribution; the loaded model is the reference (reference.init = "init")'
        )

    def next_token_rewards(self, prompt_index, prefix):
        raise TokenMDPError(
            "tokenmdp/Text-v0 pays its reward on the finished response; it has no per-token "
            "reward table (and no exact solver)"
        )

    def encode_guide(self, text: str) -> Tensor | GuidedPrompts:
        """Guide text -> the ids placed after BOS, in front of the prompt (scoring only).
        With chat prompts (a conversation, or ``env.chat_template = true``) the guide is
        the conversation's system message instead: every prompt templated again with it
        first, as :class:`GuidedPrompts`."""
        if self.chat_template or any(not isinstance(row, str) for row in self.prompt_rows):
            if not text.strip():
                raise ConfigError(f"guide {text!r} is empty")
            rows = []
            for i, row in enumerate(self.prompt_rows, 1):
                messages = _as_messages(row)
                if messages[0]["role"] == "system":  # the guide joins the prompt's own system message
                    guided = [{"role": "system", "content": f"{text}\n{messages[0]['content']}"}, *messages[1:]]
                else:
                    guided = [{"role": "system", "content": text}, *messages]
                try:
                    prompt = self.tokenizer.apply_chat_template(guided, strip_bos=self.add_bos)
                except Exception as exc:
                    raise ConfigError(
                        f"guide: the chat template of {self.tokenizer.source!r} refused a system message "
                        f"(prompt {i}): {type(exc).__name__}: {exc}"
                    ) from None
                rows.append(self.tokenizer.encode(prompt))
            ids, mask = self.lay_out_prompts(rows)
            return GuidedPrompts(ids, mask)
        ids = self.tokenizer.encode(text + self.guide_separator)
        if not ids:
            raise ConfigError(f"guide {text!r} has no tokens")
        return torch.tensor(ids, dtype=torch.long)

    def prompt_text(self, index: int) -> str:
        return self.texts[index]

    def completion_text(self, response) -> str:
        return self.tokenizer.decode(self._completion_ids(response))

    def score(self, prompt_index: int, response) -> float:
        """The reward of one finished response."""
        return self.score_responses([int(prompt_index)], [list(response)])[0]

    def score_responses(self, prompt_index: list[int], responses: list[list[int]]) -> list[float]:
        """The rewards of finished responses (token ids, EOS included or not) to the prompts
        in rows ``prompt_index``: each reward of ``env.reward`` is called once for all of
        them (a batch reward) or once per response."""
        if self.rewards is None:
            raise TokenMDPError("tokenmdp/Text-v0 was made without env.reward")
        ids = [self._completion_ids(r) for r in responses]
        texts = [self.tokenizer.decode(i) for i in ids]
        rows = [self.prompt_rows[i] for i in prompt_index]
        chat = [not isinstance(row, str) for row in rows]
        self.reward_calls += len(responses)
        return self.rewards.score(
            prompts=rows,
            completions=[[{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat)],
            text_prompts=[self.texts[i] for i in prompt_index],
            text_completions=texts,
            indices=list(prompt_index),
            ids=ids,
            extra={name: [column[i] for i in prompt_index] for name, column in self.prompt_columns.items()},
        )

    def _completion_ids(self, response) -> list[int]:
        ids = [int(i) for i in response]
        if self.eos_token is not None and self.eos_token in ids:
            ids = ids[: ids.index(self.eos_token)]
        return ids

    def action_rewards(self, prompt_index: Tensor, prefix: Tensor, actions: Tensor) -> Tensor:
        """The reward is paid on the action that ends the response (EOS, or the last allowed token)."""
        rewards = torch.zeros(actions.shape[0])
        if self.rewards is None:
            return rewards
        t = prefix.shape[1]
        ends = torch.full_like(actions, t + 1 >= self.horizon, dtype=torch.bool)
        if self.eos_token is not None:
            ends |= actions == self.eos_token
        rows = ends.nonzero().flatten().tolist()
        if rows:
            responses = [[*prefix[row].tolist(), int(actions[row])] for row in rows]
            values = self.score_responses([int(prompt_index[row]) for row in rows], responses)
            rewards[rows] = torch.tensor(values, dtype=torch.float64).to(rewards.dtype)
        return rewards

    def sequence_rewards(self, prompt_index: Tensor, response: Tensor, mask: Tensor) -> Tensor:
        """``[N]`` float64 rewards of whole responses (0-padded, with their 0/1 mask)."""
        lengths = mask.sum(1).long().tolist()
        responses = [response[i, :n].tolist() for i, n in enumerate(lengths)]
        values = self.score_responses([int(i) for i in prompt_index], responses)
        return torch.tensor(values, dtype=torch.float64)

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
