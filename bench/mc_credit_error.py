"""The Monte-Carlo credit estimate's error against the exact values on a toy task, for two K.

    python bench/mc_credit_error.py                       # Pattern, vocab 3, horizon 4, EOS 0, beta 0.5
    python bench/mc_credit_error.py --env SumThreshold --k 16 64 256

For each policy (pi*, one half-way from pi_ref to pi* in log-space, pi_ref) it samples
``--responses`` responses, estimates ``A(s_t, a_t)`` on every token with K continuations
per prefix (``tokenmdp.training.mc_credit.monte_carlo_credit``) and prints, over all those
tokens, the RMSE against the exact ``A^pi`` (the solver's ``A*`` at pi*), the mean standard
error, the share of tokens within 3 standard errors, the tokens sampled and the time.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)

import argparse  # noqa: E402
import time  # noqa: E402

import attrs  # noqa: E402

from tokenmdp.mdp.solver import OptimalPolicy, solve  # noqa: E402
from tokenmdp.plugin.batch import RolloutBatch  # noqa: E402
from tokenmdp.policies import TaskBasePolicy  # noqa: E402
from tokenmdp.training.mc_credit import monte_carlo_credit, needed_tokens  # noqa: E402
from tokenmdp.training.rollout import generate  # noqa: E402
from tokenmdp_envs import PatternTask, SumThresholdTask  # noqa: E402

TASKS = {"Pattern": PatternTask, "SumThreshold": SumThresholdTask}


def exact_advantages(solution, logp, beta):
    """``t -> A^pi = Q^pi - V^pi`` at depth ``t`` of the policy with tree log-probs ``logp``
    (``Solution.policy_values``)."""
    q, v = solution.policy_values(logp, beta)
    return lambda t: q[t] - v[t][..., None]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=sorted(TASKS), default="Pattern")
    parser.add_argument("--vocab", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--responses", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    task = TASKS[args.env](vocab_size=args.vocab, horizon=args.horizon, eos_token=0, seed=0)
    reference = TaskBasePolicy(task)
    solution = solve(task, reference, args.beta)
    halfway = [torch.log_softmax((r + o) / 2, -1) for r, o in zip(solution.ref_logp, solution.opt_logp)]
    policies = {"pi*": solution.opt_logp, "half-way": halfway, "pi_ref": solution.ref_logp}
    print(
        f"{args.env}: vocab {args.vocab}, horizon {args.horizon}, EOS 0, beta {args.beta}, "
        f"{args.responses} responses per policy (seed {args.seed})"
    )
    print(
        f"{'policy':<9} {'truth':<6} {'K':>4} {'tokens':>6} {'RMSE':>9} {'stderr':>9} "
        f"{'|e|<3se':>8} {'sampled':>9} {'time':>6}"
    )
    for name, logp in policies.items():
        policy = OptimalPolicy(attrs.evolve(solution, opt_logp=logp))
        index = torch.arange(args.responses) % task.prompts.shape[0]
        prompts = task.prompts[index]
        generator = torch.Generator().manual_seed(args.seed)
        response, mask = generate(policy, prompts, task.horizon, task.eos_token, generator)
        batch = RolloutBatch(prompts, torch.ones_like(prompts), response, mask, torch.zeros(mask.shape), index)
        truth = solution.along_responses(exact_advantages(solution, logp, args.beta), index, response, mask)
        real = mask > 0
        for k in args.k:
            start = time.perf_counter()
            mc = monte_carlo_credit(
                policy, reference, task, batch, args.beta, k, torch.Generator().manual_seed(args.seed + 1)
            )
            seconds = time.perf_counter() - start
            error, se = (mc.advantages - truth)[real], mc.stderr[real]
            within = float((error.abs() <= 3 * se + 1e-6).float().mean())
            bound = sum(needed_tokens(batch, task.horizon, k))
            print(
                f"{name:<9} {'A*' if name == 'pi*' else 'A^pi':<6} {k:>4} {int(real.sum()):>6} "
                f"{float(error.pow(2).mean().sqrt()):>9.2e} {float(se.mean()):>9.2e} {within:>8.3f} "
                f"{mc.sampled_tokens:>9,} {seconds:>5.2f}s   (budget bound {bound:,})"
            )


if __name__ == "__main__":
    main()
