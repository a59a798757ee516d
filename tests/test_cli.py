"""Bad input: one line naming the field/plugin and the choices, exit 2, nothing written."""

import json
import re
from pathlib import Path

import pytest
from helpers import TINY

from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.errors import ConfigError


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


BAD_INPUTS = [
    (["--set", "env.id=tokenmdp/Nope-v0"], r"unknown env 'tokenmdp/Nope-v0'; available: .*tokenmdp/Pattern-v0"),
    (["--set", "algorithm.name=nope"], r"unknown recipe 'nope'; available: .*reinforce"),
    (["--set", "algorithm.advantage=nope"], r"unknown advantage 'nope'; available: .*reward-to-go"),
    (["--set", "train.beta=-1"], r"beta must be a number > 0 \(got -1\.0\)"),
    (["--set", "env.horizon=0"], r"env.horizon must be an integer >= 1 \(got 0\)"),
    (["--set", "env.vocab_size=1"], r"env.vocab_size must be an integer >= 2"),
    (["--set", "env.colour=3"], r"unexpected keyword argument 'colour'.*valid options: .*horizon"),
    (["--set", "train.stepz=3"], r"unknown option\(s\) stepz; valid options: steps"),
    (["--set", "trian.steps=3"], r"unknown config section\(s\) trian; valid sections: algorithm"),
    (["--set", "train.steps"], r"expected section.key=value"),
    (["--set", "policy.kind=lstm"], r"policy.kind 'lstm' is unknown; valid kinds: gru, mlp, tabular, transformer, hf"),
    (["--set", "policy.hiddn=3"], r"unknown option\(s\) hiddn for kind 'gru'; valid: hidden, layers"),
    (["--set", "reference.init=magic"], r"init must be one of 'sft', 'init'"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS)
def test_bad_input_is_one_clear_line(capsys, tmp_path, extra, message):
    run_dir = tmp_path / "run"
    sets = [a for s in TINY for a in ("--set", s)]
    code, out, err = run_cli(capsys, "train", *sets, "--set", f"run.dir={run_dir}", *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tokenmdp: error: ")

    assert re.search(message, err), err
    assert not run_dir.exists()


def test_malformed_toml(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    code, _, err = run_cli(capsys, "train", str(bad))
    assert code == 2 and f"config file '{bad}' is not valid TOML" in err
    code, _, err = run_cli(capsys, "train", str(tmp_path / "missing.toml"))
    assert code == 2 and "not found" in err


def test_set_values_are_parsed_as_toml():
    config = load_config(None, ["train.steps=7", "train.beta=2", "env.id=tokenmdp/SumMod-v0", "run.dir=x y"])
    assert config.train.steps == 7 and config.train.beta == 2.0 and isinstance(config.train.beta, float)
    assert config.run.dir == "x y"
    with pytest.raises(ConfigError, match="steps must be an integer > 0"):
        load_config(None, ["train.steps=1.5"])


def test_train_prints_the_table_against_the_exact_optimum(capsys, tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    code, out, _ = run_cli(capsys, "train", *sets, "--set", f"run.dir={tmp_path / 'run'}")
    assert code == 0
    assert "| regret_frac" in out and "J* (exact optimum)" in out
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert f"{summary['regret']:.4f}" in out


def test_resume_needs_a_run_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path))
    assert code == 2 and "not a run directory" in err


def test_solve_prints_optimum(capsys):
    code, out, _ = run_cli(capsys, "solve", "configs/demo.toml", "--set", "env.horizon=3")
    assert code == 0 and "J* =" in out and "prefix states" in out


def test_envs_and_plugins_commands(capsys):
    assert run_cli(capsys, "envs")[1].count("tokenmdp/") >= 4


def test_outside_plugin_is_usable_from_the_command_line(capsys, tmp_path):
    """The fixture package under tests/fixtures/outside_plugin is installed with only its
    entry point; `--set algorithm.advantage=<its name>` is all it takes to use it."""
    sets = [a for s in TINY for a in ("--set", s)]
    code, out, _ = run_cli(
        capsys, "train", *sets, "--set", f"run.dir={tmp_path / 'run'}", "--set", "algorithm.advantage=signed-return"
    )
    assert code == 0 and "signed-return" in out
    assert json.loads((tmp_path / "run/summary.json").read_text())["advantage"] == "signed-return"


RUN_CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.toml") if not p.name.startswith("compare")
)  # compare*.toml are grids (tests/test_compare.py)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_composes(path):
    from tokenmdp.config import load_config
    from tokenmdp.plugin.composition import compose
    from tokenmdp.plugin.registry import Registry, plugin_manager

    config = load_config(path)
    composition = compose(Registry(plugin_manager()), config)
    assert {c.kind for c in composition.components} == {"estimator", "advantage", "updater"}
