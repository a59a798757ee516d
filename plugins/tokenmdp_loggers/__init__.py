"""Built-in loggers, as ordinary plugins on the lifecycle hooks. They only add outputs:
the core itself writes ``metrics.jsonl``, so blocking this plugin loses no data.

- TensorBoard: every metric under a stable namespaced tag (bare names go to ``eval/``),
  and the ``train.log_completions`` samples as a text table (tag ``completions``);
- Weights & Biases, when ``run.wandb_project`` is set (extra ``wandb``): the same metrics,
  the config, and the samples as a table;
- a tqdm progress bar (``train.progress = false`` to silence it).
"""

from __future__ import annotations

import math

from tqdm.auto import tqdm

from tokenmdp import hookimpl

_KEY = "tokenmdp_loggers"


def tensorboard_tag(name: str) -> str:
    return name if "/" in name else f"eval/{name}"


@hookimpl
def tokenmdp_on_train_start(run):
    from torch.utils.tensorboard import SummaryWriter

    bar = tqdm(
        total=run.config.train.steps,
        initial=run.start_step,
        desc="train",
        unit="step",
        disable=not run.config.train.progress,
        leave=False,
    )
    run.resources[_KEY] = {
        "tensorboard": SummaryWriter(log_dir=str(run.dir / "tensorboard")),
        "progress": bar,
        "wandb": _start_wandb(run) if run.config.run.wandb_project else None,
    }


def _start_wandb(run):
    import tomllib

    import wandb

    config = tomllib.loads((run.dir / "config.toml").read_text())
    return wandb.init(
        project=run.config.run.wandb_project,
        name=run.dir.name,
        config=config,  # wandb's own files go where it puts them (WANDB_DIR, else ./wandb)
        resume="allow",
        id=_wandb_id(run),
    )


def _wandb_id(run) -> str:
    """One wandb run per run directory, kept in it, so ``--resume`` continues the same one."""
    import uuid

    path = run.dir / "wandb_id.txt"
    if not path.exists():
        path.write_text(uuid.uuid4().hex[:16] + "\n")
    return path.read_text().strip()


@hookimpl
def tokenmdp_on_step_end(run, step, metrics):
    res = run.resources[_KEY]
    for name, value in metrics.items():
        if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
            res["tensorboard"].add_scalar(tensorboard_tag(name), value, step)
    if res["wandb"] is not None:
        logged = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        res["wandb"].log(logged, step=step)
    if step > run.start_step:
        res["progress"].update(1)
    shown = {key: metrics[key] for key in PROGRESS_KEYS if isinstance(metrics.get(key), (int, float))}
    if shown:
        res["progress"].set_postfix({PROGRESS_KEYS[k]: f"{v:.3g}" for k, v in shown.items()}, refresh=False)


#: What the progress bar shows of a step's metrics (when logged), and under which name:
#: the reward and the KL as TRL's bar shows them, and the exact regret of toy runs.
PROGRESS_KEYS = {
    "rollout/reward_mean": "reward",
    "kl_ref": "kl",
    "objective/kl": "kl_batch",
    "regret_frac": "regret_frac",
}


@hookimpl
def tokenmdp_on_completions(run, step, completions):
    res = run.resources[_KEY]
    header = "| prompt | completion | reward |\n|---|---|---|\n"
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")
    rows = "".join(f"| {cell(c['prompt'])} | {cell(c['completion'])} | {c['reward']} |\n" for c in completions)
    res["tensorboard"].add_text("completions", header + rows, step)
    if res["wandb"] is not None:
        import wandb

        table = wandb.Table(columns=["step", "prompt", "completion", "reward"])
        for c in completions:
            table.add_data(step, str(c["prompt"]), str(c["completion"]), c["reward"])
        res["wandb"].log({"completions": table}, step=step)


@hookimpl
def tokenmdp_on_train_end(run, summary, outcome):
    res = run.resources.pop(_KEY, None)
    if res is None:  # the run failed before this plugin's start hook ran
        return
    res["tensorboard"].close()
    res["progress"].close()
    if res["wandb"] is not None:
        if summary:
            res["wandb"].summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        res["wandb"].finish(exit_code=0 if outcome == "completed" else 1)
