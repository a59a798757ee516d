"""Defaults a pretrained model survives (issue 26, item 2): an HF policy takes its recipe's
LM defaults (``Recipe.lm_options``, LoRA's over them) where the config is silent, the run
records and prints them, toy runs keep theirs; and a text run whose responses collapse or
whose policy runs away from the reference says so once, on stderr and in summary.json."""

from __future__ import annotations

import json
import re

import pytest
from test_real_lm import text_files, text_run  # noqa: F401 (text_files: a fixture)

from tokenmdp import LM_LR, LORA_LR, Recipe
from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.plugin.composition import compose, with_recipe_defaults
from tokenmdp.plugin.registry import Registry, plugin_manager
from tokenmdp.training import health
from tokenmdp.training.health import RunHealth
from tokenmdp.training.trainer import Trainer


@pytest.fixture(scope="module")
def registry():
    return Registry(plugin_manager())


def resolved(registry, *overrides):
    return with_recipe_defaults(registry, load_config(None, list(overrides)))


HF = ["policy.kind=hf", "policy.path=/nowhere"]
GRPO = ["algorithm.name=grpo", "train.batch_size=4", "train.samples_per_prompt=2"]

# --- which defaults apply -----------------------------------------------------------------


def test_a_toy_policy_keeps_the_toy_defaults(registry):
    config, applied = resolved(registry, "algorithm.name=grpo")
    assert applied == {}
    assert config.train.beta == 1.0 and config.updater == {}
    assert compose(registry, config).updater.options.lr == 3e-3  # the toy recipe's own


@pytest.mark.parametrize(
    ("recipe", "beta"), [("grpo", 0.04), ("rloo", 0.05), ("ppo", 0.05), ("dpo", 0.1), ("inverse-q", 1.0)]
)
def test_an_hf_policy_takes_its_recipes_lm_defaults(registry, recipe, beta):
    config, applied = resolved(registry, f"algorithm.name={recipe}", *HF)
    assert config.train.beta == beta
    assert config.updater["lr"] == LM_LR == applied["updater.lr"]
    options = compose(registry, config).updater.options
    assert options.lr == LM_LR
    if recipe != "dpo":  # the pair updater has no epochs over a rollout
        assert options.minibatches == 1
        assert options.epochs == (4 if recipe == "ppo" else 1)
    assert ("train.beta" in applied) == (recipe != "inverse-q")


def test_lora_takes_its_own_learning_rate(registry):
    config, applied = resolved(registry, "algorithm.name=grpo", *HF, "policy.lora={r = 4}")
    assert config.updater["lr"] == LORA_LR == applied["updater.lr"]


def test_what_the_config_sets_wins(registry):
    config, applied = resolved(registry, "algorithm.name=grpo", *HF, "updater.lr=3e-4", "train.beta=0.5")
    assert config.updater["lr"] == 3e-4 and config.train.beta == 0.5
    assert "updater.lr" not in applied and "train.beta" not in applied
    assert applied["updater.epochs"] == 1


def test_a_replaced_component_gets_none_of_the_recipes_defaults(registry):
    config, applied = resolved(registry, "algorithm.name=grpo", "algorithm.updater=policy-gradient", *HF)
    assert "lr" not in config.updater and not any(key.startswith("updater.") for key in applied)
    assert config.train.beta == 0.04


def test_resolving_twice_changes_nothing(registry):
    once, _ = resolved(registry, "algorithm.name=ppo", *HF)
    twice, applied = with_recipe_defaults(registry, once)
    assert twice == once and applied == {}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lm_options", {"critic": {}}, "section 'critic' is not one of estimator, advantage, updater, train"),
        ("lm_options", {"train": {"steps": 3}}, "['train'] may only set beta (got steps)"),
        ("options", {"train": {"seed": 1}}, "['train'] may only set beta (got seed)"),
    ],
)
def test_a_recipe_with_bad_defaults_is_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=re.escape(f"recipe 'mine': {field}") + " ?" + re.escape(message)):
        Recipe(name="mine", estimator="e", advantage="a", updater="u", **{field: value})


def test_options_page_shows_the_lm_defaults(capsys):
    assert main(["options", "grpo"]) == 0
    page = capsys.readouterr().out
    lm = f"an HF policy: updater.lr = {LM_LR!r}, updater.epochs = 1, updater.minibatches = 1, train.beta = 0.04"
    assert lm in page
    assert f"with policy.lora: updater.lr = {LORA_LR!r}" in page


