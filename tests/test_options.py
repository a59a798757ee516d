"""Discoverable options (``tokenmdp options``, ``train --help``) and Gymnasium's
conventions for the registered envs."""

from __future__ import annotations

import subprocess
import sys

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

from tokenmdp import config as config_module
from tokenmdp.cli import main
from tokenmdp.options import option_docs
from tokenmdp.plugin.registry import Registry, plugin_manager
from tokenmdp.reports.option_pages import options_text

SECTIONS = config_module.OPTION_SECTIONS


def test_every_option_of_every_section_and_built_in_component_has_a_doc_comment():
    assert set(SECTIONS) == {"algorithm", "reference", "train", "run"}
    registry = Registry(plugin_manager())
    missing = [(name, o.name) for name, cls in SECTIONS.items() for o in option_docs(cls) if not o.doc]
    missing += [
        (f"{kind} {name}", o.name)
        for kind, table in registry.components.items()
        for name, entry in table.items()
        if entry.source.startswith("tokenmdp ")  # ours; an outside plugin documents itself
        for o in option_docs(entry.obj.Options)
        if not o.doc
    ]
    assert missing == []


def test_options_prints_a_recipes_components_with_its_defaults_and_docs(capsys):
    assert main(["options", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "recipe 'grpo': estimator grpo, advantage sequence-credit, updater clipped-pg" in out
    assert "[updater] clipped-pg" in out
    # the recipe's own default (kl_coef = 0.0), not the class default (None)
    assert "  kl_coef: float | None = 0.0\n      KL coefficient" in out
    assert "eps: float = 1e-06\n      Added to the group's std." in out


def test_options_of_a_section_and_of_a_component():
    train = options_text("train")
    assert train.startswith("[train]") and "  samples_per_prompt: int = 1\n      G: each step draws" in train
    assert "log_kl: bool = True" in train
    gae = options_text("gae")
    assert gae.startswith("[advantage] gae (plugin") and "lam" in gae


def test_options_of_every_section_env_id_and_policy_kind():
    env = options_text("env")
    assert env.startswith("[env]:") and "[env] id = 'tokenmdp/Text-v0'" in env and "  horizon: int = 5" in env
    for name in ("Text-v0", "tokenmdp/Text-v0"):
        text = options_text(name)
        assert text.startswith("[env] id = 'tokenmdp/Text-v0'") and "  reward_weights: list | None = None" in text
    pattern = options_text("Pattern-v0")  # a toy task's own options and those it passes on to ToyTask
    assert "  reward_scale: float = 1.0" in pattern and "  vocab_size: int = 6" in pattern
    policy = options_text("policy")
    for kind in ("gru", "mlp", "tabular", "transformer", "hf"):
        assert f"[policy] kind = '{kind}'" in policy or f'[policy] kind = "{kind}"' in policy
    assert options_text("hf").startswith('[policy] kind = "hf"') and "  lora: table = None" in options_text("hf")
    assert "  hidden: int = 96" in options_text("gru")


def test_an_unknown_name_lists_what_there_is(capsys):
    assert main(["options", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "options: unknown name 'nope'" in err and "grpo" in err and "train" in err and err.count("\n") == 0


def test_train_help_lists_the_sections_and_points_to_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for section in ("[algorithm]", "[env]", "[policy]", "[reference]", "[train]", "[run]", "[updater]"):
        assert section in out
    assert "tokenmdp options" in out


def test_importing_tokenmdp_is_enough_for_gymnasium_make():
    code = (
        "import gymnasium, tokenmdp\n"
        "gymnasium.register_envs(tokenmdp)\n"
        "env = gymnasium.make('tokenmdp/Pattern-v0')\n"
        "vec = gymnasium.make_vec('tokenmdp/SumMod-v0', num_envs=3)\n"
        "print(env.unwrapped.task.name, vec.num_envs)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["Pattern", "3"]


TOY_IDS = [
    "tokenmdp/Pattern-v0",
    "tokenmdp/SumMod-v0",
    "tokenmdp/SumThreshold-v0",
    "tokenmdp/Forbidden-v0",
    "tokenmdp/Length-v0",
    "tokenmdp/Bandit-v0",
]


@pytest.mark.parametrize("env_id", TOY_IDS)
def test_every_toy_env_passes_check_env_with_its_default_parameters(env_id):
    check_env(gymnasium.make(env_id).unwrapped, skip_render_check=True)  # raises on any failed check


def test_a_one_step_bandit_terminates():
    env = gymnasium.make("tokenmdp/Bandit-v0")
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step(0)
    assert (terminated, truncated) == (True, False)


def test_the_wandb_option_says_where_wandb_keeps_its_files():
    run = options_text("run")
    assert "$WANDB_DIR/wandb" in run and "./wandb" in run and "under the run directory" not in run
