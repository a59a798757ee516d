"""Built-in loggers, as ordinary plugins on the lifecycle hooks. They only add outputs:
the core itself writes ``metrics.jsonl``, so blocking this plugin loses no data.

- TensorBoard: every metric under a stable namespaced tag (bare names go to ``eval/``);
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
    }


@hookimpl
def tokenmdp_on_step_end(run, step, metrics):
    res = run.resources[_KEY]
    for name, value in metrics.items():
        if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
            res["tensorboard"].add_scalar(tensorboard_tag(name), value, step)
    if step > run.start_step:
        res["progress"].update(1)
    if "regret_frac" in metrics:
        res["progress"].set_postfix(regret_frac=f"{metrics['regret_frac']:.3f}")


@hookimpl
def tokenmdp_on_train_end(run, summary, outcome):
    res = run.resources.pop(_KEY, None)
    if res is None:  # the run failed before this plugin's start hook ran
        return
    res["tensorboard"].close()
    res["progress"].close()
