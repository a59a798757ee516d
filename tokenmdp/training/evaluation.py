"""Scoring against the exact optimum: every toy run reports these every evaluation step."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..devices import module_device
from ..mdp.solver import Solution, solve, tree_logprobs
from ..plugin.batch import GuidedPrompts, RolloutBatch, prompts_with_prefix
from ..plugin.ops import masked_correlation
from ..plugin.sampling import SamplingParams
from ..policies.base import TokenPolicy


class ExactEvaluator:
    """Holds the solver's answer for (task, reference, beta) and scores policies exactly."""

    #: Exact scores sample nothing (see :attr:`SampledEvaluator.samples`).
    samples: list[dict] = []

    def __init__(self, task, reference: TokenPolicy, beta: float):
        self.task = task
        self.solution: Solution = solve(task, reference, beta)
        self.start = self.solution.evaluate(self.solution.ref_logp)
        #: ``J* - J(pi_ref)``: what there is to gain; regret is also reported as a fraction of it.
        self.start_gap = self.start["regret"]

    def evaluate(self, policy: TokenPolicy, prefix_ids: Tensor | None = None) -> dict[str, float]:
        """Exact scores of ``policy`` (conditioned on ``prefix_ids`` if given).

        ``closure = (J(pi) - J(pi_ref)) / (J* - J(pi_ref)) = 1 - regret_frac``."""
        scores = self.solution.evaluate(tree_logprobs(policy, self.task, prefix_ids=prefix_ids))
        scores["regret_frac"] = scores["regret"] / self.start_gap if self.start_gap > 0 else 0.0
        scores["closure"] = 1.0 - scores["regret_frac"]
        scores["j_star"] = self.solution.j_star
        return scores

    def credit(self, batch: RolloutBatch, signals: Mapping[str, Tensor], advantages: Mapping[str, Tensor]) -> dict:
        """``credit_corr``: correlation of the per-token credit with the true A* on the
        sampled tokens (``token_rewards`` when the estimator provides them, else the
        advantages); ``credit_corr_advantages`` always uses the advantages."""
        true = self.solution.token_advantages(batch.prompt_index, batch.response_ids, batch.response_mask)
        mask = batch.response_mask.cpu()
        credit = signals.get("token_rewards", advantages["advantages"])
        return {
            "credit_corr": masked_correlation(credit.detach().cpu(), true, mask),
            "credit_corr_advantages": masked_correlation(advantages["advantages"].detach().cpu(), true, mask),
        }


#: The roles of the held-out responses a text run keeps (``eval_completions.jsonl.gz``), in
#: file order: the reference's, the trained policy's, the guided reference's.
ROLES = ("reference", "policy", "guided_reference")


def _standard_error(values: list[float]) -> float:
    """The standard error of the mean of ``values`` (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def distinct_bigrams(response_ids: Tensor, mask: Tensor) -> float:
    """distinct-2: distinct token bigrams over all bigrams of the responses (real tokens
    only); near 1 for varied text, falling as responses repeat themselves or each other."""
    bigrams = []
    for row, n in zip(response_ids.tolist(), mask.sum(1).tolist()):
        row = row[: int(n)]
        bigrams += list(zip(row, row[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def win_rate(values: list[float], reference: list[float]) -> float:
    """How often a response scores above the reference's to the same prompt (the same
    held-out draw), ties counting half."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(values, reference)) / len(values)


