"""``tokenmdp.train(...)`` from Python objects: the runnable example of docs/text.md, and
what such a run records and refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tokenmdp
from tokenmdp import ConfigError
from tokenmdp.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "text.md"


def docs_example() -> str:
    text = DOCS.read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_python_api_example_in_the_docs_runs(tmp_path, capsys):
    namespace = {"RUN_DIR": tmp_path / "run"}
    exec(compile(docs_example(), str(DOCS), "exec"), namespace)
    result = namespace["result"]
    assert result.summary["steps"] == 3 and result.summary["recipe"] == "grpo"
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert (tmp_path / "run" / "tuned" / "config.json").is_file()
    config = (tmp_path / "run" / "config.toml").read_text()
    # prompts and reward stay objects (never pickled into it); the model and the tokenizer are
    # saved in RUN/base_model and RUN/tokenizer (save_pretrained), so export needs no objects
    assert config.count('"python:object"') == 2
    trained = result.model
    original = namespace["model"]
    ids = torch.tensor([[1, 4, 5, 6]])
    with torch.no_grad():
        assert not torch.allclose(trained(ids).logits, original(ids).logits)  # the copy trained
    assert not any(p.requires_grad for p in original.parameters())  # the given model is the frozen reference
    assert "3 " in capsys.readouterr().out


def test_an_api_run_resumes_from_python_and_the_cli_says_how(tmp_path, capsys):
    namespace = {"RUN_DIR": tmp_path / "run"}
    exec(compile(docs_example(), str(DOCS), "exec"), namespace)
    n = namespace
    again = tokenmdp.train(
        {
            "algorithm": {"name": "grpo"},
            "env": {"horizon": 8},
            "train": {"steps": 3, "batch_size": 8, "samples_per_prompt": 4, "progress": False},
        },
        overrides=["train.steps=4"],
        model=n["model"],
        tokenizer=n["tokenizer"],
        reward=n["kindness"],
        prompts=["the cat sat on", "a dog ran", "the kind answer", "a helpful cat"],
        run_dir=tmp_path / "run",
        resume=True,
    )
    assert again.summary["steps"] == 4
    inputs = dict(
        model=n["model"], tokenizer=n["tokenizer"], reward=n["kindness"], prompts=["the cat sat on", "a dog ran"]
    )
    # a config given with resume=True extends the run as --set does, or is refused naming the key
    longer = tokenmdp.train({"train": {"steps": 5}}, run_dir=tmp_path / "run", resume=True, **inputs)
    assert longer.summary["steps"] == 5
    with pytest.raises(ConfigError, match=r"not change what it trains: algorithm.name differ"):
        tokenmdp.train({"algorithm": {"name": "rloo"}}, run_dir=tmp_path / "run", resume=True, **inputs)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "given to tokenmdp.train as a Python object" in err and err.count("\n") == 1


def test_prompts_as_a_dataset_and_bad_inputs(tmp_path):
    import datasets

    namespace = {"RUN_DIR": tmp_path / "run"}
    source = docs_example().split("result = tokenmdp.train(")[0]  # the objects only
    exec(compile(source, str(DOCS), "exec"), namespace)
    common = dict(model=namespace["model"], tokenizer=namespace["tokenizer"], reward=namespace["kindness"])
    config = {
        "algorithm": {"name": "grpo"},
        "env": {"horizon": 4},
        "train": {"steps": 1, "batch_size": 4, "samples_per_prompt": 4, "progress": False},
    }
    data = datasets.Dataset.from_dict({"question": ["the cat", "a dog ran"], "topic": ["x", "y"]})
    result = tokenmdp.train(
        config, prompts=data, overrides=["env.prompt_key=question"], run_dir=tmp_path / "ds", **common
    )
    assert result.summary["steps"] == 1
    with pytest.raises(ConfigError, match=r"no column 'prompt'; its columns: question, topic"):
        tokenmdp.train(config, prompts=data, run_dir=tmp_path / "bad", **common)
    with pytest.raises(ConfigError, match="no prompts"):
        tokenmdp.train(config, prompts=[], run_dir=tmp_path / "empty", **common)
    with pytest.raises(ConfigError, match="config must be a TOML path, a dict of sections or a Config"):
        tokenmdp.train(42, prompts=["the cat"], **common)


def test_tokenmdp_train_is_a_plain_function_with_its_signature_and_docstring():
    import importlib
    import inspect
    import pydoc

    from tokenmdp.training.api import train

    assert tokenmdp.train is train and inspect.isfunction(tokenmdp.train)
    params = inspect.signature(tokenmdp.train).parameters
    assert list(params)[:5] == ["config", "model", "tokenizer", "reward", "prompts"]
    assert "resume" in params and params["model"].kind is inspect.Parameter.KEYWORD_ONLY
    page = pydoc.render_doc(tokenmdp.train, renderer=pydoc.plaintext)
    assert "train(config" in page and "Train, from a config" in page
    importlib.import_module("tokenmdp.training.trainer")  # importing the package must not shadow the function
    assert tokenmdp.train is train
