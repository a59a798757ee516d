"""Preference pairs: a batched record, sampling + oracle labelling, and a checked JSONL loader.

Shared by the plugins that learn from pairs: DPO's ``preference-pairs`` estimator and
PPO's learned reward model (``[estimator] reward = "learned"``).

A pair is ``(x, y_w, y_l)``: a prompt, the chosen (preferred) response and the rejected
one. Pairs are stored batched, responses right-padded with a 0/1 mask, prompts
left-padded with a 0/1 mask (toy prompts all have one length, so their mask is all 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from .. import sharding
from ..datafiles import json_line, numbered_lines
from ..errors import ConfigError
from ..plugin.batch import RolloutBatch
from .rollout import generate
from .sft import sample_contexts

#: Two responses whose summed rewards differ by less than this are a tie (and dropped).
TIE_TOLERANCE = 1e-6


@attrs.frozen
class PairBatch:
    """``N`` preference pairs. Per-response tensors are ``[N, T]``; ``*_mask`` is 1 on real tokens."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    #: Row of ``task.prompts`` each pair's prompt is (-1 where the task has no prompt table).
    prompt_index: Tensor
    chosen_ids: Tensor
    chosen_mask: Tensor
    rejected_ids: Tensor
    rejected_mask: Tensor
    #: The oracle rewards ``R(x, y)`` that labelled sampled pairs (None for file pairs).
    chosen_env_reward: Tensor | None = None
    rejected_env_reward: Tensor | None = None
    #: Bookkeeping numbers the estimator attaches for the updater to log (``dpo/...``).
    info: dict = attrs.field(factory=dict)

    @property
    def size(self) -> int:
        return self.chosen_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.chosen_mask.sum() + self.rejected_mask.sum())

    def select(self, index: Tensor, info: dict | None = None) -> PairBatch:
        """Pairs ``index`` (in that order; repeats allowed)."""
        picked = {
            f.name: getattr(self, f.name)[index]
            for f in attrs.fields(PairBatch)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return attrs.evolve(self, **picked, info=dict(info if info is not None else self.info))

    def responses(self) -> RolloutBatch:
        """The ``2N`` responses as one batch to score in a single forward pass:
        rows ``0..N-1`` are the chosen responses, rows ``N..2N-1`` the rejected ones."""
        ids = torch.cat([self.chosen_ids, self.rejected_ids])
        mask = torch.cat([self.chosen_mask, self.rejected_mask])
        return RolloutBatch(
            prompt_ids=self.prompt_ids.repeat(2, 1),
            prompt_mask=self.prompt_mask.repeat(2, 1),
            response_ids=ids,
            response_mask=mask,
            rewards=torch.zeros_like(mask),
            prompt_index=self.prompt_index.repeat(2),
            rewards_observed=False,
        )


def concat_pairs(parts: list[PairBatch]) -> PairBatch:
    """One batch from several (responses padded to the longest, prompts left-padded)."""
    if len(parts) == 1:
        return parts[0]
    fields = {}
    for f in attrs.fields(PairBatch):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "info" or any(v is None for v in values):
            continue
        if f.name.startswith("prompt_") and values[0].dim() == 2:
            width = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (width - v.shape[1], 0)) for v in values]
        elif values[0].dim() == 2:
            width = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]
        fields[f.name] = torch.cat(values)
    return PairBatch(**fields)


# --- sampled pairs, labelled by the task's reward (the oracle reward model) -------------


def sequence_rewards(task, prompt_index: Tensor, response: Tensor, mask: Tensor) -> Tensor:
    """``R(x, y)`` of whole responses, float64: the task's ``sequence_rewards``."""
    return task.sequence_rewards(prompt_index, response, mask)