class SampledEvaluator:
    """Scores policies on tasks without an exact solver (text) by sampling.

    Each evaluation samples ``num_samples`` responses from the policy, for prompts drawn
    with a fixed seed (the same prompts and the same random stream every time, so
    successive evaluations differ only by the policy), and reports

    * ``kl_ref``: the mean over responses of ``sum_t log pi(y_t|s_t) - log pi_ref(y_t|s_t)``,
      an unbiased estimate of the sequence-level ``KL(pi || pi_ref)``;
    * ``true_reward``: the mean reward of those responses, when the task has a reward
      (read for evaluation only, as the exact solver reads the toy reward);
    * ``objective``: ``true_reward - beta * kl_ref`` (with a reward);
    * ``response_length``: the mean response length in tokens (EOS included);
    * ``kl_ref_se`` (the standard error of ``kl_ref``) and ``distinct_2`` (:func:`distinct_bigrams`);
    * with ``env.judges``: each judge's mean ``judge/NAME``, its standard error and its
      ``win_rate`` against the reference's responses to the same prompts.

    There is no ``regret``, ``closure``, ``J*`` or credit score: nothing knows the optimum.
    """

    solution = None

    def __init__(
        self,
        task,
        reference: TokenPolicy,
        beta: float,
        num_samples: int,
        seed: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        sampler: str = "multinomial",
        backend=None,
        logit_chunk: int | None = None,
    ):
        self.task, self.reference, self.beta = task, reference, beta
        #: ``train.logit_chunk`` in positions: the KL's scoring passes never hold the logits
        self.logit_chunk = logit_chunk
        self.num_samples, self.seed = num_samples, seed
        self.params = SamplingParams(temperature, top_k, top_p, sampler)
        self.backend = backend
        self._start: dict[str, float] | None = None
        #: the reference's judge scores of its own held-out samples, per judge
        self._reference_judged: dict[str, list[float]] | None = None
        self._samples: dict[str, list[dict]] = {}  # "reference" / "policy" -> rows (:attr:`samples`)

    @property
    def start(self) -> dict[str, float]:
        """The reference's own scores (its ``kl_ref`` is 0 by definition)."""
        if self._start is None:
            self._start = self.evaluate(self.reference)
            self._start["kl_ref"] = 0.0
            if "objective" in self._start:
                self._start["objective"] = self._start["true_reward"]
        return self._start

    @torch.no_grad()
    def sample(self, policy: TokenPolicy, prefix_ids: Tensor | GuidedPrompts | None = None) -> RolloutBatch:
        """The held-out draw's responses from ``policy``; with ``prefix_ids``, from ``policy``
        conditioned on that guide (:func:`prompts_with_prefix`). The batch holds the plain
        prompts either way: what the responses are scored and judged as answers to."""
        from .rollout import generate_samples, sampling_generator

        task = self.task
        generator = torch.Generator().manual_seed(self.seed)
        index = torch.multinomial(task.prompt_probs, self.num_samples, replacement=True, generator=generator)
        batch = RolloutBatch(
            prompt_ids=task.prompts[index],
            prompt_mask=task.prompt_mask[index],
            response_ids=torch.zeros(0),
            response_mask=torch.zeros(0),
            rewards=torch.zeros(0),
            prompt_index=index,
            rewards_observed=False,
            prefix_offset=task.prefix_offset,
        )
        ids, ids_mask = (
            (batch.prompt_ids, batch.prompt_mask) if prefix_ids is None else prompts_with_prefix(batch, prefix_ids)
        )
        device = module_device(policy)
        if device.type != "cpu":  # the same stream for every policy scored on this device
            generator = sampling_generator(self.seed, device)
        sample = self.backend.sample if self.backend is not None else generate_samples
        drawn = sample(policy, ids, ids_mask, task.horizon, task.eos_token, generator, self.params)
        batch.response_ids, batch.response_mask = drawn.response, drawn.mask
        batch.rewards = torch.zeros_like(drawn.mask)
        return batch.to(device)

    @torch.no_grad()
    def evaluate(self, policy: TokenPolicy, prefix_ids: Tensor | GuidedPrompts | None = None) -> dict[str, float]:
        """The scores of ``policy`` (with ``prefix_ids``: of ``policy`` conditioned on that
        guide, its ``kl_ref`` that of ``pi(.|c + x)`` to ``pi_ref(.|x)``)."""
        from ..plugin.batch import token_logprobs

        judged = getattr(self.task, "judges", None) is not None
        if judged and self._reference_judged is None and (policy is not self.reference or prefix_ids is not None):
            self.start  # noqa: B018 (the reference's own judgements: each win rate's other side)
        batch = self.sample(policy, prefix_ids)
        mask = batch.response_mask
        chunk = self.logit_chunk
        own = token_logprobs(policy, batch, prefix_ids=prefix_ids, chunk=chunk)
        ref = token_logprobs(self.reference, batch, chunk=chunk)
        kl = ((own - ref) * mask).sum(1)
        scores = {
            "kl_ref": float(kl.mean()),
            "kl_ref_se": _standard_error(kl.double().tolist()),
            "response_length": float(mask.sum(1).float().mean()),
            "distinct_2": distinct_bigrams(batch.response_ids, mask),
        }
        reward, judgements = None, {}
        if self.task.has_reward:
            reward = self.task.sequence_rewards(batch.prompt_index, batch.response_ids, mask)
            scores["true_reward"] = float(reward.mean())
            scores["objective"] = scores["true_reward"] - self.beta * scores["kl_ref"]
        responses = [row[: int(n)] for row, n in zip(batch.response_ids.tolist(), mask.sum(1).tolist())]
        if judged:
            judgements = self.task.judge_responses(batch.prompt_index.tolist(), responses)
            if policy is self.reference and prefix_ids is None:
                self._reference_judged = judgements
            for name, values in judgements.items():
                scores[f"judge/{name}"] = sum(values) / len(values)
                scores[f"judge/{name}_se"] = _standard_error(values)
                scores[f"judge/{name}_win_rate"] = win_rate(values, self._reference_judged[name])
        if getattr(self.task, "tokenizer", None) is not None:  # text: keep the responses to judge again
            role = "reference" if policy is self.reference else "policy"
            role = role if prefix_ids is None else f"guided_{role}"
            self._samples[role] = self._rows(role, batch.prompt_index.tolist(), responses, reward, judgements)
        return scores

    @property
    def samples(self) -> list[dict]:
        """The held-out responses of the reference's evaluation, of the latest one of a
        policy and of the guided reference's (when scored), as text with their scores and the
        sampling settings: what a judge needs to score them again without training
        (``eval_completions.jsonl.gz``)."""
        return [row for role in ROLES for row in self._samples.get(role, [])]

    def _rows(self, role: str, index: list[int], responses: list[list[int]], reward, judgements) -> list[dict]:
        p = self.params
        sampling = {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "sampler": p.sampler}
        sampling |= {"horizon": self.task.horizon, "seed": self.seed, "samples": self.num_samples}
        rows = []
        for k, (i, response) in enumerate(zip(index, responses)):
            text = {"prompt": self.task.prompt_text(i), "completion": self.task.completion_text(response)}
            row = {"role": role, "draw": k, **text, "tokens": len(response)}
            if reward is not None:
                row["reward"] = float(reward[k])
            row |= {f"judge/{name}": values[k] for name, values in judgements.items()}
            rows.append(row | {"sampling": sampling})
        return rows

    def credit(self, batch, signals, advantages) -> dict:
        return {}
