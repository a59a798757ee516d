"""A learned reward model for PPO (``[estimator] reward = "learned"``, recipe ``ppo-rm``).

The RLHF pipeline of Ouyang et al. (2022), step 2, on the toy MDP:

    pairs      (x, y_w, y_l): responses sampled from pi_ref, labelled by the task's
               reward (the oracle annotator; ties dropped), or read from a JSONL file
    r_phi(x,y) a network of the policy's kind with one output, read in the state after
               the last token of y
    loss       -log sigmoid(r_phi(x, y_w) - r_phi(x, y_l))   (Bradley-Terry)

It is trained once (``PPORewards.fit_reward_model``), when the first rollout is rewarded,
before any policy update (a resumed run restores it from the checkpoint instead), and
then frozen: PPO's token reward is ``r_phi(x, y)`` on the last real token, minus the KL
penalty on every token, and the environment's reward is never read in training (only by
the exact evaluation).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmdp import PairBatch, RolloutBatch, module_device


def sequence_scores(model, batch: RolloutBatch) -> Tensor:
    """``r_phi(x, y)`` per response: the model's output in the state after the last real
    token. Output ``t`` of a token network is computed from the tokens before ``t``, so the
    batch is read one position further, with an unused token in that slot."""
    length = batch.response_mask.sum(1).long()
    ids = torch.nn.functional.pad(batch.response_ids, (0, 1))
    after = torch.zeros_like(ids, dtype=batch.response_mask.dtype).scatter_(1, length[:, None], 1)
    per_token = model(None, attrs.evolve(batch, response_ids=ids, response_mask=after))
    return per_token.gather(1, length[:, None]).squeeze(1)


def terminal_rewards(model, batch: RolloutBatch) -> Tensor:
    """``[B, T]`` token rewards: ``r_phi(x, y)`` on the last real token, 0 elsewhere."""
    mask = batch.response_mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    rewards.scatter_(1, last[:, None], sequence_scores(model, batch).float()[:, None])
    return rewards * mask


def pair_margins(model, pairs: PairBatch) -> Tensor:
    """``r_phi(x, y_w) - r_phi(x, y_l)`` for every pair (one forward pass over all 2N responses)."""
    scores = sequence_scores(model, pairs.responses().to(module_device(model)))
    return scores[: pairs.size] - scores[pairs.size :]


def train_reward_model(
    model, pairs: PairBatch, epochs: int, lr: float, batch_size: int, generator: torch.Generator, held_out: float = 0.1
) -> dict[str, float]:
    """Bradley-Terry fit on ``1 - held_out`` of the pairs; returns the last epoch's loss and the
    accuracy (fraction of pairs ranked as labelled) on the training and the held-out pairs."""
    order = torch.randperm(pairs.size, generator=generator)
    n_eval = int(held_out * pairs.size) if pairs.size >= 10 else 0
    eval_pairs, train_pairs = pairs.select(order[:n_eval]), pairs.select(order[n_eval:])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        total = 0.0
        for rows in torch.randperm(train_pairs.size, generator=generator).split(batch_size):
            loss = -F.logsigmoid(pair_margins(model, train_pairs.select(rows))).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        report = {
            "reward_model/loss": total / train_pairs.size,
            "reward_model/train_accuracy": float((pair_margins(model, train_pairs) > 0).float().mean()),
        }
        if n_eval:
            report["reward_model/heldout_accuracy"] = float((pair_margins(model, eval_pairs) > 0).float().mean())
    return report
