"""Each means of docs/performance.md measured on its own: tokenmdp's GRPO step of
bench/vs_trl.py with everything on, then with one means switched off at a time, and
with all of them off (the step as it was before them), interleaved over rounds
(each round starting at another variant, so none always runs first).

    python bench/step_means.py --threads 1                 # tiny GPT-2
    python bench/step_means.py --threads 2 --model gemma   # Gemma-3 270M + LoRA r = 16

``--only TEXT`` (repeatable) keeps "all on" and the variants whose name holds TEXT, e.g.
``--only chunked`` for the chunked output layer alone. The means that are not config keys
(:data:`SWITCHES`) are switched off by patching the code they live in; the options that
are off by default (:data:`OPTIONS`: fused and foreach Adam, ``train.release_memory``) are
measured switched on ("with ..." rows: < 1 means the option saves time).

Every response runs to the horizon (``env.stop_at_eos = false``), so that every variant
does the same work. Prints each variant's median step time and its ratio to the all-on step (> 1: that means
saves time). Also times the finiteness check over the policy's parameters, the old way
(``isfinite(p).all()`` per tensor, every parameter) against the new one (one float64
sum per trained tensor, batched).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vs_trl import SHAPES, bench_arguments, bench_setup, tokenmdp_step_times  # noqa: E402

MEANS = {
    "tokenmdp's GPT-2 forward and decoder": "policy.fast_path=false",
    "inverse-CDF sampler": "train.sampler=multinomial",
    "no reference forward when unread": "train.log_kl=true",
    "log-probs from the sampling pass": "train.logprobs_from=rescore",
    "the chunked output layer": "train.logit_chunk=0",
}


@contextlib.contextmanager
def _patched(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _linear_for_few_rows():
    from tokenmdp.policies.hf import OutputLayer

    return _patched(OutputLayer, "FEW_ROWS", range(0))


def _logits_with_hidden_states():
    from tokenmdp.policies import hf

    return _patched(hf, "_none_kept", lambda input_ids: 1)


def _prompt_read_per_row():
    from tokenmdp.policies.hf import HFCausalLMPolicy

    return _patched(HFCausalLMPolicy, "share_prompt", False)


def _gated_activation_kept():
    from tokenmdp.policies.hf import HFCausalLMPolicy

    return _patched(HFCausalLMPolicy, "recompute_gated_activations", False)


def _play_step_by_step():
    """The env played one ``step`` per token, as it was, instead of all columns at once."""
    from tokenmdp.mdp.env import TokenVectorEnv

    return _patched(TokenVectorEnv, "_play_at_once", lambda self, actions: False)


def _onehot_minus_p_pass():
    """The frozen output layer's taken-token gradient as it was: ``onehot - p`` made as a
    ``[chunk, vocab]`` tensor, then carried back through the layer."""
    from tokenmdp.plugin import chunked

    def taken(logp, p, targets, layer):
        onehot_minus_p = -p
        onehot_minus_p.scatter_add_(-1, targets[:, None], torch.ones_like(p[:, :1]))
        return logp.gather(-1, targets[:, None]).squeeze(-1), layer.back(onehot_minus_p)

    return _patched(chunked, "_taken", taken)


def _argmax_every_draw():
    """The inverse-CDF draw's fallback token (an argmax over the vocabulary) computed for
    every draw, as it was, instead of only for a draw that runs past the end."""
    from tokenmdp.training import rollout

    draw = rollout._draw

    def old(probs, generator, sampler="multinomial"):
        if sampler == "inverse-cdf":
            probs.argmax(-1)
        return draw(probs, generator, sampler)

    return _patched(rollout, "_draw", old)


def _one_cumulative_sum():
    """The inverse-CDF draw through one float64 cumulative sum over the whole row at every
    vocabulary size, as it was (tokenmdp/training/inverse_cdf.py)."""
    from tokenmdp.training import inverse_cdf

    return _patched(inverse_cdf, "TWO_LEVELS_FROM", 1 << 62)


#: Options that are off by default (they change the numbers at float rounding), measured
#: switched on: "with ..." variants.
OPTIONS = {
    "fused Adam (updater.adam = fused)": "updater.adam=fused",
    "foreach Adam (updater.adam = foreach)": "updater.adam=foreach",
    "freed memory released (train.release_memory = true)": "train.release_memory=true",
}


#: Means that are not config keys (they have no reason to be switched off), undone for the
#: bench by patching the code they live in.
SWITCHES = {
    "the decoding output layer as W @ x^T": _linear_for_few_rows,
    "no logits in hidden-state forwards": _logits_with_hidden_states,
    "a group's prompt read once in training forwards": _prompt_read_per_row,
    "the taken tokens' gradient as W[y] - p @ W": _onehot_minus_p_pass,
    "the sampler's argmax only when needed": _argmax_every_draw,
    "the two-level inverse-CDF search": _one_cumulative_sum,
    "gated MLPs' activation recomputed in the backward": _gated_activation_kept,
    "the env played in one go": _play_step_by_step,
}


def finiteness_check_times(model_dir: Path, lora: dict | None, repeats: int = 5) -> tuple[float, float]:
    from tokenmdp.plugin.ops import check_finite
    from tokenmdp.policies.hf import HFCausalLMPolicy

    policy = HFCausalLMPolicy.from_pretrained(model_dir, lora=lora)
    params = dict(policy.named_parameters())
    trained = {k: p for k, p in params.items() if p.requires_grad}

    def old():
        for p in params.values():
            assert bool(torch.isfinite(p).all())

    def new():
        check_finite(trained, "the policy", 0)

    times = {old: [], new: []}
    for _ in range(repeats):
        for f in (old, new):
            started = time.perf_counter()
            f()
            times[f].append(time.perf_counter() - started)
    return statistics.median(times[old]), statistics.median(times[new])


def adam_step_times(model_dir: Path, lora: dict | None, repeats: int = 20) -> dict[str, float]:
    """Median seconds of one Adam step over the policy's trained parameters (random
    gradients), for each ``updater.adam``, interleaved."""
    from tokenmdp.plugin.updaters import ADAM_IMPLEMENTATIONS
    from tokenmdp.policies.hf import HFCausalLMPolicy

    policy = HFCausalLMPolicy.from_pretrained(model_dir, lora=lora)
    trained = [p for p in policy.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {how: torch.optim.Adam(trained, lr=1e-6, **kw) for how, kw in ADAM_IMPLEMENTATIONS.items()}
    times = {how: [] for how in optimizers}
    for _ in range(repeats):
        for how, optimizer in optimizers.items():
            started = time.perf_counter()
            optimizer.step()
            times[how].append(time.perf_counter() - started)
    return {how: statistics.median(t) for how, t in times.items()}


def main() -> int:
    args = bench_arguments(__doc__.splitlines()[0], rounds=6)
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.model]
    variants = {
        "all on": (),
        **{f"without {k}": (v,) for k, v in MEANS.items()},
        **{f"without {k}": (v,) for k, v in SWITCHES.items()},
        **{f"with {k}": (v,) for k, v in OPTIONS.items()},
        "all off": (*MEANS.values(), *SWITCHES.values()),
    }
    if args.only:  # "all on" and the named means only (substrings of their names)
        variants = {k: v for k, v in variants.items() if k == "all on" or any(o in k for o in args.only)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), model {args.model}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files, model_dir = bench_setup(args, tmp)
        if model_dir is None:
            return 2
        times = {name: [] for name in variants}
        total = args.warmup + args.steps
        for r in range(args.rounds):
            names = list(variants)
            for name in names[r % len(names) :] + names[: r % len(names)]:  # each round starts elsewhere
                extra = [v for v in variants[name] if isinstance(v, str)]
                run = tmp / f"{r}-{len(times[name])}"
                # every response runs to the horizon: the sampler changes the draws, and with
                # them where responses would stop, so EOS would make the work differ
                same_work = ("env.stop_at_eos=false", *extra)
                with contextlib.ExitStack() as stack:
                    for switch in variants[name]:
                        if not isinstance(switch, str):
                            stack.enter_context(switch())
                    step_times = tokenmdp_step_times(model_dir, files["prompts"], shape, total, run, same_work)
                times[name] += step_times[args.warmup :]
            print(f"round {r + 1} done", flush=True)
        base = statistics.median(times["all on"])
        print("| variant | median s/step | vs all on |\n|---|---|---|")
        for name in variants:
            median = statistics.median(times[name])
            print(f"| {name} | {median:.3f} | {median / base:.2f} |")
        adam = adam_step_times(model_dir, shape["lora"])
        shown = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in adam.items())
        print(f"one Adam step over the trained parameters: {shown}")
        old, new = finiteness_check_times(model_dir, shape["lora"])
        print(
            f"finiteness check of the policy after an update: {old * 1e3:.1f} ms (every parameter, isfinite) "
            f"-> {new * 1e3:.1f} ms (trained parameters, batched float64 sums)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
