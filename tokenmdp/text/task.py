"""The token MDP on real text: prompts from a file, a real tokenizer, a Python reward.

``tokenmdp/Text-v0`` (registered by the ``toy-envs`` plugin next to the toy tasks) is a
:class:`TextTask` behind the same :class:`~tokenmdp.mdp.env.TokenMDPEnv` /
:class:`~tokenmdp.mdp.env.TokenVectorEnv` as the toy tasks. Differences from a toy task:

* the vocabulary is the tokenizer's; there are no extra input-only ids (no guide token:
  guides are text, tokenized by :meth:`TextTask.encode_guide`);
* prompts have different lengths (read by :mod:`.prompts`). The prompt table is
  ``[num_prompts, width]`` with a 0/1 ``prompt_mask``; with a BOS token the layout is
  ``[BOS, pad..., prompt]`` (BOS pinned to column 0, left padding after it), so a
  conditioning prefix goes *after* the BOS (``prefix_offset = 1``):
  ``[BOS, guide, pad..., prompt, response]``;
* the reward is a Python callable ``f(prompt_text, completion_text) -> float`` named by
  ``module:function``, called once per finished response (on the action that ends it);
  ``reward`` unset makes the task reward-free (Inverse-Q* needs none);
* there is no base distribution and no exact solver (``exact = False``): the trainer
  scores text runs by sampling (:class:`tokenmdp.training.evaluation.SampledEvaluator`).

Its options (the ``[env]`` table) are :class:`~.task_options.TextTaskOptions`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, TokenMDPError
from ..mdp.task import TokenTask
from ..options import build
from ..plugin.batch import GuidedPrompts
from .judges import Judges
from .prompts import as_messages, load_prompts
from .reward_tokens import Scored, token_char_ends
from .rewards import RewardSet
from .task_options import TextTaskOptions
from .tokenizers import TextTokenizer, load_tokenizer


class TextTask(TokenTask):
    """Prompts from a file, a real tokenizer, and an optional ``module:function`` reward."""

    name = "Text"
    #: The ``[env]`` options, passed as keywords (``TextTask(prompts=..., tokenizer=...)``).
    Options = TextTaskOptions
    #: The options only scoring reads: :meth:`unscored` goes without them.
    SCORING_OPTIONS = ("prompts", "eval_prompts", "reward", "reward_weights", "judges", "step_delimiter")
    #: No exact solver: the prefix tree of a real vocabulary is far too large.
    exact = False
    #: The observation carries ``prompt_mask`` (prompts have different lengths).
    padded_prompts = True

    def __init__(self, **options: Any):
        self._set_up(build(self.Options, options, "env"))
        self._set_prompts(self.options.prompts, "env.prompts")
        #: The task the sampled evaluator scores: the same task on ``eval_prompts`` (held
        #: out), or this task itself (its training prompts) when they are unset.
        self.eval_task = self
        if self.options.eval_prompts is not None:
            self.eval_task = copy.copy(self)
            self.eval_task._set_prompts(self.options.eval_prompts, "env.eval_prompts")
            self.eval_task.eval_task = self.eval_task

    @classmethod
    def unscored(cls, **options: Any) -> TextTask:
        """The task without what only scoring reads (:attr:`SCORING_OPTIONS`, ignored if
        given): its tokenizer, special tokens and horizon, with no prompt file read and no
        reward resolved (``tokenmdp export`` builds the policy from it)."""
        task = cls.__new__(cls)
        task._set_up(build(cls.Options, {k: v for k, v in options.items() if k not in cls.SCORING_OPTIONS}, "env"))
        task.prompts_path = None
        return task

    def _set_up(self, options: TextTaskOptions) -> None:
        """Everything but the prompts: the tokenizer, the special tokens and the reward."""
        self.options = options
        tok = options.tokenizer
        tok = tok if isinstance(tok, TextTokenizer) else load_tokenizer(tok)
        eos = tok.eos_token_id if options.stop_at_eos else None
        if eos is not None and not 0 <= eos < tok.vocab_size:
            eos = None
        TokenTask.__init__(self, tok.vocab_size, options.horizon, options.seed, eos)
        self.tokenizer = tok
        self.input_vocab_size = tok.vocab_size
        self.guide_token = None
        self.reward_timeout = options.reward_timeout
        if options.chat_template and not tok.has_chat_template:
            raise ConfigError(f"env.chat_template = true, but tokenizer {tok.source!r} has no chat template")
        self.prompt_key, self.split, self.chat_template = options.prompt_key, options.split, options.chat_template
        self.add_bos = tok.adds_bos if options.add_bos is None else options.add_bos
        if self.add_bos and tok.bos_token_id is None:
            raise ConfigError(f"env.add_bos = true, but tokenizer {tok.source!r} has no BOS token")
        self.bos_token = tok.bos_token_id if self.add_bos else None
        self.pad_token = tok.pad_token_id if tok.pad_token_id is not None and tok.pad_token_id < tok.vocab_size else 0
        self.guide_separator = options.guide_separator
        self.prefix_offset = 1 if self.add_bos else 0
        self.max_prompt_tokens = options.max_prompt_tokens
        reward = options.reward
        #: ``env.reward`` (None: a reward-free task); see :mod:`.rewards`
        self.rewards = (
            RewardSet(reward, options.reward_weights, options.reward_timeout, step_delimiter=options.step_delimiter)
            if reward is not None
            else None
        )
        self.reward_name = self.rewards.name if self.rewards is not None else None
        #: ``env.judges``: scored on held-out evaluations only (:mod:`.judges`)
        self.judges = Judges(list(options.judges), options.reward_timeout) if options.judges else None

    def _set_prompts(self, prompts, key: str) -> None:
        """Read (``key`` names them in errors), tokenize and lay out the prompt table.
        ``prompts``: a path, a list of prompts or a ``datasets.Dataset``."""
        given, self.prompt_columns = load_prompts(prompts, key, self.prompt_key, self.split)
        self.prompts_path = str(prompts) if isinstance(prompts, (str, Path)) else f"<{type(prompts).__name__}>"
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
        return self.tokenizer.apply_chat_template(as_messages(row), strip_bos=self.add_bos)

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
                messages = as_messages(row)
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
        """The rewards ``R(x, y)`` of finished responses (token ids, EOS included or not) to
        the prompts in rows ``prompt_index``: each reward of ``env.reward`` is called once for
        all of them (a batch reward) or once per response."""
        return [scored.total for scored in self.score_tokens(prompt_index, responses)]

    def score_tokens(self, prompt_index: list[int], responses: list[list[int]]) -> list[Scored]:
        """:meth:`score_responses` with where each reward lands (:class:`Scored`)."""
        return self.rewards.score_tokens(**self._reward_call(prompt_index, responses))

    def judge_responses(self, prompt_index: list[int], responses: list[list[int]]) -> dict[str, list[float]]:
        """Each judge's scores of finished responses (as :meth:`score_responses` calls rewards)."""
        return self.judges.score(**self._scoring_batch(prompt_index, responses)) if self.judges else {}

    def _scoring_batch(self, prompt_index: list[int], responses: list[list[int]]) -> dict:
        """What a reward or a judge is called with, for ``responses`` to the prompts in rows
        ``prompt_index``: the prompts and completions as TRL gives them, and their texts."""
        ids = [self._completion_ids(r) for r in responses]
        texts = [self.tokenizer.decode(i) for i in ids]
        rows = [self.prompt_rows[i] for i in prompt_index]
        chat = [not isinstance(row, str) for row in rows]
        return dict(
            prompts=rows,
            completions=[[{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat)],
            text_prompts=[self.texts[i] for i in prompt_index],
            text_completions=texts,
            indices=list(prompt_index),
            ids=ids,
            extra={name: [column[i] for i in prompt_index] for name, column in self.prompt_columns.items()},
            char_ends=lambda i: token_char_ends(self.tokenizer.decode, ids[i], texts[i]),
        )

    def _completion_ids(self, response) -> list[int]:
        ids = [int(i) for i in response]
        if self.eos_token is not None and self.eos_token in ids:
            ids = ids[: ids.index(self.eos_token)]
        return ids

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
