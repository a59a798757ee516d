"""The documentation is checked, not trusted.

- Every hook in ``tokenmdp/plugin/hookspecs.py`` has a docstring, a ``## <hook>`` section in
  ``docs/hooks.md``, and is mentioned by at least one other test file (so an untested or
  undocumented hook fails the suite).
- Every key a real (short) training run writes to ``metrics.jsonl`` and ``summary.json``
  is in ``docs/metrics.md``.
- The Python blocks of ``docs/first_advantage.md`` run as-is and train with the
  tutorial's advantage constructor.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

import tokenmdp
from tokenmdp.plugin import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TESTS = ROOT / "tests"

HOOKS = {
    name: fn for name, fn in vars(hookspecs).items() if callable(fn) and getattr(fn, "tokenmdp_spec", None) is not None
}
HOOK_NAMES = sorted(HOOKS)


def backticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)


def test_hookspecs_are_found():
    assert len(HOOK_NAMES) >= 8
    for name in ("tokenmdp_on_train_start", "tokenmdp_on_step_end", "tokenmdp_on_train_end"):
        assert name in HOOKS


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hookspec_has_docstring(hook):
    doc = inspect.getdoc(HOOKS[hook])
    assert doc and doc.strip(), f"hookspec {hook} in tokenmdp/plugin/hookspecs.py has no docstring"


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hook_is_documented(hook):
    text = (DOCS / "hooks.md").read_text()
    headings = {m.group(1) for m in re.finditer(r"^##[ \t]+`?([A-Za-z0-9_]+)`?[ \t]*$", text, flags=re.M)}
    assert hook in headings, f"docs/hooks.md has no '## {hook}' section"


def _test_files() -> list[Path]:
    files = [
        p
        for p in TESTS.rglob("*.py")
        if (p.name.startswith("test_") or p.name == "conftest.py")
        and p.name != Path(__file__).name
        and "fixtures" not in p.relative_to(TESTS).parts
    ]
    return sorted(files)


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_hook_is_tested(hook):
    pattern = re.compile(rf"\b{re.escape(hook)}\b")
    users = [p.name for p in _test_files() if pattern.search(p.read_text())]
    assert users, f"no test file under tests/ (other than {Path(__file__).name}) mentions hook {hook}"


# --- metrics.md against a real run --------------------------------------------------

SHORT_RUN = [
    "train.steps=3",
    "train.eval_every=2",
    "train.progress=false",
    "reference.sft_samples=256",
    "reference.sft_epochs=1",
    "env.vocab_size=4",
    "env.horizon=3",
    "policy.hidden=16",
    "train.batch_size=16",
]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("docs_run") / "run"
    config = load_config(ROOT / "configs" / "demo.toml", [*SHORT_RUN, f"run.dir={run_dir}"])
    summary = Trainer(config).train()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return run_dir, summary, lines


def test_every_logged_metric_is_documented(short_run):
    run_dir, _, lines = short_run
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    keys = set().union(*lines)
    documented = backticked((DOCS / "metrics.md").read_text())
    missing = sorted(keys - documented)
    assert not missing, f"metrics written to metrics.jsonl but not in docs/metrics.md: {missing}"


def test_every_summary_key_is_documented(short_run):
    run_dir, summary, _ = short_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk.keys() == summary.keys()
    documented = backticked((DOCS / "metrics.md").read_text())
    keys = set(on_disk) | set(on_disk["start"])
    missing = sorted(keys - documented)
    assert not missing, f"summary.json keys not in docs/metrics.md: {missing}"


# --- the tutorial runs ------------------------------------------------------------------


def test_first_advantage_tutorial_runs(tmp_path, monkeypatch):
    blocks = python_blocks((DOCS / "first_advantage.md").read_text())
    assert blocks, "docs/first_advantage.md has no ```python blocks"
    code = "\n".join(blocks)
    # The tutorial runs from the repository root; give it the config it reads, in a tmp cwd.
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("tokenmdp_docs_first_advantage")
    module.__file__ = str(tmp_path / "first_advantage.py")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, str(DOCS / "first_advantage.md"), "exec"), module.__dict__)

    constructors = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, tokenmdp.AdvantageConstructor)
        and obj is not tokenmdp.AdvantageConstructor
        and obj.__module__ == module.__name__
    ]
    assert len(constructors) == 1, f"expected one tutorial advantage constructor, found {constructors}"
    name = constructors[0].name

    summaries = list(tmp_path.rglob("summary.json"))
    assert len(summaries) == 1, f"expected one finished run under {tmp_path}, found {summaries}"
    summary = json.loads(summaries[0].read_text())
    assert summary["advantage"] == name
    assert summary["steps"] == 3
    lines = (summaries[0].parent / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]


def test_every_metric_name_has_one_meaning():
    """Across the metric tables of docs/metrics.md (all but summary.json's), a name is
    defined in one row: one meaning per name, whichever plugin logs it."""
    sections = re.split(r"^## ", (DOCS / "metrics.md").read_text(), flags=re.M)
    names = []
    for section in sections:
        if section.startswith("summary.json"):
            continue
        names += re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)
    repeated = sorted({n for n in names if names.count(n) > 1})
    assert len(names) > 30 and not repeated, f"metrics defined in more than one row: {repeated}"
