"""The plugin catalog is a cache of names, never trusted for more (tokenmdp/plugin/catalog.py):
what an env is built from comes from the plugin, and a tampered, malformed or special file
is rebuilt without a traceback or a hang. Each case ends with ``tokenmdp --help`` working
in a fresh process (a timeout turns a hang into a failure) and the catalog rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tokenmdp.plugin import catalog

ROOT = Path(__file__).resolve().parents[1]
#: A fresh process loads the plugins (torch) in a few seconds; a hang on a FIFO never ends.
TIMEOUT = 120


@pytest.fixture
def current(tmp_path, monkeypatch):
    """A current catalog in ``tmp_path``: (its path, its content, the fingerprint)."""
    monkeypatch.setenv("TOKENMDP_CACHE_DIR", str(tmp_path))
    good = catalog.installed()
    path = catalog.catalog_path()
    assert path.parent == tmp_path and catalog._read(path, catalog.fingerprint()) == good
    return path, good, catalog.fingerprint()


def _python(cache: Path, code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENMDP_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT
    )


def _help_works_and_catalog_is_rebuilt(path: Path, good: dict, stamp: str) -> None:
    result = _python(path.parent, "import sys; from tokenmdp.cli import main; sys.exit(main(['--help']))")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "usage: tokenmdp" in result.stdout
    assert path.is_file() and not path.is_symlink()
    # written again, current and well-formed (the fingerprint read now: a source file edited
    # while the test ran changes it, not what the catalog lists)
    rebuilt = catalog._read(path, catalog.fingerprint())
    assert rebuilt is not None and {**rebuilt, "fingerprint": stamp} == good


def _edit(path: Path, change) -> None:
    found = json.loads(path.read_text())
    change(found)
    path.write_text(json.dumps(found))


def _set_kwargs(env_id: str, kwargs: dict):
    def change(found):
        for env in found["envs"]:
            if env["id"] == env_id:
                env["kwargs"] = kwargs

    return change


def test_edited_kwargs_in_the_catalog_are_ignored(current):
    path, good, stamp = current
    _edit(path, _set_kwargs("tokenmdp/Pattern-v0", {"vocab_size": 2, "horizon": 1}))
    code = """
        import gymnasium, tokenmdp
        print(gymnasium.spec("tokenmdp/Pattern-v0").kwargs)
        task = gymnasium.make("tokenmdp/Pattern-v0").unwrapped.task
        print(task.vocab_size, task.horizon)
        """
    result = _python(path.parent, code)
    assert result.returncode == 0, result.stderr
    registered, sizes = result.stdout.splitlines()
    assert registered == "{}"  # the deferred registration carries no kwargs from the file
    from tokenmdp.plugin.registry import Registry, plugin_manager

    default = Registry(plugin_manager()).env("tokenmdp/Pattern-v0").entry_point().unwrapped.task
    assert sizes == f"{default.vocab_size} {default.horizon}" != "2 1"
    _help_works_and_catalog_is_rebuilt(path, good, stamp)


def test_a_reward_put_in_the_catalog_is_never_called(current, tmp_path_factory):
    from tokenmdp.policies.hf import train_sentencepiece

    path, good, stamp = current
    work = tmp_path_factory.mktemp("text")
    victim = work / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("still here")
    (work / "prompts.txt").write_text(f"{victim}\n")  # a reward of shutil:rmtree(prompt, ...) deletes it
    corpus = ["the cat sat on the mat", "a kind answer helps", "the dog ran in the park"] * 20
    (work / "spm.model").write_bytes(train_sentencepiece(corpus, vocab_size=40).serialized_model_proto())
    _edit(path, _set_kwargs("tokenmdp/Text-v0", {"reward": "shutil:rmtree"}))
    code = """
        import gymnasium, tokenmdp
        env = gymnasium.make("tokenmdp/Text-v0", prompts="prompts.txt", tokenizer="spm.model", horizon=2)
        env.reset(seed=0)
        _, reward, terminated, _, _ = env.step(env.unwrapped.task.eos_token)  # the end of a response
        print(reward, terminated)
        """
    result = _python(path.parent, code, cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0.0", "True"]  # no reward given: none paid, nothing called
    assert (victim / "keep.txt").read_text() == "still here"
    _help_works_and_catalog_is_rebuilt(path, good, stamp)


def _drop_first_env_id(found):
    del found["envs"][0]["id"]


def _first(key, value):
    def change(found):
        found["envs"][0][key] = value

    return change


def _top(key, value):
    def change(found):
        found[key] = value

    return change


@pytest.mark.parametrize(
    "change",
    [
        _drop_first_env_id,
        _top("envs", {"tokenmdp/Pattern-v0": {}}),  # envs not a list
        _top("envs", ["tokenmdp/Pattern-v0"]),  # an entry not an object
        _top("rows", [["env", "x", "y"]]),  # a row of 3
        _top("rows", [["env", 1, "y", "z"]]),  # a row with a number
        _top("rows", "env"),
        _top("format", True),  # == 1 in Python, yet not the format
        _first("id", 7),
        _first("id", "no spaces allowed"),
        _first("vector", "yes"),
        _first("description", None),
        _first("plugin", ["toy-envs"]),
        _top("extra", 1),
    ],
    ids=[
        "no-id",
        "envs-not-a-list",
        "env-not-an-object",
        "short-row",
        "row-with-a-number",
        "rows-a-string",
        "format-true",
        "id-a-number",
        "id-not-an-id",
        "vector-a-string",
        "description-null",
        "plugin-a-list",
        "unknown-key",
    ],
)
def test_a_malformed_catalog_with_a_current_fingerprint_is_rebuilt(current, change):
    path, good, stamp = current
    _edit(path, change)
    assert catalog._read(path, stamp) is None
    _help_works_and_catalog_is_rebuilt(path, good, stamp)


@pytest.mark.parametrize(
    "content",
    [b"", b"\xff\xfe not utf-8", b"[" * 100_000 + b"]" * 100_000, b"null", b"[]"],
    ids=["empty", "not-utf8", "nested-too-deep", "null", "a-list"],
)
def test_a_catalog_that_is_not_a_catalog_is_rebuilt(current, content):
    path, good, stamp = current
    path.write_bytes(content)
    _help_works_and_catalog_is_rebuilt(path, good, stamp)


def test_a_fifo_catalog_does_not_block(current):
    path, good, stamp = current
    path.unlink()
    os.mkfifo(path)  # no writer: opening it to read would block (only ever opened in a subprocess here)
    _help_works_and_catalog_is_rebuilt(path, good, stamp)


def test_a_catalog_linked_to_dev_zero_is_not_read(current):
    path, good, stamp = current
    path.unlink()
    path.symlink_to("/dev/zero")  # endless: read whole, it would fill the memory
    _help_works_and_catalog_is_rebuilt(path, good, stamp)
    assert Path("/dev/zero").is_char_device()  # the link was replaced, not its target


def test_an_oversize_catalog_is_rebuilt(current):
    path, good, stamp = current
    text = json.dumps(good)
    path.write_text(text + " " * (catalog.MAX_BYTES + 1 - len(text)))  # valid JSON, one byte too many
    assert json.loads(path.read_text()) == good and catalog._read(path, stamp) is None
    _help_works_and_catalog_is_rebuilt(path, good, stamp)


def test_a_folder_in_the_catalogs_place_costs_only_the_speed(current):
    path, good, stamp = current
    path.unlink()
    path.mkdir()
    result = _python(path.parent, "import sys; from tokenmdp.cli import main; sys.exit(main(['envs']))")
    assert result.returncode == 0 and "tokenmdp/Pattern-v0" in result.stdout, result.stderr
    assert path.is_dir()  # not replaced: no catalog, every command loads the plugins


def test_a_wrong_vector_flag_still_builds_the_plugins_env(tmp_path):
    """The one fact of the catalog that is not a name only picks how the first make_vec
    vectorises: the env is the plugin's either way. A vector form the catalog claims and
    the plugin lacks falls back to Gymnasium's own vectorisation."""
    site, cache = tmp_path / "site", tmp_path / "cache"
    package = site / "tokenmdp_plain"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import tokenmdp
            from tokenmdp.mdp.env import TokenMDPEnv
            from tokenmdp_envs import PatternTask

            @tokenmdp.hookimpl
            def tokenmdp_envs():
                return [tokenmdp.EnvSpec(name="Plain", entry_point=TokenMDPEnv.factory(PatternTask))]
            """
        )
    )
    dist = site / "tokenmdp_plain-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tokenmdp-plain\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tokenmdp]\nplain = tokenmdp_plain\n")
    env = {**os.environ, "TOKENMDP_CACHE_DIR": str(cache), "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def run(code):
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=TIMEOUT
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert run("import tokenmdp") == []  # writes the catalog
    (path,) = cache.glob("plugins-*.json")
    _edit(path, lambda found: [e.update(vector=True) for e in found["envs"] if e["id"] == "tokenmdp/Plain-v0"])
    code = """
        import gymnasium, tokenmdp
        from tokenmdp.plugin.entry_points import InstalledEnv
        assert isinstance(gymnasium.spec("tokenmdp/Plain-v0").vector_entry_point, InstalledEnv)  # the file's claim
        vec = gymnasium.make_vec("tokenmdp/Plain-v0", num_envs=2, vocab_size=3)
        print(type(vec).__name__, vec.num_envs, vec.envs[0].unwrapped.task.vocab_size)
        """
    assert run(code) == ["SyncVectorEnv", "2", "3"]
