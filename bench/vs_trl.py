"""The same GRPO step in TRL and in tokenmdp, side by side, interleaved, as a throughput ratio.

    pip install "torch==2.13.0" -e ".[bench]"           # TRL, only for this bench
    python bench/vs_trl.py --threads 1                   # tiny GPT-2
    python bench/vs_trl.py --threads 2 --model gemma     # Gemma-3 270M + LoRA r = 16

Tiny GPT-2 (bench/real_lm.py: 2 layers, d=128, 4 heads, vocabulary 512, a WordLevel
tokenizer, 8-word prompts): 4 prompts x 8 completions of 32 tokens per step, one
optimizer step at lr 1e-5 per batch, no KL term, reward = the fraction of completion words
among the 64 target words (ids 4..67). TRL: ``GRPOTrainer`` (``use_vllm=False``,
``beta=0``, fp32, no gradient checkpointing). tokenmdp: ``grpo`` with
``train.samples_per_prompt = 8``, one epoch of one minibatch, ``estimator.kl_coef = 0``.

Gemma-3 270M (``models/gemma-3-270m``, LoRA r = 16, alpha 32, all linear layers): 1 prompt
x 8 completions of 16 tokens per step, lr 1e-3.

Each round trains TRL for ``--warmup + --steps`` steps and tokenmdp for as many, TRL
first in odd rounds and tokenmdp first in even ones; the first ``--warmup`` steps of each
are dropped. The figure is the median step time over
every round, and the ratio is tokenmdp's throughput over TRL's (TRL's time / tokenmdp's).
It also prints each round's own ratio and the median of those (robust to one slow round),
and a warning when the rounds disagree by more than 30% (another job shared the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from real_lm import TARGET, build, target_fraction, text_overrides  # noqa: E402


def bench_setup(args: argparse.Namespace, tmp: Path) -> tuple[dict, Path | None]:
    """The prompt file and tiny GPT-2 written under ``tmp``, and the model folder of
    ``--model`` (that GPT-2, or Gemma's folder); None with a message when Gemma has not
    been fetched."""
    files = build(tmp / "setup")
    if args.model == "tiny":
        return files, files["model"]
    if not (args.gemma_dir / "config.json").is_file():
        print(f"no model in {args.gemma_dir}: tokenmdp models fetch-gemma {args.gemma_dir}")
        return files, None
    return files, args.gemma_dir


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL's reward signature: one call per batch."""
    return [target_fraction(p, c) for p, c in zip(prompts, completions)]


SHAPES = {
    "tiny": dict(prompts=4, generations=8, tokens=32, lr=1e-5, lora=None),
    "gemma": dict(prompts=1, generations=8, tokens=16, lr=1e-3, lora={"r": 16, "alpha": 32}),
}


def trl_step_times(
    model_dir: Path,
    prompts_file: Path,
    shape: dict,
    steps: int,
    out: Path,
    callbacks: tuple = (),
    generation_kwargs: dict | None = None,
    gradient_checkpointing: bool = False,
) -> list[float]:
    """TRL's GRPOTrainer on ``shape``: each step's seconds. ``callbacks``: more
    ``TrainerCallback``s (bench/logits_memory.py measures memory with one);
    ``generation_kwargs``: GRPOConfig's (e.g. ``min_new_tokens``); ``gradient_checkpointing``:
    GRPOConfig's (its default is true; this bench's false, as tokenmdp's)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    data = Dataset.from_dict({"prompt": prompts[: max(64, steps * shape["prompts"])]})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    config = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=shape["prompts"] * shape["generations"],
        num_generations=shape["generations"],
        max_completion_length=shape["tokens"],
        learning_rate=shape["lr"],
        beta=0.0,
        num_iterations=1,
        max_steps=steps,
        use_vllm=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        logging_steps=10**9,
        lr_scheduler_type="constant",
        warmup_steps=0,
        temperature=1.0,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        generation_kwargs=generation_kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if shape["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=shape["lora"]["r"], lora_alpha=shape["lora"]["alpha"], target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Timer(), *callbacks],
    )
    trainer.train()
    return times


def tokenmdp_step_times(
    model_dir: Path,
    prompts_file: Path,
    shape: dict,
    steps: int,
    out: Path,
    extra: tuple[str, ...] = (),
    around_step=contextlib.nullcontext,
) -> list[float]:
    """tokenmdp's grpo on ``shape``: each step's seconds; ``around_step(step)``: a context
    each step runs in (bench/logits_memory.py measures memory with one)."""
    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    files = {"model": model_dir, "prompts": prompts_file}
    lora = [f"policy.lora={{r = {shape['lora']['r']}, alpha = {shape['lora']['alpha']}}}"] if shape["lora"] else []
    overrides = [
        *text_overrides(files, out, horizon=shape["tokens"]),
        "env.stop_at_eos=true",
        "algorithm.name=grpo",
        f"train.batch_size={shape['prompts'] * shape['generations']}",
        f"train.samples_per_prompt={shape['generations']}",
        f"train.steps={steps}",
        "updater.epochs=1",
        "updater.minibatches=1",
        f"updater.lr={shape['lr']}",
        "updater.anneal_lr=false",
        "estimator.kl_coef=0",
        "train.log_kl=false",  # TRL with beta = 0 computes no KL and loads no reference either
        "train.device=cpu",
        "run.overwrite=true",
        *lora,
        *extra,
    ]
    trainer = Trainer(load_config(None, overrides))
    trainer.build_models()
    times = []
    for step in range(1, steps + 1):
        with around_step(step):
            started = time.perf_counter()
            trainer.train_step(step)
            times.append(time.perf_counter() - started)
    return times


def spread_warning(ratios: list[float], limit: float = 0.30) -> str:
    """One line on whether the rounds agree: their largest ratio over their smallest, and a
    warning when that exceeds ``1 + limit`` (the machine's mood moved between rounds)."""
    spread = max(ratios) / min(ratios) - 1
    if spread > limit:
        return (
            f"WARNING: the rounds disagree by {spread:.0%} (more than {limit:.0%}): another job shared the "
            "machine; rerun on a quiet one before quoting a figure"
        )
    return f"the rounds agree within {spread:.0%}"


def bench_arguments(description: str, rounds: int) -> argparse.Namespace:
    """The command line both step benches take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and variant")
    parser.add_argument("--gemma-dir", type=Path, default=ROOT / "models" / "gemma-3-270m")
    parser.add_argument("--only", action="append", default=[], help="bench/step_means.py: these variants only")
    return parser.parse_args()


def main() -> int:
    args = bench_arguments(__doc__.splitlines()[0], rounds=3)
    try:
        import trl
    except ImportError:
        print('TRL is not installed: pip install "torch==2.13.0" -e ".[bench]"')
        return 2
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.model]
    print(
        f"torch {torch.__version__}, trl {trl.__version__}, {torch.get_num_threads()} thread(s), model {args.model}: "
        f"{shape['prompts']} prompts x {shape['generations']} completions x {shape['tokens']} tokens, "
        f"lr {shape['lr']}, {args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed) steps each"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files, model_dir = bench_setup(args, tmp)
        if model_dir is None:
            return 2
        assert len(TARGET) == 64
        trl_times, ours, ratios = [], [], []
        total = args.warmup + args.steps
        for r in range(args.rounds):
            run = {
                "trl": lambda r=r: trl_step_times(model_dir, files["prompts"], shape, total, tmp / f"trl{r}"),
                "ours": lambda r=r: tokenmdp_step_times(model_dir, files["prompts"], shape, total, tmp / f"ours{r}"),
            }
            # each framework first in every other round: neither always meets the machine second
            got = {name: run[name]()[args.warmup :] for name in (("trl", "ours") if r % 2 == 0 else ("ours", "trl"))}
            t, o = got["trl"], got["ours"]
            trl_times += t
            ours += o
            ratios.append(statistics.median(t) / statistics.median(o))
            print(
                f"round {r + 1}: TRL median {statistics.median(t):.3f} s/step, "
                f"tokenmdp {statistics.median(o):.3f} s/step, ratio {ratios[-1]:.2f}",
                flush=True,
            )
        trl_median, our_median = statistics.median(trl_times), statistics.median(ours)
        print(
            f"| framework | median s/step | throughput vs TRL |\n|---|---|---|\n| TRL GRPOTrainer | "
            f"{trl_median:.3f} | 1.00 |\n| tokenmdp grpo | {our_median:.3f} | {trl_median / our_median:.2f} |"
        )
        listed = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"per-round ratios {listed}; median of them {statistics.median(ratios):.2f}")
        print(spread_warning(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