@sharding.whole_policy  # sharded: gathered once, for however many rounds this rank draws
@torch.no_grad()
def sample_pairs(
    model, task, num_pairs: int, generator: torch.Generator, temperature: float = 1.0, label_beta: float | None = None
) -> tuple[PairBatch, dict[str, float]]:
    """``num_pairs`` non-tied pairs: for prompts drawn from the task's prompt distribution,
    two responses are sampled from ``model``, scored by the task's reward, and the higher
    one is ``chosen``. Ties (equal reward) are dropped and more candidates are drawn.

    With ``label_beta`` the label is drawn from the Bradley-Terry model instead:
    ``y_1`` is chosen with probability ``sigmoid((R_1 - R_2) / label_beta)`` (so the lower
    reward is sometimes chosen, and ``chosen_env_reward`` may be below ``rejected_env_reward``).

    Returns the pairs and ``{"candidates", "ties", "tokens"}``: the candidate pairs drawn
    (up to the last one kept), how many were ties, and their response tokens (both
    responses of every counted candidate, ties included)."""
    parts, kept, candidates, ties, tokens = [], 0, 0, 0, 0
    limit = 50 * num_pairs + 1000
    while kept < num_pairs:
        if candidates >= limit:
            raise ConfigError(
                f"[estimator] pairs='sampled': only {kept} of {num_pairs} pairs after {candidates} candidates; "
                "the reward almost never tells two responses apart (ties are dropped)"
            )
        n = max(64, int(1.5 * (num_pairs - kept)))
        index, context = sample_contexts(task, n, generator, tagged=False)
        cmask = task.prompt_mask[index]  # text prompts are left-padded
        both, mask = generate(
            model,
            context.repeat(2, 1),
            task.horizon,
            task.eos_token,
            generator,
            temperature,
            attention_mask=cmask.repeat(2, 1),
        )
        both, mask = both.cpu(), mask.cpu()  # pairs live on the CPU, with the task; scoring moves them
        reward = sequence_rewards(task, index.repeat(2), both, mask)
        first, second = reward[:n], reward[n:]
        decided = (first - second).abs() > TIE_TOLERANCE
        # keep only as many candidates as needed, so the counts are exact
        order = decided.long().cumsum(0)
        cut = n if int(order[-1]) <= num_pairs - kept else int((order == num_pairs - kept).nonzero()[0]) + 1
        decided, index, context, cmask = decided[:cut], index[:cut], context[:cut], cmask[:cut]
        y1, y2, m1, m2 = both[:cut], both[n : n + cut], mask[:cut], mask[n : n + cut]
        r1, r2 = first[:cut], second[:cut]
        candidates += cut
        ties += int((~decided).sum())
        tokens += int(m1.sum() + m2.sum())
        if label_beta is None:
            swap = (r2 > r1)[:, None]
        else:
            p_first = torch.sigmoid((r1 - r2) / label_beta)
            swap = (torch.rand(cut, generator=generator, dtype=torch.float64) >= p_first)[:, None]
        keep = decided
        parts.append(
            PairBatch(
                prompt_ids=context[keep],
                prompt_mask=cmask[keep],
                prompt_index=index[keep],
                chosen_ids=torch.where(swap, y2, y1)[keep],
                chosen_mask=torch.where(swap, m2, m1)[keep],
                rejected_ids=torch.where(swap, y1, y2)[keep],
                rejected_mask=torch.where(swap, m1, m2)[keep],
                chosen_env_reward=torch.where(swap[:, 0], r2, r1)[keep],
                rejected_env_reward=torch.where(swap[:, 0], r1, r2)[keep],
            )
        )
        kept += int(keep.sum())
    return concat_pairs(parts), {"candidates": candidates, "ties": ties, "tokens": tokens}


# --- pairs from a JSONL file ------------------------------------------------------------

KEYS = ("prompt", "chosen", "rejected")


