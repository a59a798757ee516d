"""The training loop end to end: files, reproducibility, reward-free runs, faults, resume."""

import json
import time
import types

import attrs
import pytest
import torch
from helpers import TINY, has_lines, train_until_interrupted, wait_until

import tokenmdp
from tokenmdp import ConfigError, NonFiniteError, PluginError, TrajectoryEstimator, hookimpl
from tokenmdp.plugin.registry import plugin_manager
from tokenmdp.training.trainer import Trainer


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents(tiny_config, tmp_path):
    summary = Trainer(tiny_config()).train()
    run = tmp_path / "run"
    assert (run / "config.toml").is_file() and (run / "summary.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "checkpoints").glob("step_*.pt"))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ["true_reward", "kl_ref", "regret", "kl_to_optimal", "env_tokens"]:
        assert key in rows[0] and key in rows[-1]
    assert "credit_corr" in rows[1]
    # the trainer's sampled KL: 0 before the first update (the policy is the reference), then not
    assert abs(rows[1]["objective/kl"]) < 1e-6 and all(abs(r["objective/kl"]) > 1e-4 for r in rows[2:])
    assert rows[-1]["env_tokens"] == 4 * 16 * 3
    # regret and kl_to_optimal are one quantity: J* - J = beta * KL(pi || pi*)
    assert rows[-1]["regret"] == pytest.approx(rows[-1]["kl_to_optimal"], rel=1e-9, abs=1e-12)
    assert summary["regret"] == pytest.approx(rows[-1]["regret"])
    assert json.loads((run / "summary.json").read_text())["env_tokens"] == 192
    # the resolved config round-trips: the config as given, with train.beta (unset) resolved
    again = tokenmdp.config.load_config(run / "config.toml")
    given = tiny_config()
    assert given.train.beta is None and again.train.beta == 1.0
    assert again == attrs.evolve(given, train=attrs.evolve(given.train, beta=1.0))


def test_same_seed_same_metrics(tiny_config, tmp_path):
    Trainer(tiny_config(run_dir=tmp_path / "a")).train()
    Trainer(tiny_config(run_dir=tmp_path / "b")).train()
    Trainer(tiny_config("train.seed=1", run_dir=tmp_path / "c")).train()
    a, b, c = ((tmp_path / d / "metrics.jsonl").read_text() for d in "abc")
    assert a == b
    assert a != c


def test_resume_reproduces_an_uninterrupted_run(tiny_config, tmp_path):
    full = tiny_config("train.steps=6", run_dir=tmp_path / "full")
    Trainer(full).train()
    part = tiny_config("train.steps=6", "run.checkpoint_every=3", run_dir=tmp_path / "part")
    train_until_interrupted(Trainer(part), at_step=4)  # interrupted after step 3's checkpoint
    Trainer.from_run_dir(tmp_path / "part").train()
    assert (tmp_path / "part/metrics.jsonl").read_text() == (tmp_path / "full/metrics.jsonl").read_text()
    a = torch.load(sorted((tmp_path / "full/checkpoints").glob("*.pt"))[-1], weights_only=False)["policy"]
    b = torch.load(sorted((tmp_path / "part/checkpoints").glob("*.pt"))[-1], weights_only=False)["policy"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-equal: a resume repeats the same computation


def test_existing_run_dir_is_not_clobbered(tiny_config):
    Trainer(tiny_config()).train()
    with pytest.raises(tokenmdp.ConfigError, match="already holds a run"):
        Trainer(tiny_config())
    Trainer(tiny_config("run.overwrite=true")).train()


class GuideOnly(TrajectoryEstimator):
    """Scores tokens with the reference under the guide prefix; never reads the env reward."""

    name = "guide-only-test"
    requires = frozenset({"ref_logprobs"})
    provides = frozenset({"token_rewards"})

    def estimate(self, batch, ctx):
        with torch.no_grad():
            guided = ctx.token_logprobs(ctx.reference, batch, prefix_ids=ctx.guide_ids)
        return {"token_rewards": ctx.beta * (guided - batch.ref_logprobs) * batch.response_mask}


def _plugin(**hooks):
    mod = types.ModuleType(f"test_plugin_{'_'.join(hooks)}")
    for name, fn in hooks.items():
        setattr(mod, name, hookimpl(fn))
    return mod


def test_reward_free_composition_never_calls_the_env_reward(tiny_config):
    pm = plugin_manager(extra_plugins=[_plugin(tokenmdp_trajectory_estimators=lambda: [GuideOnly])])
    trainer = Trainer(tiny_config("algorithm.estimator=guide-only-test"), pm=pm)
    assert not trainer.composition.needs_env_reward
    trainer.build_models()
    calls_after_setup = trainer.task.reward_calls  # the solver's tables (evaluation only)
    trainer.build_models = lambda: None
    trainer.train()
    assert trainer.task.reward_calls == calls_after_setup
    rows = read_metrics(trainer.run_dir)
    assert "rollout/reward_mean" not in rows[1]

    with_reward = Trainer(tiny_config("run.overwrite=true"))
    with_reward.build_models()
    before = with_reward.task.reward_calls
    with_reward.build_models = lambda: None
    with_reward.train()
    assert with_reward.task.reward_calls > before


class NaNEstimator(GuideOnly):
    name = "nan-test"

    def estimate(self, batch, ctx):
        out = super().estimate(batch, ctx)
        if ctx.step == 2:
            out["token_rewards"] = out["token_rewards"] * float("nan")
        return out


class Crashing(GuideOnly):
    name = "crash-test"

    def estimate(self, batch, ctx):
        raise RuntimeError("boom")


def test_nan_stops_the_run_naming_component_and_step(tiny_config):
    pm = plugin_manager(extra_plugins=[_plugin(tokenmdp_trajectory_estimators=lambda: [NaNEstimator])])
    trainer = Trainer(tiny_config("algorithm.estimator=nan-test", "run.checkpoint_every=1"), pm=pm)
    with pytest.raises(NonFiniteError, match="estimator 'nan-test'.*'token_rewards' at step 2"):
        trainer.train()
    # the last good checkpoint (step 1) is intact and no NaN state was written
    ckpts = sorted((trainer.run_dir / "checkpoints").glob("*.pt"))
    assert [c.name for c in ckpts] == ["step_00000001.pt"]


def test_crash_inside_a_hook_is_reported_with_the_plugin_name(tiny_config):
    pm = plugin_manager(extra_plugins=[_plugin(tokenmdp_trajectory_estimators=lambda: [Crashing])])
    with pytest.raises(PluginError, match="estimator 'crash-test' raised in estimate at step 1: RuntimeError: boom"):
        Trainer(tiny_config("algorithm.estimator=crash-test"), pm=pm).train()


def test_lifecycle_hooks_are_called_by_keyword(tiny_config):
    seen = []
    plugin = _plugin(
        tokenmdp_on_train_start=lambda run: seen.append(("start", run.start_step)),
        tokenmdp_on_step_end=lambda step, metrics: seen.append(("step", step, "env_tokens" in metrics)),
        tokenmdp_on_train_end=lambda summary: seen.append(("end", "regret" in summary)),
    )
    Trainer(tiny_config(), pm=plugin_manager(extra_plugins=[plugin])).train()
    assert seen[0] == ("start", 0)
    assert [s[1] for s in seen if s[0] == "step"] == [0, 1, 2, 3, 4]
    assert all(s[2] for s in seen if s[0] == "step")
    assert seen[-1] == ("end", True)


def test_the_end_hook_runs_however_the_run_ends_with_its_outcome(tiny_config, tmp_path):
    """From a ``finally``: a plugin can always close its files."""
    ended = []
    plugin = _plugin(tokenmdp_on_train_end=lambda summary, outcome: ended.append((outcome, summary is None)))
    pm = plugin_manager(extra_plugins=[plugin, _plugin(tokenmdp_trajectory_estimators=lambda: [Crashing])])
    with pytest.raises(PluginError, match="crash-test"):
        Trainer(tiny_config("algorithm.estimator=crash-test", run_dir=tmp_path / "crash"), pm=pm).train()
    trainer = Trainer(tiny_config("run.checkpoint_every=1", run_dir=tmp_path / "cut"), pm=pm)
    train_until_interrupted(trainer, at_step=3)
    Trainer(tiny_config(run_dir=tmp_path / "done"), pm=pm).train()
    assert ended == [("failed", True), ("interrupted", True), ("completed", False)]


def test_blocking_the_loggers_plugin_loses_no_metrics(tiny_config, tmp_path, monkeypatch):
    """The core writes metrics.jsonl; the loggers plugin only adds TensorBoard and the bar."""
    monkeypatch.setenv("TOKENMDP_DISABLE_PLUGINS", "loggers")
    Trainer(tiny_config(run_dir=tmp_path / "run")).train()
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "run" / "tensorboard").exists()
    with pytest.raises(ConfigError, match="already holds a run"):  # the existing-run guard still works
        Trainer(tiny_config(run_dir=tmp_path / "run"))
    monkeypatch.delenv("TOKENMDP_DISABLE_PLUGINS")
    Trainer(tiny_config(run_dir=tmp_path / "logged")).train()
    assert (tmp_path / "run/metrics.jsonl").read_text() == (tmp_path / "logged/metrics.jsonl").read_text()


def test_outside_plugin_advantage_is_used(tiny_config):
    summary = Trainer(tiny_config("algorithm.advantage=signed-return", "advantage.scale=0.5")).train()
    assert summary["advantage"] == "signed-return"


def test_tiny_gpt2_trains_through_the_same_trainer(tmp_path):
    toy_only = [s for s in TINY if not s.startswith("policy.hidden")]  # an hf policy rejects toy options
    config = tokenmdp.config.load_config(
        None,
        [
            *toy_only,
            f"run.dir={tmp_path}",
            "policy.kind=hf",
            "policy.config={n_layer=1, n_head=2, n_embd=16, n_positions=16}",
            "train.steps=3",
        ],
    )
    trainer = Trainer(config)
    summary = trainer.train()
    assert type(trainer.policy).__name__ == "HFCausalLMPolicy"
    before = trainer.reference.state_dict()
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert summary["regret"] >= 0


@pytest.mark.parametrize("env, horizon", [("Bandit", 1), ("Pattern", 5)])
def test_reinforce_cuts_regret_below_five_percent(env, horizon, tmp_path):
    config = tokenmdp.config.load_config(
        "configs/demo.toml",
        [
            f"env.id=tokenmdp/{env}-v0",
            f"env.horizon={horizon}",
            f"run.dir={tmp_path}",
            "train.progress=false",
            "train.eval_every=100",
        ],
    )
    summary = Trainer(config).train()
    assert summary["start"]["regret"] > 0.05
    assert summary["regret_frac"] < 0.05, summary


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_identically(tmp_path):
    """SIGINT finishes the step in flight, checkpoints it, exits 130; --resume completes
    the run with the same metrics.jsonl as an uninterrupted run."""
    import signal
    import subprocess
    import sys

    def argv(run_dir, *extra):
        sets = [a for s in [*TINY, "train.steps=300", "train.eval_every=50"] for a in ("--set", s)]
        return [sys.executable, "-m", "tokenmdp", "train", *sets, "--set", f"run.dir={run_dir}", *extra]

    subprocess.run(argv(tmp_path / "full"), check=True, capture_output=True)
    proc = subprocess.Popen(argv(tmp_path / "cut"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut/metrics.jsonl"
    wait_until(lambda: has_lines(metrics, 5))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved; continue with: tokenmdp train --resume" in err
    rows = metrics.read_text().splitlines()
    assert 5 <= len(rows) < 301
    assert sorted((tmp_path / "cut/checkpoints").glob("*.pt"))[-1].name == f"step_{len(rows) - 1:08d}.pt"
    resumed = subprocess.run(
        [sys.executable, "-m", "tokenmdp", "train", "--resume", str(tmp_path / "cut")], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert metrics.read_text() == (tmp_path / "full/metrics.jsonl").read_text()


def test_credit_scoring_against_a_star_can_be_switched_off(tmp_path):
    from helpers import TINY

    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    on = Trainer(load_config(None, [*TINY, f"run.dir={tmp_path / 'on'}"]))
    on.train()
    off = Trainer(load_config(None, [*TINY, "train.score_credit=false", f"run.dir={tmp_path / 'off'}"]))
    summary = off.train()
    rows_on = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    rows_off = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert all("credit_corr" in r for r in rows_on if "rollout/response_length" in r)
    assert not any("credit_corr" in r for r in rows_off)
    assert summary.get("credit_corr") is None
    # the training itself is the same
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("credit_corr", "time/"))}
    assert [strip(r) for r in rows_on] == [strip(r) for r in rows_off]


def test_a_micro_batch_that_splits_nothing_is_a_warning(tiny_config):
    import warnings

    with pytest.warns(UserWarning, match=r"micro_batch_size = 16 is a whole minibatch .*splits nothing"):
        Trainer(tiny_config("updater.micro_batch_size=16"))  # TINY: batches of 16, one minibatch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(tiny_config("updater.micro_batch_size=8", "run.overwrite=true"))  # splits in two: no warning


class ReadsTheReferenceUndeclared(TrajectoryEstimator):
    """Reads ``batch.ref_logprobs`` without declaring it in ``requires``."""

    name = "undeclared-reference-test"
    provides = frozenset({"token_rewards"})

    def estimate(self, batch, ctx):
        return {"token_rewards": batch.ref_logprobs * batch.response_mask}


def test_a_step_scores_the_reference_for_log_kl_or_a_component_that_declares_it(tiny_config, tmp_path):
    """With train.log_kl = false the reference is scored only for a component that declares
    ref_logprobs in its requires; one that reads it undeclared gets a one-line error saying so."""
    estimators = _plugin(tokenmdp_trajectory_estimators=lambda: [GuideOnly, ReadsTheReferenceUndeclared])
    pm = plugin_manager(extra_plugins=[estimators])
    quiet = "train.log_kl=false"
    declared = Trainer(tiny_config("algorithm.estimator=guide-only-test", quiet, run_dir=tmp_path / "a"), pm=pm)
    assert declared.scores_reference
    declared.train()
    assert all("objective/kl" in row for row in read_metrics(declared.run_dir)[1:])
    undeclared = Trainer(tiny_config("algorithm.estimator=undeclared-reference-test", run_dir=tmp_path / "b"), pm=pm)
    assert undeclared.scores_reference  # train.log_kl (the default) scores it every step
    undeclared = Trainer(
        tiny_config("algorithm.estimator=undeclared-reference-test", quiet, run_dir=tmp_path / "c"), pm=pm
    )
    assert not undeclared.scores_reference
    with pytest.raises(PluginError) as raised:
        undeclared.train()
    message = str(raised.value)
    assert "\n" not in message and "estimator 'undeclared-reference-test' raised in estimate at step 1" in message
    assert 'declare "ref_logprobs" in the requires of the component that reads it' in message


def test_a_step_returns_its_tokens_and_its_completions_beside_its_metrics(tiny_config):
    trainer = Trainer(tiny_config("train.log_completions=1"))
    trainer.build_models()
    result = trainer.train_step(1)
    assert result.tokens == 16 * 3 and isinstance(result.tokens, int)
    assert "rollout/tokens" not in result.metrics and result.metrics["rollout/response_length"] == 3
    assert len(result.completions) == 8 and trainer.ctx.step == 1


def slow_steps(trainer, seconds: float):
    """Each of ``trainer``'s steps takes at least ``seconds`` longer."""
    original = trainer.train_step

    def step(n):
        time.sleep(seconds)
        return original(n)

    trainer.train_step = step
    return trainer


def test_wall_seconds_count_every_piece_of_a_resumed_run(tiny_config, tmp_path):
    """summary.json's wall_seconds covers the steps of every piece (each piece's time up to
    its last checkpoint); a resume from a checkpoint that kept no count says where the count
    starts (``wall_from_step``)."""
    from tokenmdp.training.rundir import RunDir

    part = tiny_config("train.steps=6", "run.checkpoint_every=3", run_dir=tmp_path / "part")
    trainer = slow_steps(Trainer(part), 0.2)
    train_until_interrupted(trainer, at_step=4)  # steps 1-3 and their checkpoint: >= 0.6 s
    state = RunDir(tmp_path / "part").load_latest_checkpoint()
    assert state["step"] == 3 and state["wall_seconds"] >= 0.6 and state["wall_from_step"] == 0
    summary = slow_steps(Trainer.from_run_dir(tmp_path / "part"), 0.2).train()  # steps 4-6: >= 0.6 s
    assert summary["wall_seconds"] >= state["wall_seconds"] + 0.6 and summary["wall_from_step"] == 0

    old = tiny_config("train.steps=6", "run.checkpoint_every=3", run_dir=tmp_path / "old")
    train_until_interrupted(Trainer(old), at_step=4)
    run = RunDir(tmp_path / "old")
    state = run.load_latest_checkpoint()
    del state["wall_seconds"], state["wall_from_step"]  # as a checkpoint of an older tokenmdp
    for path in run.checkpoints.iterdir():
        path.unlink()
    run.save_checkpoint(3, state, keep=2)
    summary = Trainer.from_run_dir(tmp_path / "old").train()
    assert summary["wall_from_step"] == 3  # the count covers steps 4-6 only, and says so
