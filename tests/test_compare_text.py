"""`tokenmdp compare` on text (issue 28): the paper's grid in small, on a tiny GPT-2, in
seconds: every method trains, every judge scores, the table and the page are written."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json

import pytest
from test_real_lm import text_files  # noqa: F401 (a fixture)

from tokenmdp import cli

RECIPES = ["grpo", "rloo", "inverse-q-distill", "context-distill", "dpo"]


def length_judge(completions, **kwargs):
    return [float(len(c)) for c in completions]


def write_text_grid(root, files, extra_set=(), out="out"):
    shared = [
        "env.id=tokenmdp/Text-v0",
        f"env.prompts={files / 'train.jsonl'}",
        f"env.eval_prompts={files / 'held_out.txt'}",
        f"env.tokenizer={files / 'spm.model'}",
        "env.reward=test_real_lm:length_reward",
        'env.judges=["vader", "test_compare_text:length_judge"]',
        "env.horizon=6",
        "policy.kind=hf",
        f"policy.path={files / 'gpt2'}",
        "reference.init=init",
        "train.steps=2",
        "train.batch_size=8",
        "train.samples_per_prompt=4",
        "train.eval_every=1",
        "train.eval_samples=8",
        *extra_set,
    ]
    guide = '["estimator.guide=\\"answer kindly\\""]'
    path = root / "grid.toml"
    path.write_text(
        f'[compare]\nrecipes = {json.dumps(RECIPES)}\nenvs = ["Text"]\nseeds = [0, 1, 2]\n'
        f'out = "{root / out}"\nset = {json.dumps(shared)}\n'
        f'[recipes.inverse-q-distill]\nset = ["algorithm.name=inverse-q-distill", {guide[1:-1]}]\n'
        f'[recipes.context-distill]\nset = ["algorithm.name=context-distill", {guide[1:-1]}]\n'
        '[recipes.dpo]\nset = ["algorithm.name=dpo", "estimator.num_pairs=16"]\n'
    )
    return path


@pytest.fixture(scope="module")
def text_grid(text_files, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("text_grid")
    grid = write_text_grid(root, text_files)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["compare", str(grid), "--jobs", "1"]) == 0
    return root / "out", printed.getvalue()


def test_every_method_trains_and_every_judge_scores(text_grid):
    out, printed = text_grid
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == sorted(f"{r}__Text__seed{s}" for r in RECIPES for s in (0, 1, 2))
    for cell in cells:
        summary = json.loads((out / "cells" / cell / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["warnings"] == []
        for judge in ("vader", "length_judge"):
            assert {f"judge/{judge}", f"judge/{judge}_se", f"judge/{judge}_win_rate"} <= set(summary)
            assert summary["start"][f"judge/{judge}_win_rate"] == 0.5  # the reference against itself
    # the table: one row per method, the sampled scores and each judge's mean and win rate
    header = printed.splitlines()[next(i for i, line in enumerate(printed.splitlines()) if line.startswith("| recipe"))]
    for column in ("true_reward", "kl_ref", "kl_ref s.e.", "distinct-2", "data tokens", "vader", "vader win rate"):
        assert f" {column} " in header, column
    assert "regret" not in header and "tokens to 90%" not in header  # nothing knows the optimum on text
    for recipe in RECIPES:
        assert f"| {recipe} " in printed


def test_data_tokens_count_what_the_supervision_cost(text_grid):
    out, _ = text_grid
    with open(out / "results.csv") as fh:
        rows = {r["recipe"]: r for r in csv.DictReader(fh)}
    assert float(rows["grpo"]["data_tokens_median"]) == 0  # reward recipes sample only their rollouts
    assert float(rows["context-distill"]["data_tokens_median"]) > 0  # the guided samples
    assert float(rows["dpo"]["data_tokens_median"]) > 0  # the preference pairs
    assert "judge/vader_win_rate_median" in rows["grpo"]


def test_the_page_and_plots_say_what_was_measured(text_grid):
    out, _ = text_grid
    for name in ("results.md", "results.csv", "index.html", "judge_vs_tokens.png", "judge_vs_kl.png"):
        assert (out / name).is_file(), name
    assert (out / "judge_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text()
    assert "Scores are sampled on held-out prompts" in page and "Every score is exact" not in page
    assert page.count("data:image/png;base64,") == 2


def test_every_held_out_response_is_kept_to_judge_again(text_grid, text_files):  # noqa: F811
    out, _ = text_grid
    with gzip.open(out / "completions.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh]
    cells = {row["cell"] for row in rows}
    assert len(cells) == len(RECIPES) * 3
    held_out = set((text_files / "held_out.txt").read_text().splitlines())
    for cell in cells:
        mine = [row for row in rows if row["cell"] == cell]
        policy = [row for row in mine if row["role"] == "policy"]
        reference = [row for row in mine if row["role"] == "reference"]
        assert len(policy) == len(reference) == 8  # train.eval_samples
        assert policy[0]["sampling"]["samples"] == 8 and policy[0]["sampling"]["temperature"] == 1.0
        # the kept scores are the summary's: a judge re-run on these texts sees what the run saw
        summary = json.loads((out / "cells" / cell / "summary.json").read_text())
        for judge in ("vader", "length_judge"):
            assert sum(r[f"judge/{judge}"] for r in policy) / 8 == pytest.approx(summary[f"judge/{judge}"])
            assert sum(r[f"judge/{judge}"] for r in reference) / 8 == pytest.approx(summary["start"][f"judge/{judge}"])
        assert all(length_judge([r["completion"]]) == [r["judge/length_judge"]] for r in policy)
        assert sum(r["reward"] for r in policy) / 8 == pytest.approx(summary["true_reward"])
        assert all(r["prompt"] in held_out for r in mine)  # never a training prompt


def test_a_grid_over_two_models_is_refused_before_training(text_files, tmp_path, capsys):  # noqa: F811
    grid = write_text_grid(tmp_path, text_files)
    dpo = '[recipes.dpo]\nset = ["algorithm.name=dpo", "estimator.num_pairs=16"]'
    assert dpo in grid.read_text()
    grid.write_text(grid.read_text().replace(dpo, dpo.replace('"]', f'", "policy.path={tmp_path}"]')))
    assert cli.main(["compare", str(grid)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train different models or tokenizers" in err
    assert not (tmp_path / "out").exists()
