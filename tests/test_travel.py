"""Runs that travel (issue 26 item 4): a run directory works from any folder. Its config
records the paths it names absolute (resolved from the folder the run started in), the CLI
imports reward modules from the folder it was started in, a run of ``tokenmdp.train`` with a
model and a tokenizer object saves them so that ``tokenmdp export`` needs nothing else, and a
LoRA export names its base by an absolute path, so its model card's snippet loads anywhere."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY
from test_real_lm import rows, text_files  # noqa: F401 (text_files is a fixture)

import tokenmdp
from tokenmdp import ConfigError
from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.training.paths import PATH_KEYS, absolute_paths, recorded_reward_folders
from tokenmdp.training.trainer import Trainer

REWARD_MODULE = "travel_rewards"  # a name no other test imports
#: The text run's set-up with every path relative to the project folder, as a user types it.
RELATIVE = [
    "env.id=tokenmdp/Text-v0",
    "env.prompts=train.jsonl",
    "env.eval_prompts=held_out.txt",
    "env.tokenizer=spm.model",
    f"env.reward={REWARD_MODULE}:score",
    "env.horizon=6",
    "policy.kind=hf",
    "policy.path=gpt2",
    "reference.init=init",
    "algorithm.name=grpo",
    "train.steps=2",
    "train.batch_size=8",
    "train.samples_per_prompt=4",
    "train.progress=false",
]
#: In this process the tests' folder is on the search path, the project folder is not.
IN_PROCESS = [o if not o.startswith("env.reward=") else "env.reward=test_real_lm:length_reward" for o in RELATIVE]
TOKENMDP = Path(sys.executable).with_name("tokenmdp")  # the console script, as a user runs it


@pytest.fixture(scope="module")
def project(text_files, tmp_path_factory):  # noqa: F811
    """A project folder: prompts, a sentencepiece tokenizer, a GPT-2 folder and a reward module."""
    root = tmp_path_factory.mktemp("project")
    for name in ("train.jsonl", "held_out.txt", "spm.model"):
        shutil.copy(text_files / name, root / name)
    shutil.copytree(text_files / "gpt2", root / "gpt2")
    (root / f"{REWARD_MODULE}.py").write_text("def score(prompt, completion):\n    return float(len(completion))\n")
    return root


def console(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The ``tokenmdp`` console script in ``cwd``, without PYTHONPATH: its search path starts at
    its own folder, not ``cwd`` (what ``python -m`` would add)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [str(TOKENMDP), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def card_snippet(folder: Path) -> str:
    return re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S).group(1)


def run_snippet(folder: Path, cwd: Path, after: str = "") -> str:
    """Run the model card's loading snippet of the export ``folder`` in a fresh interpreter in
    ``cwd``; its stdout."""
    code = card_snippet(folder) + "\n" + after
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# --- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(project):
    """A run started by the console script in the project folder, every path typed relative."""
    done = console(["train", *sets([*RELATIVE, "run.dir=runs/cli"])], cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    return project / "runs" / "cli"


def test_the_console_script_imports_a_reward_module_from_its_folder_and_records_absolute_paths(cli_run, project):
    config = load_config(cli_run / "config.toml")
    assert config.env["prompts"] == str(project / "train.jsonl")
    assert config.env["eval_prompts"] == str(project / "held_out.txt")
    assert config.env["tokenizer"] == str(project / "spm.model")
    assert config.policy["path"] == str(project / "gpt2")
    assert config.env["reward"] == f"{REWARD_MODULE}:score"  # code, not a path
    text = (cli_run / "config.toml").read_text()
    # the config as typed stays readable, in the comments on top
    assert 'as typed: env.prompts = "train.jsonl"' in text and 'as typed: policy.path = "gpt2"' in text
    assert f'the run started in "{project}"' in text
    assert recorded_reward_folders(cli_run) == [project]


def test_resume_export_and_the_card_work_from_another_folder(cli_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    header = (cli_run / "config.toml").read_text().split("[algorithm]")[0]
    # the reward module is found where the run first imported it, although the cwd is elsewhere
    done = console(["train", "--resume", cli_run, "--set", "train.steps=3"], cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows(cli_run)[-1]["step"] == 3
    assert (cli_run / "config.toml").read_text().startswith(header)  # a resume keeps the comments
    done = console(["export", cli_run, "model"], cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model"} <= {
        p.name for p in (elsewhere / "model").iterdir()
    }
    out = run_snippet(elsewhere / "model", elsewhere, "print(type(model).__name__, tokenizer.get_piece_size())")
    assert out.split() == ["GPT2LMHeadModel", "48"]


def test_the_run_directory_stays_barred_from_imports_with_the_cwd_on_the_path(cli_run, tmp_path):
    """The CLI puts its folder on the search path; started inside the run directory, a module
    there is still refused (and never runs)."""
    run = tmp_path / "run"
    shutil.copytree(cli_run, run, ignore=shutil.ignore_patterns(".tokenmdp.lock"))
    sentinel = tmp_path / "imported"
    (run / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').close()\ndef score(p, c):\n    return 0.0\n")
    config = run / "config.toml"
    config.write_text(config.read_text().replace(f'"{REWARD_MODULE}:score"', '"evil:score"'))
    done = console(["train", "--resume", "../run", "--set", "train.steps=4"], cwd=run)
    assert done.returncode == 2 and "inside the run directory" in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0
    assert not sentinel.exists()


# --- what a run records and checks ------------------------------------------------------------------


def test_every_path_key_is_made_absolute_once_and_the_rest_is_left_as_typed(tmp_path):
    (tmp_path / "models" / "rm").mkdir(parents=True)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "pairs.jsonl").write_text("")
    config = load_config(
        None,
        [
            *TINY,
            'env.reward=["hf:models/rm", "mod:f", "hf:nowhere"]',
            "policy.path=missing_model",  # does not exist: left as typed, its own check reports it
            "estimator.teacher=teacher",
            "estimator.reward_pairs_file=pairs.jsonl",
            "updater.path=/already/absolute",
        ],
    )
    recorded, typed = absolute_paths(config, tmp_path)
    assert recorded.env["reward"] == [f"hf:{tmp_path / 'models' / 'rm'}", "mod:f", "hf:nowhere"]
    assert recorded.policy["path"] == "missing_model"
    assert recorded.estimator == {
        "teacher": str(tmp_path / "teacher"),
        "reward_pairs_file": str(tmp_path / "pairs.jsonl"),
    }
    assert recorded.updater["path"] == "/already/absolute"
    assert typed == {
        "env.reward": ["hf:models/rm", "mod:f", "hf:nowhere"],
        "estimator.teacher": "teacher",
        "estimator.reward_pairs_file": "pairs.jsonl",
    }
    assert absolute_paths(recorded, tmp_path / "elsewhere") == (recorded, {})  # once: absolute stays
    assert {"prompts", "eval_prompts", "tokenizer"} <= set(PATH_KEYS["env"]) and PATH_KEYS["policy"] == ("path",)


@pytest.fixture
def moved_project(project, tmp_path, monkeypatch):
    """A copy of the project with a run trained in it (paths typed relative), and another folder."""
    root = tmp_path / "project"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("runs"))
    monkeypatch.chdir(root)
    Trainer(load_config(None, [*IN_PROCESS, "run.dir=runs/r"])).train()
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    return root, root / "runs" / "r", other


def one_line(capsys, argv) -> str:
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_a_recorded_path_that_is_gone_is_one_line_naming_the_key_and_the_path(moved_project, capsys):
    root, run, _ = moved_project
    (root / "spm.model").rename(root / "spm.moved")
    err = one_line(capsys, ["train", "--resume", run, "--set", "train.steps=3"])
    assert f"env.tokenizer = '{root / 'spm.model'}'" in err and "no longer exists" in err
    assert f"env.tokenizer = '{root / 'spm.model'}'" in one_line(capsys, ["export", run, "out"])
    (root / "spm.moved").rename(root / "spm.model")
    (root / "held_out.txt").unlink()  # export reads no prompts, so it does not miss them
    assert main(["export", str(run), "out"]) == 0
    assert "env.eval_prompts" in one_line(capsys, ["train", "--resume", run, "--set", "train.steps=3"])
    shutil.rmtree(root / "gpt2")
    assert f"policy.path = '{root / 'gpt2'}'" in one_line(capsys, ["export", run, "out2"])
    assert not (Path("out2")).exists()


def test_a_run_recorded_with_relative_paths_says_where_to_run_from(moved_project, capsys, monkeypatch):
    root, run, _ = moved_project
    config = run / "config.toml"
    config.write_text(config.read_text().replace(f'"{root / "spm.model"}"', '"spm.model"'))
    err = one_line(capsys, ["export", run, "out"])
    assert "env.tokenizer = 'spm.model'" in err and "relative to the folder the run was started in" in err
    monkeypatch.chdir(root)  # from where it started it still works, and a resume records it absolute
    assert main(["train", "--resume", str(run), "--set", "train.steps=3"]) == 0
    assert load_config(config).env["tokenizer"] == str(root / "spm.model")


def test_a_resume_may_name_the_same_file_relative_to_its_own_folder(moved_project, monkeypatch):
    root, run, _ = moved_project
    monkeypatch.chdir(root)
    trainer = Trainer.from_run_dir(run, ["train.steps=3", "env.prompts=train.jsonl"])
    assert trainer.config.env["prompts"] == str(root / "train.jsonl")
    with pytest.raises(ConfigError, match="not change what it trains: env.prompts differ"):
        Trainer.from_run_dir(run, ["env.prompts=held_out.txt"])


# --- LoRA ----------------------------------------------------------------------------------------


def test_a_lora_export_names_its_base_absolutely_and_its_card_loads_from_another_folder(project, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(project)
    run = tmp_path / "lora"
    lora = ["policy.lora={r = 4, alpha = 8}", "updater.lr=0.05", f"run.dir={run}"]
    trainer = Trainer(load_config(None, [*IN_PROCESS, *lora]))
    trainer.train()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["export", str(run), "adapter"]) == 0
    assert main(["export", str(run), "merged", "--merge-lora"]) == 0
    adapter = elsewhere / "adapter"
    fields = json.loads((adapter / "adapter_config.json").read_text())
    assert fields["base_model_name_or_path"] == str(project / "gpt2")
    assert (adapter / "generation_config.json").is_file() and (adapter / "tokenizer.model").is_file()
    assert str(project / "gpt2") in (adapter / "README.md").read_text()
    after = "import torch\nprint(model(torch.tensor([[1, 5, 9, 11]])).logits[0, -1].tolist())"
    from_card = torch.tensor(json.loads(run_snippet(adapter, elsewhere, after)))
    merged = AutoModelForCausalLM.from_pretrained(elsewhere / "merged").eval()
    assert (logits_of(merged, torch.tensor([[1, 5, 9, 11]]))[0, -1] - from_card).abs().max() < 1e-5
    policy = trainer.policy.eval()
    assert (policy(torch.tensor([[1, 5, 9, 11]]))[0, -1] - from_card[: policy.vocab_size]).abs().max() < 1e-5


# --- runs of tokenmdp.train with objects ------------------------------------------------------------


def api_objects() -> dict:
    """The docs' Python API example's objects (a GPT-2 and a word-level tokenizer)."""
    from test_api import DOCS, docs_example

    namespace = {}
    exec(compile(docs_example().split("result = tokenmdp.train(")[0], str(DOCS), "exec"), namespace)
    return namespace


API = {
    "algorithm": {"name": "grpo"},
    "env": {"horizon": 8},
    "train": {"steps": 2, "batch_size": 8, "samples_per_prompt": 4, "progress": False},
}
PROMPTS = ["the cat sat on", "a dog ran", "the kind answer", "a helpful cat"]


def test_an_api_run_saves_its_model_and_tokenizer_so_the_cli_exports_it(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n = api_objects()
    run = tmp_path / "api"
    result = tokenmdp.train(
        API, model=n["model"], tokenizer=n["tokenizer"], reward=n["kindness"], prompts=PROMPTS, run_dir=run
    )
    config = load_config(run / "config.toml")
    assert config.policy["path"] == str(run / "base_model") and config.env["tokenizer"] == str(run / "tokenizer")
    assert (run / "config.toml").read_text().count('"python:object"') == 2  # prompts and reward
    saved = load_file(str(run / "base_model" / "model.safetensors"))
    original = n["model"].state_dict()
    assert all(torch.equal(saved[k], original[k]) for k in saved)  # the model as given: the reference
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["export", str(run), "tuned"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(elsewhere / "tuned").eval()
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    assert (logits_of(exported, ids) - logits_of(result.model.eval(), ids)).abs().max() < 1e-6
    text = "the kind cat sat on a mat"
    assert AutoTokenizer.from_pretrained(elsewhere / "tuned").encode(text) == n["tokenizer"].encode(text)
    out = run_snippet(elsewhere / "tuned", elsewhere, "print(tokenizer.encode('the cat'))")
    assert json.loads(out) == n["tokenizer"].encode("the cat")
    # resumed from Python with the same objects: the run goes on naming its saved folders
    again = tokenmdp.train(
        API,
        overrides=["train.steps=3"],
        model=n["model"],
        tokenizer=n["tokenizer"],
        reward=n["kindness"],
        prompts=PROMPTS,
        run_dir=run,
        resume=True,
    )
    assert again.summary["steps"] == 3 and load_config(run / "config.toml") == load_config(
        None, [], base=_sections(config, steps=3)
    )
    # the CLI resume lacks only what was never saved: the prompts (and the reward)
    capsys.readouterr()
    err = one_line(capsys, ["train", "--resume", run])
    assert "env.prompts was given to tokenmdp.train as a Python object" in err


def _sections(config, steps: int) -> dict:
    from tokenmdp.options import to_dict

    data = to_dict(config)
    data["train"]["steps"] = steps
    return data


def test_an_api_lora_run_saves_the_base_before_peft_wraps_it(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    n = api_objects()
    before = {k: v.clone() for k, v in n["model"].state_dict().items()}
    run = tmp_path / "api_lora"
    result = tokenmdp.train(
        API,
        overrides=["policy.lora={r = 4, alpha = 8}", "updater.lr=0.05"],
        model=n["model"],
        tokenizer=n["tokenizer"],
        reward=n["kindness"],
        prompts=PROMPTS,
        run_dir=run,
    )
    saved = load_file(str(run / "base_model" / "model.safetensors"))
    assert not any("lora" in k for k in saved) and all(torch.equal(saved[k], before[k]) for k in saved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["export", str(run), "adapter"]) == 0 and main(["export", str(run), "merged", "--merge-lora"]) == 0
    assert json.loads((elsewhere / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        run / "base_model"
    )
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    merged = AutoModelForCausalLM.from_pretrained(elsewhere / "merged").eval()
    trained = logits_of(result.model.eval(), ids)
    assert (logits_of(merged, ids) - trained).abs().max() < 1e-5
    after = "import torch\nprint(model(torch.tensor([[1, 4, 5, 6, 7]])).logits[0, -1].tolist())"
    from_card = torch.tensor(json.loads(run_snippet(elsewhere / "adapter", elsewhere, after)))
    assert (from_card - trained[0, -1]).abs().max() < 1e-5


def test_what_export_lacks_is_one_line_and_a_saved_folder_never_replaces_yours(tmp_path, monkeypatch, capsys):
    n = api_objects()
    inputs = dict(model=n["model"], tokenizer=n["tokenizer"], reward=n["kindness"], prompts=PROMPTS)
    run = tmp_path / "api"
    tokenmdp.train(API, run_dir=run, **inputs)
    config = run / "config.toml"
    text = config.read_text()
    monkeypatch.chdir(tmp_path)
    config.write_text(text.replace(f'path = "{run / "base_model"}"', 'path = "python:object"'))
    err = one_line(capsys, ["export", run, "out"])
    assert "holds no base model" in err and "save_pretrained" in err and "resume" not in err
    config.write_text(text.replace(f'tokenizer = "{run / "tokenizer"}"', 'tokenizer = "python:object"'))
    assert "holds no tokenizer" in one_line(capsys, ["export", run, "out"])
    assert not (tmp_path / "out").exists()
    # a folder of yours named like the one the run would save the tokenizer in is never replaced
    mine = tmp_path / "mine"
    (mine / "tokenizer").mkdir(parents=True)
    (mine / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds tokenizer/, which tokenmdp did not write"):
        tokenmdp.train(API, run_dir=mine, overrides=["run.overwrite=true"], **inputs)
    assert [p.name for p in mine.rglob("*")] == ["tokenizer", "tokenizer.json"]


# --- toy runs: explain and compare from another folder ----------------------------------------------


def test_a_teacher_run_resumes_and_explains_from_another_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Trainer(load_config(None, [*TINY, "run.dir=teacher"])).train()
    student = [*TINY, "algorithm.name=inverse-q-distill", "estimator.source=teacher", "estimator.teacher=teacher"]
    Trainer(load_config(None, [*student, "run.dir=student"])).train()
    assert load_config(tmp_path / "student" / "config.toml").estimator["teacher"] == str(tmp_path / "teacher")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = tmp_path / "student"
    assert main(["train", "--resume", str(run), "--set", "train.steps=6"]) == 0
    assert rows(run)[-1]["step"] == 6
    assert main(["explain", str(run), "--samples", "1", "--group-size", "2"]) == 0
    assert (run / "explain" / "index.html").is_file()
    capsys.readouterr()


def test_a_finished_compare_grid_is_read_again_from_another_folder(tmp_path, monkeypatch, capsys):
    grid = tmp_path / "grid.toml"
    settings = ", ".join(json.dumps(s) for s in TINY if not s.startswith("algorithm."))
    grid.write_text(
        f'[compare]\nrecipes = ["reinforce"]\nenvs = ["Pattern"]\nseeds = [0, 1, 2]\nout = "{tmp_path / "out"}"\n'
        f"set = [{settings}]\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(grid), "--jobs", "1"]) == 0
    summary = tmp_path / "out" / "cells" / "reinforce__Pattern__seed0" / "summary.json"
    written = summary.stat().st_mtime_ns
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["compare", str(grid), "--jobs", "1"]) == 0
    assert summary.stat().st_mtime_ns == written  # the finished cell was read, not trained again
    assert "| reinforce | Pattern |" in capsys.readouterr().out


def test_saved_folders_and_their_staging_are_tokenmdps_only_in_a_marked_folder(tmp_path):
    from tokenmdp.training.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "base_model").mkdir()
    (run.path / "base_model" / "model.safetensors").write_text("yours")
    assert run.foreign() == ["base_model/model.safetensors"] and run.clashes() == []
    run.saves = ("base_model",)  # a run that would save the given model there is refused
    assert run.clashes() == ["base_model/"]
    run.saves = ()
    run.claim()  # marked: what an earlier run saved, and a killed run's staging, are tokenmdp's
    (run.path / ".tokenizer.tmp-99999999").mkdir()
    (run.path / ".tokenizer.tmp-99999999" / "tokenizer.json").write_text("{}")
    (run.path / "base_model" / "notes.txt").write_text("mine")
    assert run.foreign() == ["base_model/notes.txt"]
    staged = run.stage("tokenizer", lambda folder: (folder / "tokenizer.json").write_text("{}"))
    run.start_fresh("", {}, staged={"tokenizer": staged})
    assert sorted(p.name for p in run.path.iterdir() if p.is_dir()) == ["base_model", "checkpoints", "tokenizer"]
    assert [p.name for p in (run.path / "base_model").iterdir()] == ["notes.txt"]  # yours stays
    assert [p.name for p in (run.path / "tokenizer").iterdir()] == ["tokenizer.json"]
    run.discard(remove_folder=True)
    left = sorted(p.relative_to(run.path).as_posix() for p in run.path.rglob("*"))
    assert left == ["base_model", "base_model/notes.txt"]
