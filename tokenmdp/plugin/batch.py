"""The rollout record every component reads (``RolloutBatch``) and scoring a batch's
response tokens under a model (``response_logits``, ``token_logprobs``)."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from ..policies.base import TokenPolicy
from .chunked import chunked_kl, chunked_token_stats
from .ops import at_least_float32


class NotScored(LookupError):
    """A step read a batch field it did not compute (``ref_logprobs``); the component that
    reads it must declare it (``requires``). Inside a component's call it becomes a
    ``PluginError`` naming the component and the step."""


@attrs.frozen
class GuidedPrompts:
    """A guide that rewrites each prompt instead of going in front of it (a chat prompt's
    system message): the guided form of every prompt of the task, ``ids``/``mask``
    ``[num_prompts, width]`` laid out as the env lays out prompts. Where a guide prefix
    (ids) is accepted, this is too: each row's prompt is replaced by its guided form."""

    ids: Tensor
    mask: Tensor


@attrs.define
class RolloutBatch:
    """One step's responses. Per-token tensors are ``[batch, response_len]``;
    ``response_mask`` is 1 on real tokens (padding after EOS is 0)."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    rewards: Tensor
    prompt_index: Tensor
    logprobs: Tensor | None = None
    #: Read through :attr:`ref_logprobs`: None when the step did not score the reference.
    _ref_logprobs: Tensor | None = None
    #: False when the env was run reward-free (no component required ``rewards``).
    rewards_observed: bool = True
    #: Leading columns of ``prompt_ids`` kept in front of a conditioning prefix: 1 for text
    #: prompts laid out ``[BOS, pad..., prompt]`` (the guide goes after BOS), else 0.
    prefix_offset: int = 0
    #: ``[batch]``: rows with one value are the responses to one draw of a prompt
    #: (``train.samples_per_prompt > 1``); None: the batch was not sampled in groups.
    group_index: Tensor | None = None

    @property
    def ref_logprobs(self) -> Tensor:
        """``[batch, response_len]`` log-probs of the sampled tokens under the reference (0
        on padding). The trainer scores the reference only for a step that needs it: where
        ``train.log_kl`` is true or a component declares ``"ref_logprobs"`` in its
        ``requires``; reading it otherwise is an error that says so."""
        if self._ref_logprobs is None:
            raise NotScored(
                'batch.ref_logprobs (and batch.token_kl) was not computed for this step: declare "ref_logprobs" in '
                "the requires of the component that reads it (or set train.log_kl = true)"
            )
        return self._ref_logprobs

    @ref_logprobs.setter
    def ref_logprobs(self, value: Tensor | None) -> None:
        self._ref_logprobs = value

    @property
    def size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def sequence_rewards(self) -> Tensor:
        return (self.rewards * self.response_mask).sum(1)

    @property
    def token_kl(self) -> Tensor:
        """``[batch, response_len]``: the k1 estimate of the per-token ``KL(pi_old || pi_ref)``,
        ``log pi_old - log pi_ref`` of each sampled token (0 on padding)."""
        return (self.logprobs - self.ref_logprobs) * self.response_mask

    @property
    def groups(self) -> Tensor:
        """``[batch]`` group of each response, for group baselines (RLOO, GRPO): its draw
        of a prompt when sampled in groups, else its prompt (every response to a prompt)."""
        return self.group_index if self.group_index is not None else self.prompt_index

    @property
    def device(self) -> torch.device:
        return self.response_ids.device

    def _tensors(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name) for f in attrs.fields(type(self)) if isinstance(getattr(self, f.name), Tensor)
        }

    def _derived(self, tensors: dict[str, Tensor]) -> RolloutBatch:
        """The batch with ``tensors`` (by field name) in place of its own."""
        return attrs.evolve(self, **{name.lstrip("_"): t for name, t in tensors.items()})

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The batch with every tensor on ``device`` (itself when they already are)."""
        device, tensors = torch.device(device), self._tensors()
        if all(t.device == device for t in tensors.values()):
            return self
        return self._derived({name: t.to(device) for name, t in tensors.items()})

    def select(self, index: Tensor) -> RolloutBatch:
        """Rows ``index`` of every tensor (for minibatches)."""
        return self._derived({name: t[index] for name, t in self._tensors().items()})


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """The rows of several batches, in order, as one batch (tensor shapes must agree past
    the first dimension)."""
    if len(batches) == 1:
        return batches[0]
    tensors = {}
    for f in attrs.fields(RolloutBatch):
        values = [getattr(b, f.name) for b in batches]
        if isinstance(values[0], Tensor):
            shapes = {tuple(v.shape[1:]) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot concatenate batches: {f.name} shapes differ past dim 0: {sorted(shapes)}")
            tensors[f.name.lstrip("_")] = torch.cat(values)
    groups = [b.group_index for b in batches]
    if all(g is not None for g in groups):  # each sub-batch's groups stay its own
        offsets = torch.tensor([0, *[int(g.max()) + 1 for g in groups[:-1]]]).cumsum(0).tolist()
        tensors["group_index"] = torch.cat([g + k for g, k in zip(groups, offsets)])
    observed = {b.rewards_observed for b in batches}
    return attrs.evolve(batches[0], **tensors, rewards_observed=all(observed))


def prompts_with_prefix(batch: RolloutBatch, prefix_ids: Tensor | GuidedPrompts) -> tuple[Tensor, Tensor]:
    """The batch's prompts (ids, mask) with a conditioning prefix in them: after the first
    ``batch.prefix_offset`` columns (a pinned BOS of text prompts), else in front of
    everything; a :class:`GuidedPrompts` replaces each row's prompt by its guided form
    instead. Where :func:`response_logits` scores with a prefix, and where a component that
    samples with one (context distillation) must put it."""
    ids, mask = batch.prompt_ids, batch.prompt_mask
    if isinstance(prefix_ids, GuidedPrompts):  # each prompt replaced by its guided form
        index = batch.prompt_index.cpu()
        return prefix_ids.ids[index].to(ids.device), prefix_ids.mask[index].to(mask.device)
    prefix_ids = prefix_ids.to(ids.device)
    prefix = prefix_ids.view(1, -1).expand(ids.shape[0], -1) if prefix_ids.dim() == 1 else prefix_ids
    k = batch.prefix_offset
    ids = torch.cat([ids[:, :k], prefix, ids[:, k:]], dim=1)
    mask = torch.cat([mask[:, :k], torch.ones_like(prefix, dtype=mask.dtype), mask[:, k:]], dim=1)
    return ids, mask


def _whole_sequences(batch: RolloutBatch, prefix_ids) -> tuple[Tensor, Tensor, Tensor]:
    """``(prompt ids, prompt + response ids, their mask)``, the prompts with ``prefix_ids``
    in them when given (:func:`prompts_with_prefix`): what a scoring forward reads."""
    ids, mask = (batch.prompt_ids, batch.prompt_mask) if prefix_ids is None else prompts_with_prefix(batch, prefix_ids)
    full_ids = torch.cat([ids, batch.response_ids], dim=1)
    full_mask = torch.cat([mask.to(batch.response_ids.dtype), torch.ones_like(batch.response_ids)], dim=1)
    return ids, full_ids, full_mask


def response_logits(model: TokenPolicy, batch: RolloutBatch, prefix_ids: Tensor | None = None) -> Tensor:
    """``[B, T, V]`` logits of each response token's distribution under ``model``,
    optionally with a conditioning prefix in front of the prompt (one forward pass).

    The prefix goes where :func:`prompts_with_prefix` puts it. Models that can (HF causal
    LMs) compute the output layer on the response positions only."""
    ids, full_ids, full_mask = _whole_sequences(batch, prefix_ids)
    t = batch.response_ids.shape[1]
    if getattr(model, "supports_logits_to_keep", False):
        return model(full_ids, full_mask, logits_to_keep=t + 1)[:, :t]
    logits = model(full_ids, full_mask)
    start = ids.shape[1] - 1
    return logits[:, start : start + t]


def token_logprobs(
    model: TokenPolicy,
    batch: RolloutBatch,
    prefix_ids: Tensor | None = None,
    return_logits: bool = False,
    return_entropy: bool = False,
    chunk: int | None = None,
    entropy_grad: bool = True,
):
    """Log-prob of each taken response token under ``model`` (0 on padding); with
    ``return_logits`` also the ``[B, T, V]`` logits, with ``return_entropy`` (instead) the
    ``[B, T]`` entropy of each position's distribution (0 on padding).

    ``chunk``: a model that gives its last hidden states (HF causal LMs,
    ``supports_hidden_states``) computes the output layer ``chunk`` positions at a time and
    never holds the batch's logits (:mod:`.chunked`); None (or a toy policy, or
    ``return_logits``): the whole ``[B, T, V]`` logits at once, as always. ``entropy_grad``
    false: the entropy is only read (a metric), which a frozen output layer computes for
    less."""
    if chunk and not return_logits and getattr(model, "supports_hidden_states", False):
        return _chunked_logprobs(model, batch, prefix_ids, return_entropy, chunk, entropy_grad)
    logits = at_least_float32(response_logits(model, batch, prefix_ids))
    logp = torch.log_softmax(logits, dim=-1)
    taken = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask
    if return_logits:
        return taken, logits
    if return_entropy:
        # its own log-softmax, as entropy_of(logits) computes it: a loss with an entropy
        # term then has the very graph (and gradients, bit for bit) it had with the logits
        own = torch.log_softmax(logits, dim=-1)
        return taken, -(own.exp() * own).sum(-1) * batch.response_mask
    return taken


def _response_rows(model, batch: RolloutBatch, prefix_ids, forward=None):
    """What the chunked paths read: ``(rows [N, width], head, frozen, real)``, the last hidden
    states of the batch's ``N`` real response tokens (``real``: their flat indices), the
    function that makes logits from them, and the frozen output layer or None; ``forward``:
    ``model.response_hidden``'s result when the caller has it already."""
    b, t = batch.response_ids.shape
    if forward is None:
        _, full_ids, full_mask = _whole_sequences(batch, prefix_ids)
        forward = model.response_hidden(full_ids, full_mask, keep=t + 1)
    hidden, head = forward
    real = (batch.response_mask > 0).flatten().nonzero().squeeze(1)
    rows = hidden[:, :t].reshape(b * t, -1)[real]
    frozen = model.frozen_output_layer() if hasattr(model, "frozen_output_layer") else None
    return rows, head, frozen, real


def _spread(values: Tensor, real: Tensor, batch: RolloutBatch) -> Tensor:
    """``[B, T]``: ``values`` of the real response tokens at their places, 0 on padding."""
    b, t = batch.response_ids.shape
    return torch.zeros(b * t, dtype=values.dtype, device=values.device).index_put((real,), values).view(b, t)


def _chunked_logprobs(
    model, batch: RolloutBatch, prefix_ids, return_entropy: bool, chunk: int, entropy_grad: bool, forward=None
):
    """:func:`token_logprobs` through :func:`.chunked.chunked_token_stats`, on the real
    response tokens only (padding gets 0 without a logit computed for it); ``forward``:
    ``model.response_hidden``'s result when the caller has it already."""
    rows, head, frozen, real = _response_rows(model, batch, prefix_ids, forward)
    targets = batch.response_ids.flatten()[real]
    taken, entropy = chunked_token_stats(rows, head, targets, chunk, return_entropy, frozen, entropy_grad)
    out = _spread(taken, real, batch)
    return (out, _spread(entropy, real, batch)) if return_entropy else out


@attrs.frozen
class TokenDistribution:
    """A policy's distribution over the vocabulary at every response position of a batch
    (``[batch, response_len]`` positions), held one of two ways: its whole log-probs
    (``log_probs``, ``[B, T, V]``: a toy policy's, or whenever the logits were made anyway),
    or the model's last hidden states (``hidden``, ``[B, T, width]``) with the output layer
    that makes its logits from them (``head``), which :func:`token_kl` applies a chunk of
    positions at a time, so the ``[B, T, V]`` tensor never exists. Rows select as a
    tensor's do (``dist[rows]``)."""

    log_probs: Tensor | None = None
    hidden: Tensor | None = None
    head: object = None

    def __getitem__(self, rows) -> TokenDistribution:
        if self.log_probs is not None:
            return TokenDistribution(log_probs=self.log_probs[rows])
        return TokenDistribution(hidden=self.hidden[rows], head=self.head)

    def whole(self) -> Tensor:
        """``[B, T, V]`` log-probs (made here, all at once, when held as hidden states)."""
        if self.log_probs is not None:
            return self.log_probs
        with torch.no_grad():
            return torch.log_softmax(at_least_float32(self.head(self.hidden)), dim=-1)


def token_distribution(
    model: TokenPolicy, batch: RolloutBatch, prefix_ids: Tensor | None = None, chunk: int | None = None
) -> tuple[Tensor, TokenDistribution]:
    """``(log-probs of the taken tokens [B, T], the distribution at every position)`` under
    ``model``, without gradients: with ``chunk`` and a model that gives its hidden states,
    the distribution is held as those (the output layer applied to the taken tokens ``chunk``
    positions at a time); else as the whole log-probs, from one forward as always."""
    with torch.no_grad():
        if chunk and getattr(model, "supports_hidden_states", False):
            _, full_ids, full_mask = _whole_sequences(batch, prefix_ids)
            t = batch.response_ids.shape[1]
            hidden, head = model.response_hidden(full_ids, full_mask, keep=t + 1)
            taken = _chunked_logprobs(model, batch, prefix_ids, False, chunk, False, (hidden, head))
            return taken, TokenDistribution(hidden=hidden[:, :t], head=head)
        logp = torch.log_softmax(at_least_float32(response_logits(model, batch, prefix_ids)), -1)
        taken = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask
        return taken, TokenDistribution(log_probs=logp)


def token_kl(
    model: TokenPolicy,
    batch: RolloutBatch,
    target: TokenDistribution,
    chunk: int | None = None,
    direction: str = "reverse",
    return_logprobs: bool = False,
) -> tuple[Tensor, ...]:
    """``(KL, pi's entropy)``, each ``[B, T]`` and 0 on padding, and with ``return_logprobs``
    the log-probs of the taken tokens third, from the same forward: ``pi`` is ``model`` on
    the batch's responses (with gradients), ``q`` the ``target`` distribution at the same
    positions (over the whole vocabulary; no gradient); ``direction`` ``"reverse"`` is
    ``KL(pi || q)``, ``"forward"`` ``KL(q || pi)``. The entropy is a value only. With
    ``chunk`` and a model that gives its hidden states, both sides' logits are made ``chunk``
    positions at a time (:func:`.chunked.chunked_kl`); else from the whole logits."""
    mask = batch.response_mask
    if chunk and getattr(model, "supports_hidden_states", False):
        rows, head, frozen, real = _response_rows(model, batch, None)
        if target.log_probs is not None:
            q, target_head = target.log_probs.flatten(0, 1)[real], None
        else:
            q, target_head = target.hidden.flatten(0, 1)[real], target.head
        ids = batch.response_ids.flatten()[real] if return_logprobs else None
        out = chunked_kl(rows, head, q, chunk, target_head, frozen, direction, ids)
        return tuple(_spread(v, real, batch) for v in out)
    logits = at_least_float32(response_logits(model, batch))
    # the taken tokens' log-probs first and the KL from its own log-softmax, the graph that
    # token_logprobs and a KL of the logits made before: a toy run's gradients, bit for bit
    taken = None
    if return_logprobs:
        taken = torch.log_softmax(logits, -1).gather(-1, batch.response_ids[..., None]).squeeze(-1) * mask
    logp, q = torch.log_softmax(logits, -1), target.whole()
    kl = (q.exp() * (q - logp)).sum(-1) if direction == "forward" else (logp.exp() * (logp - q)).sum(-1)
    own = torch.log_softmax(logits.detach(), dim=-1)  # as entropy_of computes it
    out = (kl * mask, -(own.exp() * own).sum(-1) * mask)
    return out if taken is None else (*out, taken)


def response_nll(
    model: TokenPolicy, ids: Tensor, attention_mask: Tensor | None, context_len: int, target_mask: Tensor
) -> Tensor:
    """Supervised fine-tuning's loss: the mean negative log-likelihood under ``model`` of
    the tokens of ``ids`` after its first ``context_len`` columns, over ``target_mask``
    (``[B, T - context_len]``, 1 on real response tokens)."""
    logits = model(ids, attention_mask)[:, context_len - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, context_len:].flatten(), reduction="none")
    return (nll * target_mask.flatten()).sum() / target_mask.sum()
