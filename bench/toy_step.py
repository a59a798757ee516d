"""Toy training steps: tokenmdp's ``ppo``, ``inverse-q`` and ``dpo`` on their shipped
configs, beside a hand-written PPO step of the same shape, interleaved, as ratios.

    python bench/toy_step.py            # 1 thread, 5 rounds of 10 steps each

The hand-written step (``HandPPO``) is what a CleanRL-style script would do on the same
problem: the same GRU policy and separate GRU critic (hidden 96, V = 6, H = 5), 64
responses sampled with the GRU's hidden state, the env's rewards (``TokenVectorEnv.play``),
KL-penalised token rewards against the frozen reference (beta = 1), GAE (gamma 1,
lambda 0.5, whitened), 4 epochs x 4 minibatches of the clipped loss plus a clipped value
loss (0.5), gradient norm 1.0, Adam at 1e-3. It is a speed reference, not a test: it
shares no code with the recipes but the env and the policy class.
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
CONFIGS = {"ppo": "ppo.toml", "inverse-q": "inverse_q_guide.toml", "dpo": "dpo.toml"}


def tokenmdp_trainer(name: str, out: Path):
    from tokenmdp.config import load_config
    from tokenmdp.train.trainer import Trainer

    overrides = ["train.progress=false", f"run.dir={out}", "run.overwrite=true", "train.eval_every=100000"]
    trainer = Trainer(load_config(ROOT / "configs" / CONFIGS[name], overrides))
    trainer.build_models()
    step = iter(range(1, 10**9))
    return lambda: trainer.train_step(next(step))


class HandPPO:
    """One PPO step written out by hand (see the module docstring)."""

    def __init__(self, seed: int = 0):
        from tokenmdp.mdp.env import TokenVectorEnv
        from tokenmdp.policies import GRUPolicy
        from tokenmdp_envs import PatternTask

        task = PatternTask(vocab_size=6, horizon=5, seed=0)
        self.env = TokenVectorEnv(task, num_envs=64, autoreset_mode="Disabled")
        torch.manual_seed(seed)
        self.policy = GRUPolicy(task.input_vocab_size, task.vocab_size, hidden=96)
        self.reference = GRUPolicy(task.input_vocab_size, task.vocab_size, hidden=96).requires_grad_(False)
        self.reference.load_state_dict(self.policy.state_dict())
        self.critic = GRUPolicy(task.input_vocab_size, 1, hidden=96)
        params = [*self.policy.parameters(), *self.critic.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=1e-3)
        self.params = params
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed

    @torch.no_grad()
    def sample(self):
        self.seed += 1
        obs, _ = self.env.reset(seed=self.seed)
        prompts = obs["prompt"]
        logits, h = self.policy.start(prompts)
        actions = []
        for t in range(self.env.task.horizon):
            a = torch.multinomial(torch.softmax(logits, -1), 1, generator=self.generator).squeeze(1)
            actions.append(a)
            if t + 1 < self.env.task.horizon:
                logits, h = self.policy.advance(h, a)
        actions = torch.stack(actions, 1)
        rewards = self.env.play(actions)
        return prompts, actions, rewards

    def logprobs(self, model, prompts, actions):
        ids = torch.cat([prompts, actions], 1)
        logits = model(ids)[:, prompts.shape[1] - 1 : -1]
        return torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1), logits

    def step(self):
        prompts, actions, rewards = self.sample()
        with torch.no_grad():
            old, _ = self.logprobs(self.policy, prompts, actions)
            ref, _ = self.logprobs(self.reference, prompts, actions)
            token_rewards = rewards - (old - ref)
            values = self.critic(torch.cat([prompts, actions], 1))[:, prompts.shape[1] - 1 : -1, 0]
            advantages, last = torch.zeros_like(values), torch.zeros(values.shape[0])
            for t in reversed(range(values.shape[1])):
                next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros(values.shape[0])
                delta = token_rewards[:, t] + next_value - values[:, t]
                last = delta + 0.5 * last
                advantages[:, t] = last
            returns = advantages + values
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        n = prompts.shape[0]
        for _ in range(4):
            order = torch.randperm(n, generator=self.generator)
            for rows in order.chunk(4):
                logp, _ = self.logprobs(self.policy, prompts[rows], actions[rows])
                ratio = (logp - old[rows]).exp()
                adv = advantages[rows]
                policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
                ids = torch.cat([prompts[rows], actions[rows]], 1)
                v = self.critic(ids)[:, prompts.shape[1] - 1 : -1, 0]
                clipped = values[rows] + (v - values[rows]).clamp(-0.2, 0.2)
                value_loss = torch.max(
                    F.mse_loss(v, returns[rows], reduction="none"), F.mse_loss(clipped, returns[rows], reduction="none")
                ).mean()
                loss = policy_loss + 0.5 * value_loss
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.optimizer.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        steps = {name: tokenmdp_trainer(name, Path(tmp) / name) for name in CONFIGS}
        steps["hand-written ppo"] = HandPPO().step
        for step in steps.values():  # warm-up
            step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                for _ in range(args.steps):
                    started = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - started)
    hand = statistics.median(times["hand-written ppo"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rounds} rounds x {args.steps} steps")
    print("| step | median s | / hand-written ppo |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.4f} | {median / hand:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
