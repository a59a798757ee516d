"""Toy training steps: tokenmdp's ``ppo``, ``inverse-q`` and ``dpo`` on their shipped
configs, each beside a hand-written step with the same maths and network, interleaved, as
ratios (tokenmdp ÷ hand-written).

    python bench/toy_step.py            # 1 thread, 5 rounds of 10 steps each

The hand-written steps are what a CleanRL-style script would do on the same problem, with
the same networks (GRU, hidden 96, V = 6, H = 5) and torch.optim.Adam; they share no code
with the recipes but the env and the policy class, and they log nothing:

- ``HandPPO`` (configs/ppo.toml): 64 responses sampled with the GRU's hidden state, the
  env's rewards (``TokenVectorEnv.play``), pi_old and pi_ref re-scored, KL-penalised token
  rewards (beta = 1), a separate GRU critic, GAE (gamma 1, lambda 0.5, whitened), 4 epochs
  x 4 minibatches of the clipped loss plus a clipped value loss (0.5), gradient norm 1.0,
  Adam at 1e-3. ``HandPPO(critic="head")`` puts the value head on the policy's GRU (one
  GRU pass per minibatch), beside tokenmdp's ``estimator.critic = "head"``.
- ``HandDistill`` (configs/inverse_q_guide.toml, ``inverse-q-distill``): 64 responses, the
  target pi_hat* = the reference with the guide token in front of the prompt, 4 x 4
  minibatches of the full-vocabulary reverse KL over the visited states, Adam at 3e-3.
- ``HandDPO`` (configs/dpo.toml): the same 8000 reward-labelled pairs from pi_ref, drawn
  once, read 3 times in shuffled order over 100 steps (240 pairs a step, minibatches of
  64): the sigmoid loss at beta 7 on sequence log-ratios, Adam at 1e-3. tokenmdp's step
  also samples a 64-response rollout (its env tokens and its credit scoring against A*);
  the hand-written step does not, so its ratio includes that.

The tokenmdp and hand-written steps alternate step by step. The table also gives the time
in the minibatch updates alone (tokenmdp's ``updater.update``, the hand-written
``update``): forward and backward, clipping and Adam, the floor that any implementation of
these maths with nn.GRU and torch.optim.Adam pays; the rest of a step is sampling and
scoring.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "ppo": ("ppo.toml", []),
    "ppo, critic = head": ("ppo.toml", ["estimator.critic=head"]),
    "inverse-q (distill)": ("inverse_q_guide.toml", []),
    "dpo": ("dpo.toml", []),
}


def tokenmdp_trainer(name: str, out: Path):
    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    file, extra = CONFIGS[name]
    overrides = ["train.progress=false", f"run.dir={out}", "run.overwrite=true", "train.eval_every=100000", *extra]
    trainer = Trainer(load_config(ROOT / "configs" / file, overrides))
    trainer.build_models()
    updater, clock = trainer.composition.updater, Clock()
    updater.update = clock.timing(updater.update)  # the trainer looks the method up on the instance
    step = iter(range(1, 10**9))
    return (lambda: trainer.train_step(next(step))), clock


class Clock:
    """Seconds spent in a function (the updater's update, a hand-written step's updates)."""

    def __init__(self):
        self.seconds = 0.0

    def timing(self, fn):
        def timed(*args):
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


class HandLoop:
    """What every hand-written step shares: the env, a GRU policy and a frozen copy."""

    def __init__(self, task, lr: float, seed: int = 0, batch: int = 64):
        from tokenmdp.mdp.env import TokenVectorEnv
        from tokenmdp.policies import GRUPolicy

        self.task = task
        self.env = TokenVectorEnv(task, num_envs=batch, autoreset_mode="Disabled")
        torch.manual_seed(seed)
        self.policy = GRUPolicy(task.input_vocab_size, task.vocab_size, hidden=96)
        self.reference = GRUPolicy(task.input_vocab_size, task.vocab_size, hidden=96).requires_grad_(False)
        self.reference.load_state_dict(self.policy.state_dict())
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.lr = lr
        self.clock = Clock()
        self.update = self.clock.timing(self.update)

    def step(self):
        self.update(*self.collect())

    def optimizer(self, *modules):
        self.params = [p for m in modules for p in m.parameters()]
        self.adam = torch.optim.Adam(self.params, lr=self.lr)

    def adam_step(self, loss):
        self.adam.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.adam.step()

    @torch.no_grad()
    def sample(self):
        self.seed += 1
        obs, _ = self.env.reset(seed=self.seed)
        prompts = obs["prompt"]
        logits, h = self.policy.start(prompts)
        actions = []
        for t in range(self.task.horizon):
            a = torch.multinomial(torch.softmax(logits, -1), 1, generator=self.generator).squeeze(1)
            actions.append(a)
            if t + 1 < self.task.horizon:
                logits, h = self.policy.advance(h, a)
        actions = torch.stack(actions, 1)
        return prompts, actions

    @staticmethod
    def response_logits(model, prompts, actions):
        ids = torch.cat([prompts, actions], 1)
        start = prompts.shape[1] - 1
        return model(ids)[:, start : start + actions.shape[1]]

    def logprobs(self, model, prompts, actions):
        logits = self.response_logits(model, prompts, actions)
        return torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1), logits

    def minibatches(self, n: int, epochs: int = 4, count: int = 4):
        for _ in range(epochs):
            yield from torch.randperm(n, generator=self.generator).chunk(count)


class HandPPO(HandLoop):
    """One PPO step written out by hand (see the module docstring)."""

    def __init__(self, critic: str = "separate", seed: int = 0):
        from tokenmdp.policies import GRUPolicy
        from tokenmdp_envs import PatternTask

        super().__init__(PatternTask(vocab_size=6, horizon=5, seed=0), lr=1e-3, seed=seed)
        self.shared = critic == "head"
        if self.shared:
            self.critic = torch.nn.Linear(96, 1)
        else:
            self.critic = GRUPolicy(self.task.input_vocab_size, 1, hidden=96)
        self.optimizer(self.policy, self.critic)

    def scores(self, prompts, actions):
        """Policy log-probs and values at the response positions, from one GRU pass when shared."""
        ids = torch.cat([prompts, actions], 1)
        positions = slice(prompts.shape[1] - 1, ids.shape[1] - 1)
        if self.shared:
            hidden = self.policy.hidden_states(ids)[:, positions]
            logits, values = self.policy.head(hidden), self.critic(hidden)[..., 0]
        else:
            logits, values = self.policy(ids)[:, positions], self.critic(ids)[:, positions, 0]
        return torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1), values

    def collect(self):
        prompts, actions = self.sample()
        rewards = self.env.play(actions)
        with torch.no_grad():
            old, values = self.scores(prompts, actions)
            ref, _ = self.logprobs(self.reference, prompts, actions)
            token_rewards = rewards - (old - ref)
            advantages, last = torch.zeros_like(values), torch.zeros(values.shape[0])
            for t in reversed(range(values.shape[1])):
                next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros(values.shape[0])
                delta = token_rewards[:, t] + next_value - values[:, t]
                last = delta + 0.5 * last
                advantages[:, t] = last
            returns = advantages + values
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        return prompts, actions, old, values, advantages, returns

    def update(self, prompts, actions, old, values, advantages, returns):
        for rows in self.minibatches(prompts.shape[0]):
            logp, v = self.scores(prompts[rows], actions[rows])
            ratio = (logp - old[rows]).exp()
            adv = advantages[rows]
            policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
            clipped = values[rows] + (v - values[rows]).clamp(-0.2, 0.2)
            value_loss = torch.max(
                F.mse_loss(v, returns[rows], reduction="none"), F.mse_loss(clipped, returns[rows], reduction="none")
            ).mean()
            self.adam_step(policy_loss + 0.5 * value_loss)


class HandDistill(HandLoop):
    """One inverse-q-distill step written out by hand (see the module docstring)."""

    def __init__(self, seed: int = 0):
        from tokenmdp_envs import SumThresholdTask

        super().__init__(SumThresholdTask(vocab_size=6, horizon=5, seed=0), lr=3e-3, seed=seed)
        self.optimizer(self.policy)

    def collect(self):
        prompts, actions = self.sample()
        with torch.no_grad():
            guide = torch.full((prompts.shape[0], 1), self.task.guide_token, dtype=prompts.dtype)
            guided = self.response_logits(self.reference, torch.cat([guide, prompts], 1), actions)
            return prompts, actions, torch.log_softmax(guided, -1)

    def update(self, prompts, actions, target):
        for rows in self.minibatches(prompts.shape[0]):
            logp = torch.log_softmax(self.response_logits(self.policy, prompts[rows], actions[rows]), -1)
            self.adam_step((logp.exp() * (logp - target[rows])).sum(-1).mean())


class HandDPO(HandLoop):
    """One offline DPO step written out by hand (see the module docstring)."""

    def __init__(self, seed: int = 0, num_pairs: int = 8000, epochs: int = 3, steps: int = 100):
        from tokenmdp.training.preferences import sample_pairs
        from tokenmdp_envs import PatternTask

        super().__init__(PatternTask(vocab_size=6, horizon=5, seed=0), lr=1e-3, seed=seed)
        self.optimizer(self.policy)
        pairs, _ = sample_pairs(self.reference, self.task, num_pairs, torch.Generator().manual_seed(seed))
        responses = pairs.responses()
        self.prompts, self.responses, self.mask = responses.prompt_ids, responses.response_ids, responses.response_mask
        self.num_pairs = num_pairs
        order = torch.cat([torch.randperm(num_pairs, generator=self.generator) for _ in range(epochs)])
        self.slices = order.chunk(steps)
        self.k = 0

    def sequence_logratio(self, rows):
        ids = torch.cat([rows, rows + self.num_pairs])  # chosen rows, then their rejected
        prompts, actions, mask = self.prompts[ids], self.responses[ids], self.mask[ids]
        logp, _ = self.logprobs(self.policy, prompts, actions)
        with torch.no_grad():
            ref, _ = self.logprobs(self.reference, prompts, actions)
        ratio = ((logp - ref) * mask).sum(-1)
        return ratio[: len(rows)], ratio[len(rows) :]

    def collect(self):
        self.k += 1
        return (self.slices[(self.k - 1) % len(self.slices)],)

    def update(self, pairs):
        for rows in pairs.split(64):
            chosen, rejected = self.sequence_logratio(rows)
            self.adam_step(-F.logsigmoid(7.0 * (chosen - rejected)).mean())


HAND = {
    "ppo": lambda: HandPPO(),
    "ppo, critic = head": lambda: HandPPO(critic="head"),
    "inverse-q (distill)": HandDistill,
    "dpo": HandDPO,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round, variant and side")
    parser.add_argument("--only", action="append", choices=list(CONFIGS), help="these steps only (repeatable)")
    args = parser.parse_args()
    names = args.only or list(CONFIGS)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sides = {}
        for name in names:
            hand = HAND[name]()
            sides[name, "tokenmdp"] = tokenmdp_trainer(name, Path(tmp) / name.replace(" ", ""))
            sides[name, "hand"] = hand.step, hand.clock
        for step, clock in sides.values():  # warm-up
            step()
            clock.seconds = 0.0
        times: dict[tuple[str, str], list[float]] = {key: [] for key in sides}
        for _ in range(args.rounds):
            for name in names:
                for _ in range(args.steps):  # tokenmdp and hand-written, step by step
                    for side in ("tokenmdp", "hand"):
                        step, _ = sides[name, side]
                        started = time.perf_counter()
                        step()
                        times[name, side].append(time.perf_counter() - started)
    timed = args.rounds * args.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rounds} rounds x {args.steps} steps")
    print(
        "| step | tokenmdp s | hand-written s | tokenmdp / hand-written | updates only: tokenmdp s | hand-written s "
        "| ratio |\n|---|---|---|---|---|---|---|"
    )
    for name in names:
        ours, hand = statistics.median(times[name, "tokenmdp"]), statistics.median(times[name, "hand"])
        our_updates, hand_updates = (sides[name, side][1].seconds / timed for side in ("tokenmdp", "hand"))
        print(
            f"| {name} | {ours:.4f} | {hand:.4f} | {ours / hand:.2f} | {our_updates:.4f} | {hand_updates:.4f} "
            f"| {our_updates / hand_updates:.2f} |"
        )
    print(
        "\nmedian seconds per step; 'updates only' is the mean time in the minibatch updates (the updater's "
        "update(); the hand-written loop's update()), the floor of these maths with nn.GRU and Adam"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
