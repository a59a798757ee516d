"""Peak memory of one GRPO step: tokenmdp with the chunked output layer, without it, with
freed memory released, and TRL's GRPOTrainer (as it is, and with the same release), on the
same model and shape, each in a fresh process.

    pip install "torch==2.13.0" -e ".[bench]"            # TRL, only for this bench
    python bench/logits_memory.py --threads 2            # Gemma-3 270M + LoRA r = 16
    python bench/logits_memory.py --model tiny           # the tiny GPT-2 (vocabulary 512)

The shape is where a large vocabulary's logits matter: 2 prompts x 8 completions of 128
tokens (``--completions``, ``--tokens``), every completion exactly 128 tokens long in both
frameworks (tokenmdp ``env.stop_at_eos = false``, TRL ``min_new_tokens``), one optimizer
step per batch, no KL term (TRL ``beta = 0``; tokenmdp ``estimator.kl_coef = 0``,
``train.log_kl = false``), float32 weights, LoRA r = 16 on every linear layer (bench/vs_trl.py's
set-ups). Each variant runs 2 steps in its own process. A thread reads the process's
resident set size (``/proc/self/statm``) every 2 ms from just before the first step to the
end of the second; the figure is that peak above the resident size just before the first
step (the models loaded: what the steps themselves need, whatever the allocator keeps
between them), and the process's peak; the second step's seconds are printed too (one
step: an indication, not a speed figure).

The output layer's share of a step's peak is the peak with the whole logits minus the
peak without them: tokenmdp unchunked minus tokenmdp chunked (the same step otherwise).

Two more variants hand freed memory back to the system: tokenmdp with
``train.release_memory = true`` (tokenmdp/host_memory.py), and TRL with the same glibc
setting through its environment variable (``MALLOC_MMAP_THRESHOLD_=1048576``), so the
allocator's share is compared like for like; and both with gradient checkpointing (TRL's
``GRPOConfig`` default; ``train.gradient_checkpointing`` in tokenmdp). The ``-per-row``
variants read every row's prompt in the update (``HFCausalLMPolicy.share_prompt`` off:
what a group's shared prompt read once saves); the ``-stored`` variants keep gated MLPs'
activation for the backward as the library does (``HFCausalLMPolicy.recompute_gated_activations``
off: what recomputing it saves). ``--variants`` picks a subset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PAGE = os.sysconf("SC_PAGE_SIZE")
VARIANTS = (
    "tokenmdp-chunked",
    "tokenmdp-unchunked",
    "tokenmdp-released",
    "tokenmdp-per-row",
    "tokenmdp-released-per-row",
    "tokenmdp-stored",
    "tokenmdp-released-stored",
    "trl",
    "trl-released",
    "tokenmdp-checkpointed",
    "trl-checkpointed",
)
#: glibc's environment variable for the threshold ``train.release_memory`` sets (the same
#: setting, for TRL's process: what a TRL user would do for the same effect)
RELEASED_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """The peak resident size between :meth:`begin` and :meth:`end`, sampled every 2 ms."""

    def begin(self) -> None:
        self.start = self.peak = rss()
        self._running = True
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def end(self) -> dict[str, float]:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss())
        mib = 1 << 20
        return {"steps_mib": (self.peak - self.start) / mib, "peak_mib": self.peak / mib}


def child(args: argparse.Namespace) -> None:
    """One variant in this process: two steps, the second measured; prints a JSON line."""
    import torch
    from vs_trl import SHAPES, bench_setup, tokenmdp_step_times, trl_step_times

    torch.set_num_threads(args.threads)
    shape = {**SHAPES[args.model], "prompts": args.completions // 8, "generations": 8, "tokens": args.tokens}
    meter, measured = PeakMemory(), {}
    with tempfile.TemporaryDirectory() as tmp:
        files, model_dir = bench_setup(args, Path(tmp))
        if args.variant.startswith("trl"):
            from transformers import TrainerCallback

            class Meter(TrainerCallback):
                def on_step_begin(self, a, state, control, **kwargs):
                    if state.global_step == 0:  # the first step: the model is loaded
                        meter.begin()

                def on_step_end(self, a, state, control, **kwargs):
                    if state.global_step == 2:
                        measured.update(meter.end())

            times = trl_step_times(
                model_dir,
                files["prompts"],
                shape,
                2,
                Path(tmp) / "trl",
                callbacks=(Meter(),),
                generation_kwargs={"min_new_tokens": args.tokens},
                gradient_checkpointing=args.variant == "trl-checkpointed",
            )
        else:

            @contextlib.contextmanager
            def around(step):
                if step == 1:
                    meter.begin()
                yield
                if step == 2:
                    measured.update(meter.end())

            chunk = "train.logit_chunk=0" if args.variant == "tokenmdp-unchunked" else "train.logit_chunk=auto"
            release = f"train.release_memory={str(args.variant.startswith('tokenmdp-released')).lower()}"
            if args.variant.endswith("-per-row"):  # the update reads each row's prompt itself
                from tokenmdp.policies.hf import HFCausalLMPolicy

                HFCausalLMPolicy.share_prompt = False
            if args.variant.endswith("-stored"):  # gated MLPs keep their activation (the library's way)
                from tokenmdp.policies.hf import HFCausalLMPolicy

                HFCausalLMPolicy.recompute_gated_activations = False
            checkpointed = f"train.gradient_checkpointing={str(args.variant == 'tokenmdp-checkpointed').lower()}"
            extra = ("env.stop_at_eos=false", chunk, release, checkpointed)
            times = tokenmdp_step_times(
                model_dir, files["prompts"], shape, 2, Path(tmp) / "ours", extra, around_step=around
            )
    print(json.dumps({"variant": args.variant, **measured, "step_seconds": times[-1]}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gemma", "tiny"], default="gemma")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--completions", type=int, default=16, help="a multiple of 8 (8 per prompt)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--gemma-dir", type=Path, default=HERE.parent / "models" / "gemma-3-270m")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.variant:
        child(args)
        return 0
    print(
        f"model {args.model}, {args.completions} completions x {args.tokens} tokens, {args.threads} thread(s); "
        "each variant in a fresh process, both its steps measured"
    )
    results = {}
    for variant in args.variants:
        command = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--model",
            args.model,
            "--threads",
            str(args.threads),
        ]
        command += [
            "--completions",
            str(args.completions),
            "--tokens",
            str(args.tokens),
            "--gemma-dir",
            str(args.gemma_dir),
        ]
        env = {**os.environ, **(RELEASED_ENV if variant == "trl-released" else {})}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"{variant} failed:\n{done.stderr[-2000:]}")
            return 1
        results[variant] = json.loads(lines[-1])
        r = results[variant]
        steps, peak, seconds = r["steps_mib"], r["peak_mib"], r["step_seconds"]
        print(f"{variant:20s} steps' peak {steps:7.0f} MiB, process peak {peak:7.0f} MiB, step 2: {seconds:.1f} s")
    peak = {v: r["steps_mib"] for v, r in results.items()}
    for a, b in [
        ("tokenmdp-chunked", "trl"),
        ("tokenmdp-released", "trl"),
        ("tokenmdp-released", "trl-released"),
        ("tokenmdp-unchunked", "tokenmdp-chunked"),
        ("tokenmdp-chunked", "tokenmdp-per-row"),
        ("tokenmdp-released", "tokenmdp-released-per-row"),
        ("tokenmdp-chunked", "tokenmdp-stored"),
        ("tokenmdp-released", "tokenmdp-released-stored"),
        ("tokenmdp-checkpointed", "trl-checkpointed"),
    ]:
        if a in peak and b in peak:
            print(f"{a} / {b}, the steps' peak: {peak[a] / peak[b]:.2f} ({peak[a] - peak[b]:+.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
