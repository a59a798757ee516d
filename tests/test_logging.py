"""``train.log_completions`` (completions.jsonl, TensorBoard text) and the wandb logger
(``run.wandb_project``, tested offline)."""

from __future__ import annotations

import json

import pytest
from test_real_lm import text_files, text_run, train_text  # noqa: F401 (text_files is a fixture)

from tokenmdp import ConfigError
from tokenmdp.config import load_config
from tokenmdp.training.trainer import Trainer

GRPO = ["algorithm.name=grpo", "train.steps=4", "train.batch_size=8", "train.samples_per_prompt=4"]


def completion_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]


def test_every_n_steps_a_sample_of_completions_is_written_and_shown_in_tensorboard(text_files, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train_text(text_files, run, *GRPO, "train.log_completions=2")
    lines = completion_lines(run)
    assert sorted({line["step"] for line in lines}) == [2, 4]
    assert len(lines) == 16 and set(lines[0]) == {"step", "prompt", "completion", "reward"}
    prompts = (text_files / "train.jsonl").read_text()
    assert all(json.dumps(line["prompt"])[1:-1] in prompts for line in lines)
    assert all(line["reward"] == float(len(line["completion"].split())) for line in lines)  # length_reward
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "completions/text_summary" in events.Tags()["tensors"]
    assert [e.step for e in events.Tensors("completions/text_summary")] == [2, 4]


def test_a_resumed_run_keeps_only_the_completions_of_its_checkpoint(text_files, tmp_path):  # noqa: F811
    from helpers import train_until_interrupted

    run = tmp_path / "run"
    overrides = text_run(text_files, run, *GRPO, "train.log_completions=1", "run.checkpoint_every=2")
    train_until_interrupted(Trainer(load_config(None, overrides)), at_step=4)  # steps 1-3 done, checkpoint at 2
    assert sorted({line["step"] for line in completion_lines(run)}) == [1, 2, 3]
    Trainer.from_run_dir(run, []).train()
    assert sorted(line["step"] for line in completion_lines(run)) == sorted([1, 2, 3, 4] * 8)


def wandb_records(run_folder, expected: bytes, deadline_s: float = 120.0) -> bytes:
    """The offline run's record file once it holds ``expected`` (polled up to
    ``deadline_s``, as docs/testing.md's subprocess tests poll); whatever it holds then."""
    import time

    started = time.monotonic()
    while True:
        records = b"".join(path.read_bytes() for path in run_folder.glob("run-*.wandb"))
        if expected in records or time.monotonic() - started > deadline_s:
            return records
        time.sleep(0.2)


def test_the_wandb_logger_logs_metrics_config_and_completions_offline(text_files, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_files"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_files").mkdir()
    run = tmp_path / "run"
    train_text(text_files, run, *GRPO, "train.log_completions=2", "run.wandb_project=tokenmdp-test")
    runs = list((tmp_path / "wandb_files" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # an offline run is a record file (history, config) and the media it logged; wandb's
    # service process writes the records after finish() returns (once, in a full suite on
    # 2 busy cores, the file held only its header when read at once), so wait for them
    records = wandb_records(runs[0], b"rollout/reward_mean")
    assert b"losses/policy" in records and b"rollout/reward_mean" in records  # the metrics
    assert b"tokenmdp/Text-v0" in records and b"grpo" in records  # the config
    tables = sorted((runs[0] / "files" / "media" / "table").glob("completions_*.table.json"))
    assert [t.name.split("_")[1] for t in tables] == ["2", "4"]
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward"] and len(table["data"]) == 8
    assert (run / "wandb_id.txt").read_text().strip() in runs[0].name  # one wandb run per run directory


def test_wandb_without_the_package_is_a_one_line_error(text_files, tmp_path, monkeypatch):  # noqa: F811
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = load_config(None, text_run(text_files, tmp_path / "r", *GRPO, "run.wandb_project=p"))
    with pytest.raises(ConfigError, match=r"run.wandb_project needs wandb: pip install"):
        Trainer(config)


def test_plugins_receive_the_sample_through_tokenmdp_on_completions(text_files, tmp_path):  # noqa: F811
    import types

    from tokenmdp import hookimpl
    from tokenmdp.plugin.registry import plugin_manager

    seen = []
    plugin = types.ModuleType("completion_watcher")
    plugin.tokenmdp_on_completions = hookimpl(lambda step, completions: seen.append((step, completions)))
    config = load_config(None, text_run(text_files, tmp_path / "run", *GRPO, "train.log_completions=3"))
    Trainer(config, pm=plugin_manager(extra_plugins=[plugin])).train()
    assert [step for step, _ in seen] == [3]
    assert seen[0][1] == [{k: v for k, v in line.items() if k != "step"} for line in completion_lines(tmp_path / "run")]


def test_the_progress_bar_shows_the_reward_and_the_kl_as_trl_does():
    import io
    import types

    from tqdm import tqdm

    import tokenmdp_loggers

    out = io.StringIO()
    bar = tqdm(total=3, file=out, mininterval=0)
    board = types.SimpleNamespace(add_scalar=lambda *a: None)
    run = types.SimpleNamespace(
        start_step=0, resources={"tokenmdp_loggers": {"tensorboard": board, "wandb": None, "progress": bar}}
    )
    metrics = {"step": 1, "rollout/reward_mean": 0.51234, "objective/kl": 0.0123, "losses/policy": 2.0}
    tokenmdp_loggers.tokenmdp_on_step_end(run=run, step=1, metrics=metrics)
    bar.refresh()
    assert "reward=0.512" in out.getvalue() and "kl_batch=0.0123" in out.getvalue()
    assert "losses" not in out.getvalue()
