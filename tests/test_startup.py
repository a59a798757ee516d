"""Start-up: the quick commands read the plugin catalog instead of importing torch, and the
catalog follows every change of what it was built from (tokenmdp/plugin/catalog.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import gymnasium

from tokenmdp.plugin import catalog, entry_points
from tokenmdp.plugin.registry import Registry, plugin_manager

HEAVY = ("torch", "matplotlib", "transformers", "tensorboard", "datasets")

# runs a CLI command in-process, then says which heavy packages it imported
PROBE = textwrap.dedent(
    """
    import sys
    from tokenmdp.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
    heavy = [m for m in {heavy!r} if m in sys.modules]
    print("PROBE", code, ",".join(heavy) or "-")
    """
).format(heavy=HEAVY)


def _run(args, cache, **env):
    full = {**os.environ, "TOKENMDP_CACHE_DIR": str(cache), **env}
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=full)


def _printed(result):
    return [s for s in result.stdout.splitlines() if not s.startswith("PROBE")]


def _probe(result):
    line = [s for s in result.stdout.splitlines() if s.startswith("PROBE")][-1]
    _, code, heavy = line.split()
    return int(code), heavy


def test_the_quick_commands_import_no_heavy_package_once_the_catalog_is_written(tmp_path):
    cold = _run(["plugins"], tmp_path)
    assert _probe(cold) == (0, "torch")  # the first command loads the plugins and writes the catalog
    assert len(list(tmp_path.glob("plugins-*.json"))) == 1
    for args in (["--help"], ["plugins"], ["envs"]):
        assert _probe(_run(args, tmp_path)) == (0, "-"), args
    code = f"import sys, tokenmdp; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TOKENMDP_CACHE_DIR": str(tmp_path)},
    ).stdout
    assert out.strip() == "[]"


def test_the_catalog_lists_what_loading_the_plugins_lists(tmp_path):
    for args in (["plugins"], ["envs"]):
        fresh = _printed(_run(args, "off"))
        _run(args, tmp_path)  # writes the catalog
        cached = _run(args, tmp_path)
        assert _probe(cached)[1] == "-"
        assert _printed(cached) == fresh
        assert any("tokenmdp/Pattern-v0" in line for line in fresh)


def _outside_plugin(site, description):
    """An installed distribution with one entry point whose plugin contributes one env."""
    dist = site / "tokenmdp_mine-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tokenmdp-mine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tokenmdp]\nmine = tokenmdp_mine\n")
    package = site / "tokenmdp_mine"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(
        textwrap.dedent(
            f"""
            import tokenmdp

            @tokenmdp.hookimpl
            def tokenmdp_envs():
                return [tokenmdp.EnvSpec(name="Mine", entry_point=dict, description={description!r})]
            """
        )
    )


def test_a_changed_plugin_file_rebuilds_the_catalog(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache"
    env = {"PYTHONPATH": str(site)}
    _outside_plugin(site, "first")
    assert "| tokenmdp/Mine-v0 " in _run(["envs"], cache, **env).stdout
    assert "first" in _run(["envs"], cache, **env).stdout
    _outside_plugin(site, "second, a longer description")  # a new size, whatever the clock says
    after = _run(["envs"], cache, **env)
    assert "second, a longer description" in after.stdout and "first" not in after.stdout
    blocked = _run(["envs"], cache, **env, TOKENMDP_DISABLE_PLUGINS="mine")
    assert "Mine" not in blocked.stdout and "tokenmdp/Pattern-v0" in blocked.stdout
    without = _run(["envs"], cache)  # the distribution gone: no entry point
    assert "Mine" not in without.stdout


def test_a_plugin_that_cannot_be_imported_is_an_error_every_time(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache"
    _outside_plugin(site, "ok")
    (site / "tokenmdp_mine" / "__init__.py").write_text("raise ImportError('no such thing')\n")
    for _ in range(2):  # never catalogued: the second run says it too
        result = _run(["plugins"], cache, PYTHONPATH=str(site))
        assert _probe(result)[0] == 2
        errors = [line for line in result.stderr.splitlines() if line.startswith("tokenmdp: error:")]
        assert errors == ["tokenmdp: error: plugin 'mine' (tokenmdp_mine) failed to import: no such thing"]


def test_a_corrupt_or_foreign_catalog_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMDP_CACHE_DIR", str(tmp_path))
    expected = catalog.installed()
    path = catalog.catalog_path()
    for junk in ("{not json", json.dumps({"format": 1, "fingerprint": "other", "rows": [], "envs": []})):
        path.write_text(junk)
        assert catalog.installed() == expected
        assert json.loads(path.read_text()) == expected
    assert [e["id"] for e in expected["envs"]] == [e.obj.id for e in Registry(plugin_manager()).envs.values()]


def test_without_a_writable_folder_the_catalog_is_only_slower(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TOKENMDP_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    assert catalog.installed()["rows"] == [list(r) for r in Registry(plugin_manager()).rows()]
    monkeypatch.setenv("TOKENMDP_CACHE_DIR", "off")
    assert catalog.catalog_path() is None
    assert catalog.installed()["envs"]


def test_without_a_home_directory_there_is_no_catalog_and_no_error(monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("TOKENMDP_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(catalog.Path, "home", staticmethod(no_home))
    assert catalog.cache_dir() is None
    assert catalog.installed()["envs"]
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert catalog.cache_dir() == catalog.Path("/somewhere/tokenmdp")


def test_registered_entry_points_load_the_plugins_on_first_use():
    gymnasium.registry.pop("tokenmdp/SumMod-v0", None)
    catalog.register_installed_envs()
    deferred = gymnasium.spec("tokenmdp/SumMod-v0")
    assert isinstance(deferred.entry_point, entry_points.InstalledEnv)
    env = gymnasium.make("tokenmdp/SumMod-v0", vocab_size=3, horizon=2)
    assert env.unwrapped.task.vocab_size == 3
    # the first env made replaced the deferred entries with the plugins' own
    assert not isinstance(gymnasium.spec("tokenmdp/SumMod-v0").entry_point, entry_points.InstalledEnv)
    vec = gymnasium.make_vec("tokenmdp/SumMod-v0", num_envs=2, vocab_size=3, horizon=2)
    assert vec.num_envs == 2
