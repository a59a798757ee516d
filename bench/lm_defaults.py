"""Issue 26, item 2: the README's real-LM GRPO command, as the README prints it, on a tiny
GPT-2 with dropout 0.1 and on Gemma-3 270M + LoRA; prints each run's curve (held-out
reward, mean response length, ``kl_ref``) and the run's warnings.

The command is read from README.md (the ``tokenmdp train --set env.id=tokenmdp/Text-v0``
block), so what runs is what the README says; only its placeholders are filled in
(MODEL_DIR, prompts.jsonl, held_out.jsonl, mypkg.rewards:score) and the length of the
measurement is added (``train.steps``, ``train.eval_every``, ``run.dir``, no progress bar).
Gemma adds ``policy.lora = {r = 16, alpha = 32}``.

    OMP_NUM_THREADS=2 python bench/lm_defaults.py tiny  --steps 30 --out runs/lm_defaults
    OMP_NUM_THREADS=2 python bench/lm_defaults.py gemma --steps 30 --out runs/lm_defaults

The reward is TRL's form (keywords only, ``score(completions, **kwargs)``): the tiny model's
is the fraction of its words among 64 target words (``bench/real_lm.py``; a random
initialisation scores about 64/508), Gemma's the sentiment lexicon's positive-minus-negative
word count (``tokenmdp.text.lexicon``). Prompts: the tiny model's 200 for training and 40
held out; Gemma's the repository's ``data/gemma_prompts_train.txt`` (35) and
``data/gemma_prompts_heldout.txt`` (12).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import real_lm  # noqa: E402

REWARDS = '''
from real_lm import target_fraction
from tokenmdp.text.lexicon import lexicon_score


def score(completions, **kwargs):
    """TRL's form: keywords only, one score per completion."""
    return [target_fraction("", c) for c in completions]


def sentiment(completions, **kwargs):
    return [lexicon_score("", c) for c in completions]
'''


def readme_command() -> list[str]:
    """The README's real-LM GRPO command, as tokens."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```bash\n(tokenmdp train --set env\.id=tokenmdp/Text-v0.*?)```", text, re.S)
    if match is None:
        raise SystemExit("README.md has no `tokenmdp train --set env.id=tokenmdp/Text-v0` block")
    return shlex.split(match.group(1).replace("\\\n", " "))


def write_prompts(path: Path, prompts: list[str]) -> None:
    with open(path, "w") as fh:
        for prompt in prompts:
            fh.write(json.dumps({"prompt": prompt}) + "\n")


def setup(which: str, work: Path) -> dict[str, str]:
    """The model folder, prompt files and reward module of one set-up under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "mypkg").mkdir(exist_ok=True)
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "mypkg" / "rewards.py").write_text(REWARDS)
    if which == "tiny":
        files = real_lm.build(work, n_prompts=240)
        lines = files["prompts"].read_text().splitlines()
        prompts = [json.loads(line)["prompt"] for line in lines]
        model, reward = str(files["model"]), "mypkg.rewards:score"
    else:
        model = str(ROOT / "models" / "gemma-3-270m")
        if not Path(model, "config.json").is_file():
            raise SystemExit(f"no Gemma at {model}: tokenmdp models fetch-gemma models/gemma-3-270m")
        # the repository's own split (35 and 12 prompts): disjoint, as held-out prompts must be
        train = [p for p in (ROOT / "data" / "gemma_prompts_train.txt").read_text().splitlines() if p.strip()]
        held = [p for p in (ROOT / "data" / "gemma_prompts_heldout.txt").read_text().splitlines() if p.strip()]
        write_prompts(work / "prompts.jsonl", train)
        write_prompts(work / "held_out.jsonl", held)
        return {"MODEL_DIR": model, "reward": "mypkg.rewards:sentiment"}
    write_prompts(work / "prompts.jsonl", prompts[:200])
    write_prompts(work / "held_out.jsonl", prompts[200:240])
    return {"MODEL_DIR": model, "reward": reward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["tiny", "gemma"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", default="runs/lm_defaults")
    parser.add_argument("--set", action="append", default=[], help="extra overrides (for sweeps; not the README's)")
    args = parser.parse_args()
    work = Path(args.out).absolute() / args.which
    place = setup(args.which, work)
    command = []
    for token in readme_command():
        token = token.replace("MODEL_DIR", place["MODEL_DIR"]).replace("mypkg.rewards:score", place["reward"])
        command.append(token)
    extra = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", f"run.dir={work / 'run'}"]
    extra += ["train.progress=false", "run.overwrite=true", *args.set]
    if args.which == "gemma":
        extra.append("policy.lora={r = 16, alpha = 32}")
    command = [sys.executable, "-m", "tokenmdp", *command[1:]] + [part for e in extra for part in ("--set", e)]
    print("$ cd", work, "&&", shlex.join(["tokenmdp", *command[3:]]), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, cwd=work, env=env)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"{'step':>5} {'held-out reward':>16} {'kl_ref':>8} {'response length':>16}")
    for row in rows:
        if "true_reward" in row:
            length = row.get("eval/response_length", row.get("response_length", float("nan")))
            print(f"{row['step']:>5} {row['true_reward']:>16.3f} {row['kl_ref']:>8.3f} {length:>16.2f}")
    summary = work / "run" / "summary.json"
    if summary.is_file():
        print("warnings:", json.loads(summary.read_text()).get("warnings", []))
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