# --- a run records and prints them --------------------------------------------------------


def test_a_text_run_records_prints_and_resumes_with_its_lm_defaults(text_files, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = text_run(text_files, run_dir, *GRPO, "train.steps=2")
    Trainer(load_config(None, overrides)).train()
    out = capsys.readouterr().out  # stdout: stderr is kept for warnings and errors
    line = (
        f"tokenmdp: recipe 'grpo' on an HF policy: LM defaults updater.lr = {LM_LR!r}, updater.epochs = 1, "
        "updater.minibatches = 1, train.beta = 0.04"
    )
    assert line in out
    text = (run_dir / "config.toml").read_text()
    assert "# recipe 'grpo' on an HF policy: LM defaults" in text  # the header says where they came from
    stored = load_config(run_dir / "config.toml")
    assert stored.updater == {"lr": LM_LR, "epochs": 1, "minibatches": 1} and stored.train.beta == 0.04
    # a resume trains with what the run recorded, and prints no defaults of its own
    resumed = Trainer.from_run_dir(run_dir, ["train.steps=3"])
    assert resumed.lm_defaults == {} and resumed.composition.updater.options.lr == LM_LR
    resumed.train()
    assert "LM defaults" not in capsys.readouterr().out


def test_a_toy_runs_config_records_beta_as_before(tmp_path):
    run_dir = tmp_path / "toy"
    Trainer(load_config("configs/grpo.toml", ["train.steps=1", "train.progress=false", f"run.dir={run_dir}"])).train()
    assert load_config(run_dir / "config.toml").train.beta == 1.0
    assert "LM defaults" not in (run_dir / "config.toml").read_text()


# --- collapse and run-away warnings -------------------------------------------------------


def test_a_length_collapse_warns_once():
    watch = RunHealth()
    assert watch.observe({"step": 1, "rollout/response_length": 20.0}) == []
    assert watch.observe({"step": 2, "rollout/response_length": 5.0}) == []  # a quarter is not below it
    (message,) = watch.observe({"step": 3, "rollout/response_length": 2.0})
    assert message.startswith("step 3: the mean response length fell to 2.00 tokens, below 0.25 of the first step's")
    assert watch.observe({"step": 4, "rollout/response_length": 1.0}) == []
    assert watch.warnings == [message]


def test_a_kl_run_away_warns_once():
    watch = RunHealth()
    assert watch.observe({"step": 0, "kl_ref": 0.0, "response_length": 8.0}) == []
    assert watch.observe({"step": 10, "kl_ref": 8.0, "response_length": 8.0}) == []  # 1 nat per token: the limit
    (message,) = watch.observe({"step": 20, "kl_ref": 8.18, "response_length": 2.0})
    assert "held-out kl_ref is 8.18 nats over 2.00 tokens per response, above 1 nat per token" in message
    assert watch.observe({"step": 30, "kl_ref": 9.0, "response_length": 2.0}) == []


def test_a_resumed_run_replays_its_rows_silently():
    rows = [{"step": 1, "rollout/response_length": 16.0}, {"step": 2, "rollout/response_length": 1.0}]
    watch = RunHealth(rows)
    assert len(watch.warnings) == 1 and watch.first_length == 16.0
    assert watch.observe({"step": 3, "rollout/response_length": 1.0}) == []  # already said


def test_a_run_that_collapses_says_so_on_stderr_and_in_its_summary(text_files, tmp_path, capsys, monkeypatch):  # noqa: F811
    # the wiring, with a threshold no run can stay above: every step after the first "collapses"
    monkeypatch.setattr(health, "LENGTH_COLLAPSE", 10.0)
    run_dir = tmp_path / "run"
    overrides = text_run(text_files, run_dir, *GRPO, "train.steps=3")
    summary = Trainer(load_config(None, overrides)).train()
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and err[0].startswith("tokenmdp: warning: step 2: the mean response length fell to")
    assert summary["warnings"] == [err[0].removeprefix("tokenmdp: warning: ")]
    assert json.loads((run_dir / "summary.json").read_text())["warnings"] == summary["warnings"]


def test_a_healthy_text_run_has_no_warnings(text_files, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = text_run(text_files, run_dir, *GRPO, "train.steps=2")
    assert Trainer(load_config(None, overrides)).train()["warnings"] == []
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["response_length"] > 0 for r in rows if "kl_ref" in r)  # the evaluation reports it