def load_pair_file(path: str | Path, task, limit: int | None = None) -> PairBatch:
    """Read ``{"prompt": ..., "chosen": ..., "rejected": ...}`` lines (token ids, or text
    when the task has a tokenizer). Blank lines are skipped; any bad line is a
    ``ConfigError`` naming the file and line number. ``limit`` keeps the first pairs."""
    prompts, chosen, rejected = [], [], []
    for where, line in numbered_lines(path, "[estimator] pairs file"):
        row = json_line(line, where)
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a JSON object with keys {', '.join(KEYS)}")
        missing = [k for k in KEYS if k not in row]
        if missing:
            raise ConfigError(
                f"{where}: missing key(s) {', '.join(map(repr, missing))}; each line needs {', '.join(KEYS)}"
            )
        prompts.append(_prompt(row["prompt"], task, where))
        y_w, y_l = (_response(row[k], task, where, k) for k in ("chosen", "rejected"))
        if y_w == y_l:
            raise ConfigError(f"{where}: chosen and rejected are the same response")
        chosen.append(y_w)
        rejected.append(y_l)
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise ConfigError(f"[estimator] pairs file {str(path)!r} holds no pairs")
    if limit is not None and len(prompts) < limit:
        raise ConfigError(f"[estimator] num_pairs = {limit}, but pairs file {str(path)!r} holds only {len(prompts)}")
    rows = [p for p, _ in prompts]
    prompt_ids, prompt_mask = task.lay_out_prompts(rows) if task.padded_prompts else _pad(rows, left=True)
    ids, mask = _pad(chosen + rejected)  # one width for both sides: they are scored as one batch
    (chosen_ids, rejected_ids), (chosen_mask, rejected_mask) = ids.split(len(chosen)), mask.split(len(chosen))
    return PairBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompt_index=torch.tensor([i for _, i in prompts]),
        chosen_ids=chosen_ids,
        chosen_mask=chosen_mask,
        rejected_ids=rejected_ids,
        rejected_mask=rejected_mask,
    )


def _ids(value: Any, task, where: str, key: str) -> list[int]:
    if isinstance(value, str):
        tokenizer = task.tokenizer
        if tokenizer is None:
            raise ConfigError(
                f"{where}: {key!r} is text, but env {task.name!r} has no "
                "tokenizer; give token ids (a list of integers) instead"
            )
        return list(tokenizer.encode(value))
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where}: {key!r} must be a list of token ids (integers) or a string")
    return value


def _in_range(ids: list[int], size: int, where: str, key: str, what: str) -> list[int]:
    """``ids``, if not empty and all in ``0..size-1``; else a ConfigError naming the line and key."""
    if not ids:
        raise ConfigError(f"{where}: {key!r} is an empty {what}")
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise ConfigError(f"{where}: {key!r} token id {bad[0]} is out of range; {what} tokens are 0..{size - 1}")
    return ids


def _response(value: Any, task, where: str, key: str) -> list[int]:
    ids = _in_range(_ids(value, task, where, key), task.vocab_size, where, key, "response")
    if len(ids) > task.horizon:
        raise ConfigError(f"{where}: {key!r} has {len(ids)} tokens, more than env.horizon = {task.horizon}")
    eos = task.eos_token
    if eos is not None and eos in ids[:-1]:
        raise ConfigError(f"{where}: {key!r} continues after the EOS token {eos}")
    return ids


def _prompt(value: Any, task, where: str) -> tuple[list[int], int]:
    """Prompt ids and their row in ``task.prompts`` (with or without the leading BOS id)."""
    ids = _ids(value, task, where, "prompt")
    if task.padded_prompts:  # text: any prompt (tokens without BOS), not only the env's own
        return _in_range(ids, task.input_vocab_size, where, "prompt", "prompt"), task.prompt_row(ids)
    try:
        table = task.prompts
    except (AttributeError, NotImplementedError):
        table = None
    if table is None:  # a task without a prompt table: any prompt its policies can embed
        return _in_range(ids, task.input_vocab_size, where, "prompt", "prompt"), -1
    bos = task.bos_token
    for candidate in (ids, [bos, *ids]):
        if len(candidate) == table.shape[1]:
            match = (table == torch.tensor(candidate)).all(1).nonzero()
            if match.numel():
                return candidate, int(match[0])
    known = ", ".join(str(row) for row in table.tolist()[:8]) + (" ..." if table.shape[0] > 8 else "")
    raise ConfigError(
        f"{where}: prompt {ids} is not a prompt of env {task.name!r}; "
        f"its prompts are {known} (the leading {bos} is BOS and may be left out)"
    )


def _pad(rows: list[list[int]], left: bool = False) -> tuple[Tensor, Tensor]:
    """Prompts are left-padded with an integer mask (as rollouts have); responses are
    right-padded with a float mask (as ``response_mask``)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long if left else torch.float32)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1.0
    return ids, mask
