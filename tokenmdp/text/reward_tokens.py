"""Where a text reward's values land among a completion's tokens: per-token values, character
spans and steps (:mod:`.rewards` calls the rewards; this module only places what they return).

A completion's tokens cover its decoded text left to right; :func:`token_char_ends` gives the
character where each token's text ends. A span ``[start, end)``, or a step, lands on its last
token (:func:`token_at`): the value is paid when the span (the step) is complete, so
reward-to-go credits every earlier token with it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import attrs
import torch

from ..errors import RewardError


@attrs.frozen
class Scored:
    """One completion's reward. ``final`` lands on the response's last token (its EOS when
    it has one), as a sequence reward always did; ``tokens`` holds one value per completion
    token (``completion_ids``), or is None when no reward gave any."""

    final: float
    tokens: tuple[float, ...] | None = None

    @property
    def total(self) -> float:
        """``R(x, y)``: the sum of everything the completion earned."""
        return self.final if self.tokens is None else self.final + math.fsum(self.tokens)


def placed(scored: list[Scored], lengths: list[int], width: int) -> torch.Tensor:
    """``[N, width]`` float64: each response's :class:`Scored` on its tokens (0 on padding):
    ``tokens`` from the first token on, ``final`` on the response's last token
    (``lengths[i] - 1``)."""
    out = torch.zeros(len(scored), width, dtype=torch.float64)
    for i, row in enumerate(scored):
        if row.tokens is not None:
            out[i, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.float64)
    # every final in one indexed add (not two indexing ops per row: a step's 32 rows were
    # ~190 small tensor operations)
    rows = [i for i, n in enumerate(lengths) if n]
    if rows:
        finals = torch.tensor([scored[i].final for i in rows], dtype=torch.float64)
        out.index_put_((torch.tensor(rows), torch.tensor([lengths[i] - 1 for i in rows])), finals, accumulate=True)
    return out


def token_char_ends(decode, ids: Sequence[int], text: str) -> list[int]:
    """The character of ``text`` (the decode of ``ids``) where each token's text ends.

    Each prefix ``ids[:k+1]`` is decoded and compared with ``text``; a token that decodes
    to a fragment (one byte of a multi-byte character, shown as U+FFFD until the next token
    completes it) ends where the previous one did, so a character belongs to the token that
    completes it. Works for any tokenizer that decodes, without offsets of its own."""
    ends, last = [], 0
    for k in range(len(ids)):
        prefix = decode(ids[: k + 1])
        common = 0
        for a, b in zip(prefix, text):
            if a != b:
                break
            common += 1
        last = max(last, common)
        ends.append(last)
    if ends:
        ends[-1] = len(text)  # the whole completion ends with its last token
    return ends


def token_at(ends: list[int], end: int, start: int = 0) -> int:
    """The token a span ``[start, end)`` (or a step) lands on: the last token whose text ends
    inside it (``start < ends[k] <= end``), so a delimiter that begins the next token (a
    sentencepiece space) leaves the value on the span's own last word; else, when one token
    covers the span's end, the token that holds character ``end - 1``."""
    # a token with no text of its own (the first byte of a character) ends nothing
    inside = [k for k, e in enumerate(ends) if start < e <= end and (k == 0 or ends[k - 1] < e)]
    if inside:
        return inside[-1]
    for k, e in enumerate(ends):
        if e >= end:
            return k
    return len(ends) - 1


def step_ends(text: str, delimiter: str) -> list[int]:
    """Where each step of ``text`` ends: after each occurrence of ``delimiter``, and at the
    end of the text when something follows the last one."""
    ends, start = [], 0
    while (found := text.find(delimiter, start)) >= 0:
        start = found + len(delimiter)
        ends.append(start)
    if start < len(text):
        ends.append(len(text))
    return ends


def number(value, spec: str, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(
            f"reward {spec!r} returned {value!r} ({type(value).__name__}) {where}; "
            "rewards must be numbers (int or float) or None"
        )
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"reward {spec!r} returned {value} {where}; rewards must be finite numbers")
    return value


def _span(item, spec: str, where: str) -> tuple[int, int, float]:
    """``(start, end, value)`` from a tuple or a ``{"start", "end", "value"}`` dict."""
    if isinstance(item, dict) and set(item) == {"start", "end", "value"}:
        start, end, value = item["start"], item["end"], item["value"]
    elif isinstance(item, (tuple, list)) and len(item) == 3:
        start, end, value = item
    else:
        raise RewardError(
            f"reward {spec!r} returned {item!r} {where} in a list of spans; a span is (start, end, value) "
            'or {"start": ..., "end": ..., "value": ...}, in characters of the completion'
        )
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in (start, end)):
        raise RewardError(f"reward {spec!r} returned the span {item!r} {where}; start and end must be integers")
    return int(start), int(end), number(value, spec, where)


def place(value, spec: str, where: str, n_tokens: int, text: str, ends) -> float | tuple[float, ...] | None:
    """One reward's value for one completion of ``n_tokens`` tokens and text ``text``: None
    (does not apply), a number (a sequence reward), or a tuple of per-token values (given per
    token, or placed from character spans). ``ends()`` gives :func:`token_char_ends`, read
    only for spans."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
    if not isinstance(value, (list, tuple)):
        return number(value, spec, where)
    if not value:  # an empty list of spans: nothing anywhere
        return (0.0,) * n_tokens
    if value and all(isinstance(v, (tuple, list, dict)) for v in value):
        return _spans(value, spec, where, n_tokens, text, ends())
    if len(value) != n_tokens:
        raise RewardError(
            f"reward {spec!r} returned {len(value)} per-token values {where}, which has {n_tokens} tokens; "
            "a per-token reward gives one value per completion token (completion_ids)"
        )
    return tuple(number(v, spec, f"{where} (token {k})") for k, v in enumerate(value))


def _spans(items, spec: str, where: str, n_tokens: int, text: str, ends: list[int]) -> tuple[float, ...]:
    spans = sorted(_span(item, spec, where) for item in items)
    for start, end, _ in spans:
        if not 0 <= start < end <= len(text):
            raise RewardError(
                f"reward {spec!r} returned the span ({start}, {end}) {where}, outside the completion's "
                f"{len(text)} characters; a span is [start, end) with 0 <= start < end <= {len(text)}"
            )
    for (s0, e0, _), (s1, e1, _) in zip(spans, spans[1:]):
        if s1 < e0:
            raise RewardError(f"reward {spec!r} returned overlapping spans ({s0}, {e0}) and ({s1}, {e1}) {where}")
    values = [0.0] * n_tokens
    for start, end, value in spans:
        values[token_at(ends, end, start)] += value
    return tuple(values)
