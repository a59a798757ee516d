"""Exact KL-regularised optimum of a toy token MDP by a soft Bellman backup over the
prefix tree (METHOD.md section 2), batched with torch, in float64.

Tree layout: at depth ``t`` the states of prompt ``p`` are the ``V**t`` prefixes, indexed
by their tokens read as a base-``V`` number; the children of state ``i`` are
``i*V + a``. Every per-depth tensor is ``[num_prompts, V**t, V]`` (one entry per action).
States that lie after an EOS are unreachable; they are computed but never weighted.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from ..devices import module_device
from ..policies.base import ExactPolicy, TokenPolicy
from .task import TokenTask

DTYPE = torch.float64


def all_prefixes(vocab_size: int, depth: int) -> Tensor:
    """``[V**depth, depth]``: every prefix of length ``depth`` in tree order."""
    index = torch.arange(vocab_size**depth)
    powers = vocab_size ** torch.arange(depth - 1, -1, -1)
    return (index[:, None] // powers) % vocab_size


def prefix_index(prefix: Tensor, vocab_size: int) -> Tensor:
    """Inverse of :func:`all_prefixes` for a batch ``[N, t]``."""
    index = torch.zeros(prefix.shape[0], dtype=torch.long)
    for k in range(prefix.shape[1]):
        index = index * vocab_size + prefix[:, k]
    return index


@torch.no_grad()
def tree_logprobs(policy: TokenPolicy, task: TokenTask, prefix_ids: Tensor | None = None) -> list[Tensor]:
    """Log-probs of ``policy`` at every state of the tree, one decoding step per state.

    The policy runs on its own device; the log-probs come back to the CPU in float64."""
    prompts = task.prompts
    if prefix_ids is not None:
        prompts = torch.cat([prefix_ids.cpu().expand(prompts.shape[0], -1), prompts], dim=1)
    n_prompts, vocab = prompts.shape[0], task.vocab_size
    device = module_device(policy)
    cpu = torch.device("cpu")

    def log_softmax(logits):
        return torch.log_softmax(logits.to(device=cpu, dtype=DTYPE), -1)

    was_training = policy.training
    policy.eval()
    logits, state = policy.start(prompts.to(device))
    out = [log_softmax(logits).view(n_prompts, 1, vocab)]
    for t in range(1, task.horizon):
        rows = n_prompts * vocab ** (t - 1)
        state = policy.reindex_state(state, torch.arange(rows, device=device).repeat_interleave(vocab))
        logits, state = policy.advance(state, torch.arange(vocab, device=device).repeat(rows))
        out.append(log_softmax(logits).view(n_prompts, vocab**t, vocab))
    policy.train(was_training)
    return out


@attrs.define
class Solution:
    """V*, Q*, pi*, A* and J* for one task, reference and beta; evaluates any policy exactly."""

    task: TokenTask
    beta: float
    ref_logp: list[Tensor]
    rewards: list[Tensor]
    q: list[Tensor]
    v: list[Tensor]
    opt_logp: list[Tensor]

    @property
    def prompt_probs(self) -> Tensor:
        return self.task.prompt_probs.to(DTYPE)

    @property
    def j_star(self) -> float:
        return float((self.prompt_probs * self.v[0][:, 0]).sum())

    def advantages(self, t: int) -> Tensor:
        """``A*(s, a) = Q* - V* = beta * log pi*/pi_ref`` at depth ``t``."""
        return self.q[t] - self.v[t][..., None]

    def evaluate(self, policy_logp: list[Tensor]) -> dict[str, float]:
        """Exact E[R], KL(pi||pi_ref), J, regret and KL(pi||pi*) by forward reach probabilities,
        and the expected response length under the policy (``response_length``) and under
        pi* (``optimal_length``), in tokens, EOS included (:meth:`expected_length`)."""
        reach = self.prompt_probs[:, None]
        reward = kl_ref = kl_opt = length = 0.0
        for t, logp in enumerate(policy_logp):
            logp = logp.to(DTYPE)
            length += float(reach.sum())  # P(the response has a token at position t)
            weight = reach[..., None] * logp.exp()
            safe = weight > 0  # 0 * log 0 = 0, even where a log-prob is -inf
            reward += float(torch.where(safe, weight * self.rewards[t], 0).sum())
            kl_ref += float(torch.where(safe, weight * (logp - self.ref_logp[t]), 0).sum())
            kl_opt += float(torch.where(safe, weight * (logp - self.opt_logp[t]), 0).sum())
            continues = ~self.task.ending_actions(t)
            reach = (weight * continues).reshape(weight.shape[0], -1)
        j = reward - self.beta * kl_ref
        return {
            "true_reward": reward,
            "kl_ref": kl_ref,
            "objective": j,
            "regret": self.j_star - j,
            "kl_to_optimal": kl_opt,
            "response_length": length,
            "optimal_length": self.expected_length(self.opt_logp),
        }

    def expected_length(self, policy_logp: list[Tensor]) -> float:
        """``E_pi[|y|]`` over the prompts, in tokens: a response ends at EOS (which counts,
        as in :class:`~tokenmdp.training.evaluation.SampledEvaluator`'s ``response_length``)
        or at the horizon. It is ``sum_t P(|y| > t)``, the reach probability of each depth."""
        reach = self.prompt_probs[:, None]
        length = 0.0
        for t, logp in enumerate(policy_logp):
            length += float(reach.sum())
            weight = reach[..., None] * logp.to(DTYPE).exp()
            reach = (weight * ~self.task.ending_actions(t)).reshape(weight.shape[0], -1)
        return length

    def policy_values(self, policy_logp: list[Tensor], kl_coef: float) -> tuple[list[Tensor], list[Tensor]]:
        """``(Q^pi, V^pi)`` per depth of the policy with tree log-probs ``policy_logp``, for
        the reward less ``kl_coef * log(pi/pi_ref)``: ``Q^pi(s, a) = r + V^pi(s')`` and
        ``V^pi(s) = E_pi[Q^pi(s, a) - kl_coef * log(pi/pi_ref)(a|s)]``, so ``Q^pi - V^pi`` is
        the advantage ``A^pi`` (at ``pi = pi*`` and ``kl_coef = beta``, ``A*``). What a
        perfect critic of ``pi`` would learn, and the exact check of Monte-Carlo credit."""
        task = self.task
        n, vocab = task.prompts.shape[0], task.vocab_size
        q: list[Tensor] = [None] * task.horizon
        v: list[Tensor] = [None] * task.horizon
        for t in range(task.horizon - 1, -1, -1):
            logp = policy_logp[t].to(DTYPE)
            q[t] = self.rewards[t].clone()
            if t + 1 < task.horizon:
                q[t] += (~task.ending_actions(t)) * v[t + 1].view(n, vocab**t, vocab)
            p = logp.exp()
            # 0 * (-inf) = 0 for never-taken tokens
            v[t] = torch.where(p > 0, p * (q[t] - kl_coef * (logp - self.ref_logp[t])), 0).sum(-1)
        return q, v

    def token_advantages(self, prompt_index: Tensor, response_ids: Tensor, response_mask: Tensor) -> Tensor:
        """True ``A*(s_t, a_t)`` on every response token, ``[B, T]`` (0 on padding)."""
        return self.along_responses(self.advantages, prompt_index, response_ids, response_mask)

    def along_responses(
        self, table, prompt_index: Tensor, response_ids: Tensor, response_mask: Tensor, per_action: bool = True
    ) -> Tensor:
        """``[B, T]``: ``table(t)`` (a depth-``t`` tensor ``[P, V**t, V]``, or ``[P, V**t]``
        with ``per_action=False``) read at each response token's state ``s_t`` (and token
        ``a_t``); 0 on padding. Computed on the CPU, where the solution lives."""
        prompt_index, response_ids, response_mask = prompt_index.cpu(), response_ids.cpu(), response_mask.cpu()
        b, length = response_ids.shape
        out = torch.zeros(b, length, dtype=DTYPE)
        index = torch.zeros(b, dtype=torch.long)
        vocab = self.task.vocab_size
        for t in range(min(length, self.task.horizon)):
            real = response_mask[:, t] > 0
            a = torch.where(real, response_ids[:, t], 0)
            at_state = table(t)[prompt_index, index]
            value = at_state.gather(1, a[:, None]).squeeze(1) if per_action else at_state
            out[:, t] = torch.where(real, value, 0)
            index = index * vocab + a
        return out

    def policy(self) -> OptimalPolicy:
        return OptimalPolicy(self)


class OptimalPolicy(ExactPolicy):
    """pi* of a :class:`Solution` as a policy (the ``oracle`` target, tilted SFT data)."""

    def __init__(self, solution: Solution):
        super().__init__(solution.task)
        self.solution = solution

    def next_logits(self, prompt_index, prefix):
        t = prefix.shape[1]
        if t >= self.task.horizon:
            return torch.zeros(prefix.shape[0], self.vocab_size)
        index = prefix_index(prefix, self.vocab_size)
        return self.solution.opt_logp[t][prompt_index, index].float()


@torch.no_grad()
def solve(task: TokenTask, reference: TokenPolicy, beta: float, ref_logp: list[Tensor] | None = None) -> Solution:
    """Soft Bellman backup: ``Q = r + V(child)``, ``V = beta logsumexp(log pi_ref + Q/beta)``."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (got {beta})")
    ref_logp = ref_logp if ref_logp is not None else tree_logprobs(reference, task)
    n_prompts, vocab = task.prompts.shape[0], task.vocab_size
    rewards = []
    for t in range(task.horizon):
        prefixes = all_prefixes(vocab, t).repeat(n_prompts, 1)
        prompt_index = torch.arange(n_prompts).repeat_interleave(vocab**t)
        rewards.append(task.next_token_rewards(prompt_index, prefixes).to(DTYPE).view(n_prompts, vocab**t, vocab))
    q: list[Tensor] = [None] * task.horizon
    v: list[Tensor] = [None] * task.horizon
    opt: list[Tensor] = [None] * task.horizon
    for t in range(task.horizon - 1, -1, -1):
        q[t] = rewards[t].clone()
        if t + 1 < task.horizon:
            continues = ~task.ending_actions(t)
            q[t] += continues * v[t + 1].view(n_prompts, vocab**t, vocab)
        v[t] = beta * torch.logsumexp(ref_logp[t] + q[t] / beta, dim=-1)
        opt[t] = ref_logp[t] + (q[t] - v[t][..., None]) / beta
    return Solution(task=task, beta=beta, ref_logp=ref_logp, rewards=rewards, q=q, v=v, opt_logp=opt)
