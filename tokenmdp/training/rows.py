"""What a step logs and where it goes: its row of ``metrics.jsonl`` (:func:`step_row`), its
sample of completions (:func:`completion_rows`, every ``train.log_completions`` steps), and
:class:`RunLog`, which writes both and calls the loggers' hooks."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import attrs

from ..errors import RewardError
from ..plugin.batch import RolloutBatch
from .guards import call_hook
from .health import RunHealth
from .rundir import RunDir


def step_row(
    batch: RolloutBatch,
    step: int,
    scored_reference: bool,
    credit: dict[str, float],
    update_metrics: dict[str, Any],
    reward_metrics: dict[str, Any],
) -> dict[str, Any]:
    """The metrics of one step (on this rank's batch): the rollout's, the KL to the reference
    (when the step scored the reference), the credit scores, the updater's, and those the
    rewards logged, which may not take a name tokenmdp logs."""
    metrics: dict[str, Any] = {"rollout/response_length": batch.num_tokens / batch.size}
    if scored_reference:  # k1 estimate of KL(pi_old || pi_ref) on this batch, before the update
        metrics["objective/kl"] = float(batch.token_kl.sum(1).mean())
    if batch.rewards_observed:
        metrics["rollout/reward_mean"] = float(batch.sequence_rewards.mean())
    metrics.update(credit)
    metrics.update(update_metrics)
    clash = sorted(set(reward_metrics) & set(metrics))
    if clash:
        raise RewardError(
            f"a reward logged {', '.join(clash)} through log_metric at step {step}, a name tokenmdp logs "
            "itself; give the metric another name"
        )
    metrics.update(reward_metrics)
    return metrics


def completion_rows(task, batch: RolloutBatch, columns: dict | None = None, limit: int = 8) -> list[dict]:
    """Up to ``limit`` responses of ``batch``: prompt and completion as text (text tasks)
    or token ids (toy tasks), the response's reward (None if unobserved), and the
    ``columns`` rewards added with ``log_extra`` (those with one value per response)."""
    out = []
    columns = {name: values for name, values in (columns or {}).items() if len(values) == batch.size}
    rewards = batch.sequence_rewards.tolist() if batch.rewards_observed else None
    for i in range(min(limit, batch.size)):
        length = int(batch.response_mask[i].sum())
        response = batch.response_ids[i, :length].tolist()
        index = int(batch.prompt_index[i])
        if task.tokenizer is not None:  # a text task: the prompt and completion as text
            prompt, completion = task.prompt_text(index), task.completion_text(response)
        else:
            prompt, completion = task.prompts[index].tolist(), response
        row = {"prompt": prompt, "completion": completion, "reward": rewards[i] if rewards else None}
        out.append({**{name: values[i] for name, values in columns.items()}, **row})
    return out


@attrs.frozen
class StepResult:
    """What one step gives the loop: its metrics (averaged over ranks), the response tokens
    it sampled (summed over ranks), and its sample of completions (``train.log_completions``)."""

    metrics: dict[str, Any]
    tokens: int
    completions: list[dict] | None = None


class RunLog:
    """Rank 0's log of a run, and the loggers' lifecycle hooks: :meth:`start` opens
    ``metrics.jsonl`` and calls ``tokenmdp_on_train_start``; each step's row goes to
    ``metrics.jsonl``, past the run's health watch (a text run's collapse and run-away
    warnings, printed to stderr), then to ``tokenmdp_on_step_end``, and a sample of
    completions to ``completions.jsonl`` and ``tokenmdp_on_completions`` (:meth:`emit`);
    :meth:`end` closes the file and calls ``tokenmdp_on_train_end``."""

    def __init__(self, rundir: RunDir, pm, run):
        self.rundir, self.pm, self.run = rundir, pm, run
        self.health: RunHealth | None = None
        #: Whether the log was opened: the plugins then get ``tokenmdp_on_train_end`` however the run ends.
        self.started = False

    def start(self, text: bool) -> None:
        """Open the log; a ``text`` run (no exact solver) is watched for collapse and run-away
        warnings, a resumed run's rows replayed into the watch."""
        self.rundir.metrics.open()
        self.started = True
        call_hook(self.pm, "tokenmdp_on_train_start", run=self.run)
        if text:
            self.health = RunHealth(row for _, row in self.rundir.metrics.lines())

    @property
    def warnings(self) -> list[str]:
        """The health watch's warnings so far (none for a toy run, which has no watch)."""
        return list(self.health.warnings) if self.health is not None else []

    def emit(self, step: int, metrics: dict[str, Any], completions: list[dict] | None = None) -> None:
        """The core writes the step's line of metrics.jsonl (and its completions); then the
        loggers add theirs."""
        metrics = {"step": step, **metrics}
        self.rundir.metrics.append(metrics)
        for warning in self.health.observe(metrics) if self.health is not None else ():
            print(f"tokenmdp: warning: {warning}", file=sys.stderr)
        call_hook(self.pm, "tokenmdp_on_step_end", step=step, run=self.run, metrics=metrics)
        if completions:
            self.rundir.metrics.append_completions(step, completions)
            call_hook(self.pm, "tokenmdp_on_completions", step=step, run=self.run, completions=completions)

    def end(self, summary: dict | None, outcome: str) -> None:
        """The end of a run however it ends: the metrics file is closed and every plugin's
        ``tokenmdp_on_train_end`` runs (so it can close its files). After a failure, a
        plugin that fails there too is reported as a warning: the run's own error wins."""
        self.rundir.metrics.close()
        if outcome == "completed":
            call_hook(self.pm, "tokenmdp_on_train_end", run=self.run, summary=summary, outcome=outcome)
            return
        try:
            call_hook(self.pm, "tokenmdp_on_train_end", run=self.run, summary=summary, outcome=outcome)
        except Exception as exc:  # the error in flight is the one to report
            warnings.warn(f"after the run {outcome}, tokenmdp_on_train_end failed too: {exc}", stacklevel=2)
