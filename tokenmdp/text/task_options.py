"""The options of the text task (the ``[env]`` table of ``tokenmdp/Text-v0``), with their
validators and docs; docs/text.md, 'The environment', explains each at length.

A bad value is a ``ConfigError`` that names its ``env.`` key. The checks that need the
tokenizer (a chat template, a BOS token) and the prompt files are the task's own, made
when it loads them; ``horizon`` and ``seed`` are checked by
:class:`~tokenmdp.mdp.task.TokenTask`.
"""

from __future__ import annotations

import math

import attrs

from ..errors import ConfigError


def _true_false_or_unset(instance, attribute, value):
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"env.{attribute.name} must be true, false or unset (got {value!r})")


def _seconds(instance, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"env.{attribute.name} must be a number of seconds > 0, or unset (got {value!r})")


def _column_name(instance, attribute, value):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"env.{attribute.name} must be a column name (got {value!r})")


def _split_name(instance, attribute, value):
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"env.{attribute.name} must be a split name such as 'train' (got {value!r})")


def _reward(instance, attribute, value):
    """A ``module:function`` (or ``hf:DIR``) string, a callable (``tokenmdp.train``), or a
    list of them (each checked further when resolved)."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        ok = all(isinstance(v, str) or callable(v) for v in value)
    else:
        ok = isinstance(value, str) or callable(value)
    if not ok:
        raise ConfigError(f"env.reward must be 'module:function' or a list of them (got {value!r})")


def _step_delimiter(instance, attribute, value):
    if value is None:
        return
    if instance.reward is None:
        raise ConfigError("env.step_delimiter is set, but env.reward is not")
    table = value if isinstance(value, dict) else {"": value}
    if not all(isinstance(d, str) and d for d in table.values()) or not all(isinstance(k, str) for k in table):
        raise ConfigError(
            "env.step_delimiter must be a non-empty string (every reward is a step reward), or a table from "
            f'a reward\'s "module:function" to its delimiter (got {value!r})'
        )


def _judges(instance, attribute, value):
    listed = isinstance(value, (list, tuple)) and value
    if value is not None and not (listed and all(isinstance(v, str) and v or callable(v) for v in value)):
        raise ConfigError(
            f'env.judges must be a list of "module:function" judges or built-in names such as "vader" (got {value!r})'
        )


def _weights_need_reward(instance, attribute, value):
    if value is not None and instance.reward is None:
        raise ConfigError("env.reward_weights is set, but env.reward is not")


@attrs.frozen
class TextTaskOptions:
    #: A .jsonl, .txt, .parquet or .csv file of prompts, or a folder written by
    #: datasets.save_to_disk; from Python also a list of prompts or a datasets.Dataset.
    prompts: str | None = None
    #: A folder AutoTokenizer.from_pretrained loads, or a sentencepiece .model file.
    tokenizer: str | None = None
    #: "module:function", "hf:DIR" (a reward model), a list of them, or unset: no reward.
    reward: str | list | None = attrs.field(default=None, validator=_reward)
    #: max_new_tokens: a response is cut there.
    horizon: int = 32
    #: Seeds the task's random numbers.
    seed: int = 0
    #: A longer prompt is an error naming it.
    max_prompt_tokens: int = 256
    #: Put the tokenizer's BOS first; unset: as the tokenizer itself does.
    add_bos: bool | None = attrs.field(default=None, validator=_true_false_or_unset)
    #: End a response at the tokenizer's EOS.
    stop_at_eos: bool = True
    #: Appended to a text guide before it is tokenized.
    guide_separator: str = "\n"
    #: Held-out prompts (the formats of prompts) the sampled evaluator scores; unset: the
    #: training prompts.
    eval_prompts: str | list | None = None
    #: Seconds a reward call may take; unset: no bound.
    reward_timeout: float | None = attrs.field(default=None, validator=_seconds)
    #: The field or column that holds the prompt.
    prompt_key: str = attrs.field(default="prompt", validator=_column_name)
    #: The split of a saved DatasetDict; unset: train, or its only split.
    split: str | None = attrs.field(default=None, validator=_split_name)
    #: Unset: conversations through the tokenizer's chat template, strings as they are;
    #: true: every prompt (a string as one user message); false: conversations are an error.
    chat_template: bool | None = attrs.field(default=None, validator=_true_false_or_unset)
    #: One weight per reward entry (default 1 each); the reward is their weighted sum.
    reward_weights: list | None = attrs.field(default=None, validator=_weights_need_reward)
    #: Scores of the held-out evaluations that training never reads: "module:function"
    #: (written like a reward) or a built-in name ("vader": VADER's compound sentiment,
    #: extra ``judges``); each is logged as ``judge/NAME`` with its win rate against the
    #: reference (docs/text.md, "Judges").
    judges: list | None = attrs.field(default=None, validator=_judges)
    #: A step (process) reward: the completion is split after each occurrence of this
    #: string, every step's prefix is scored, and the value lands on the step's last token.
    #: A string makes every reward a step reward; a table {"module:function" = "\n"} only
    #: those it names (docs/text.md, "Dense and step rewards").
    step_delimiter: str | dict | None = attrs.field(default=None, validator=_step_delimiter)
