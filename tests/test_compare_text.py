"""`tokenmdp compare` on text (issue 28): the paper's grid in small, on a tiny GPT-2, in
seconds: every method trains, every judge scores, the table and the page are written."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import re
import statistics

import pytest
from test_real_lm import text_files  # noqa: F401 (a fixture)

from tokenmdp import cli

#: configs/compare_paper_gemma.toml's nine methods
RECIPES = [
    "inverse-q-distill",
    "inverse-q",
    "inverse-q-refreshed",
    "context-distill",
    "ppo",
    "grpo",
    "rloo",
    "dpo",
    "dpo-online",
]
GUIDED = ("inverse-q-distill", "inverse-q", "inverse-q-refreshed", "context-distill")


def length_judge(completions, **kwargs):
    return [float(len(c)) for c in completions]


def write_text_grid(root, files, extra_set=(), out="out", methods=RECIPES):
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
    guide = 'estimator.guide="answer kindly"'
    recipes = {
        "inverse-q-distill": ["algorithm.name=inverse-q-distill", guide],
        "inverse-q": ["algorithm.name=inverse-q", guide],
        "inverse-q-refreshed": ["algorithm.name=inverse-q-distill", 'estimator.phi="policy"', guide],
        "context-distill": ["algorithm.name=context-distill", guide],
        "dpo": ["algorithm.name=dpo", "estimator.num_pairs=16"],
        "dpo-online": ["algorithm.name=dpo-online", "estimator.num_pairs=16"],
    }
    path = root / "grid.toml"
    path.write_text(
        f'[compare]\nrecipes = {json.dumps(list(methods))}\nenvs = ["Text"]\nseeds = [0, 1, 2]\n'
        f'out = "{root / out}"\nset = {json.dumps(shared)}\n'
        + "".join(f"[recipes.{name}]\nset = {json.dumps(keys)}\n" for name, keys in recipes.items() if name in methods)
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


def test_the_reference_and_the_guided_reference_are_rows(text_grid):
    """The two baselines every method is read against: their rows hold the cells' own
    held-out scores of the reference and of the guided reference, one per seed."""
    out, printed = text_grid
    with open(out / "results.csv") as fh:
        rows = {r["recipe"]: r for r in csv.DictReader(fh)}
    summaries = {
        (recipe, seed): json.loads((out / "cells" / f"{recipe}__Text__seed{seed}" / "summary.json").read_text())
        for recipe in RECIPES
        for seed in (0, 1, 2)
    }
    for (recipe, _), summary in summaries.items():  # only the guide methods score the guided reference
        assert ("guided_reference" in summary) == (recipe in GUIDED), recipe
    reference, guided = rows["reference"], rows["guided reference"]
    assert reference["seeds"] == guided["seeds"] == "3"
    assert reference["supervision"] == "-" and guided["supervision"] == "none"  # as the guide methods
    for key in ("kl_ref", "true_reward", "judge/vader", "judge/vader_win_rate", "distinct_2"):
        for row, where in ((reference, "start"), (guided, "guided_reference")):
            per_seed = [summaries["inverse-q", s][where][key] for s in (0, 1, 2)]
            # every guide method of a seed scored the same guided reference (the same draw)
            assert all(summaries[r, s][where] == summaries["inverse-q", s][where] for r in GUIDED for s in (0, 1, 2))
            expected = [statistics.median(per_seed), min(per_seed), max(per_seed)]
            got = [float(row[f"{key}_{part}"]) for part in ("median", "min", "max")]
            assert got == pytest.approx(expected), (row["recipe"], key)
    assert float(reference["kl_ref_max"]) == 0.0 and float(reference["judge/vader_win_rate_max"]) == 0.5
    # the guide moves the reference (a sampled estimate of 8 responses: its sign may not hold)
    assert float(guided["kl_ref_min"]) != 0 and float(guided["kl_ref_max"]) != 0
    assert float(guided["env_tokens_max"]) == float(guided["data_tokens_max"]) == 0  # scored, never trained
    assert re.search(r"\| reference +\| Text +\| - +\|", printed)
    assert re.search(r"\| guided reference +\| Text +\| none +\|", printed)


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
        guided = [row for row in mine if row["role"] == "guided_reference"]
        assert len(guided) == (8 if mine[0]["recipe"] in GUIDED else 0)
        if guided:
            assert sum(r["reward"] for r in guided) / 8 == pytest.approx(summary["guided_reference"]["true_reward"])
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


def test_every_trained_cell_exports_as_a_transformers_folder(text_grid, tmp_path):
    """`tokenmdp export` takes any cell of a text grid (seed 0 of each method here): a
    folder transformers loads, without a pickle."""
    from transformers import AutoModelForCausalLM

    out, _ = text_grid
    for recipe in RECIPES:
        folder = tmp_path / recipe
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["export", str(out / "cells" / f"{recipe}__Text__seed0"), str(folder)]) == 0
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors"} <= names, recipe
        assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
        AutoModelForCausalLM.from_pretrained(folder)


def test_report_tables_the_finished_cells_while_the_grid_holds_its_folder(text_files, tmp_path, capsys):  # noqa: F811
    """`tokenmdp compare --report`: the finished cells' table, plots and page in
    <out>/partial/, with each row's seeds, training nothing, while another compare holds
    the folder's lock; nothing finished yet is one line."""
    import fcntl
    import shutil

    from tokenmdp.reports.compare import LOCK

    grid = write_text_grid(tmp_path, text_files, out="grid", methods=["grpo", "inverse-q", "dpo"])
    out = tmp_path / "grid"
    assert cli.main(["compare", str(grid), "--report"]) == 2
    assert "no cell under" in capsys.readouterr().err and not (out / "partial").exists()
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["compare", str(grid), "--jobs", "1"]) == 0
    finished = ["grpo__Text__seed0", "grpo__Text__seed1", "inverse-q__Text__seed2", "dpo__Text__seed0"]
    for cell in (out / "cells").iterdir():  # as if the grid had run these four only
        if cell.name not in finished:
            shutil.rmtree(cell)
    (out / "results.md").unlink()
    with open(out / LOCK, "w") as lock:  # a running grid holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert cli.main(["compare", str(grid), "--report"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(finished)  # nothing trained
    assert not (out / "results.md").exists()  # the grid's own results are not touched
    partial = out / "partial"
    assert {"results.md", "results.csv", "index.html", "judge_vs_tokens.png", "completions.jsonl.gz"} <= {
        p.name for p in partial.iterdir()
    }
    assert "partial: 4 of 9 cells finished" in (partial / "results.md").read_text()
    assert "partial: 4 of" in (partial / "index.html").read_text()
    with open(partial / "results.csv") as fh:
        seeds = {r["recipe"]: r["seeds"] for r in csv.DictReader(fh)}
    # the guided reference comes from inverse-q's seed 2 only; the reference from seeds 0-2
    assert seeds == {"reference": "3", "guided reference": "1", "inverse-q": "1", "grpo": "2", "dpo": "1"}
    assert re.search(r"\| grpo +\| Text +\| reward +\| 2 +\|", printed)


JUDGE_CALLS = []


def failing_judge(completions, **kwargs):
    """Scores the first cell's evaluations (4 calls: the reference's and steps 0-2), then raises."""
    JUDGE_CALLS.append(len(completions))
    if len(JUDGE_CALLS) > 4:
        raise ValueError("the judge's service is down")
    return [0.0] * len(completions)


@pytest.mark.parametrize(
    ("judge", "message"),
    [("failing_judge", "the judge's service is down"), ("bad_judge", "returned 'high' (str)")],
)
def test_a_judge_that_fails_mid_grid_is_one_line_naming_it_and_finished_cells_stay(
    text_files,  # noqa: F811
    tmp_path,
    capsys,
    judge,
    message,
):
    JUDGE_CALLS.clear()
    grid = write_text_grid(tmp_path, text_files, methods=["grpo"])
    text = grid.read_text()
    assert "test_compare_text:length_judge" in text
    grid.write_text(text.replace("test_compare_text:length_judge", f"test_compare_text:{judge}"))
    assert cli.main(["compare", str(grid), "--jobs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"judge 'test_compare_text:{judge}' (env.judges)" in err[0] and message in err[0], err
    cells = tmp_path / "out" / "cells"
    assert (cells / "grpo__Text__seed0" / "summary.json").is_file()  # the finished cell is kept
    assert not (cells / "grpo__Text__seed1" / "summary.json").exists()


def bad_judge(completions, **kwargs):
    """Numbers for the first cell, then a string."""
    JUDGE_CALLS.append(len(completions))
    return [0.0 if len(JUDGE_CALLS) <= 4 else "high"] * len(completions)


def test_tokens_per_second_cover_the_steps_the_wall_time_covers(text_grid):
    """tokens/s: env tokens over wall seconds, from ``wall_from_step`` on; unknown for a
    summary without it (an older tokenmdp's, whose resumes were not counted)."""
    from tokenmdp.reports.compare.cells import tokens_per_second

    out, _ = text_grid
    summary = json.loads((out / "cells" / "grpo__Text__seed0" / "summary.json").read_text())
    assert summary["wall_from_step"] == 0
    with open(out / "results.csv") as fh:
        grpo = next(r for r in csv.DictReader(fh) if r["recipe"] == "grpo")
    per_seed = []
    for seed in (0, 1, 2):
        s = json.loads((out / "cells" / f"grpo__Text__seed{seed}" / "summary.json").read_text())
        per_seed.append(s["env_tokens"] / s["wall_seconds"])
    assert float(grpo["tokens_per_second_median"]) == pytest.approx(statistics.median(per_seed))
    rows = [{"step": 0, "env_tokens": 0}, {"step": 1, "env_tokens": 40}, {"step": 2, "env_tokens": 90}]
    resumed = {"env_tokens": 90, "wall_seconds": 10.0, "wall_from_step": 1}
    assert tokens_per_second(resumed, rows) == pytest.approx(5.0)  # steps 2 on: 50 tokens in 10 s
    assert tokens_per_second({"env_tokens": 90, "wall_seconds": 10.0}, rows) is None


def test_the_sampled_scores_are_also_means_with_standard_errors_over_seeds(text_grid):
    """Beside median [min, max], a text grid gives the held-out scores as mean ± standard
    error over seeds (stdev / sqrt(seeds)) of each seed's mean over its responses: in
    results.csv (``_mean``, ``_se``), results.md and the page."""
    out, _ = text_grid
    with open(out / "results.csv") as fh:
        rows = {r["recipe"]: r for r in csv.DictReader(fh)}
    for recipe in ("grpo", "inverse-q-distill"):
        summaries = [
            json.loads((out / "cells" / f"{recipe}__Text__seed{s}" / "summary.json").read_text()) for s in (0, 1, 2)
        ]
        for key in ("true_reward", "kl_ref", "distinct_2", "judge/vader", "judge/vader_win_rate", "judge/length_judge"):
            values = [s[key] for s in summaries]
            assert float(rows[recipe][f"{key}_mean"]) == pytest.approx(statistics.fmean(values)), (recipe, key)
            assert float(rows[recipe][f"{key}_se"]) == pytest.approx(statistics.stdev(values) / 3**0.5), (recipe, key)
    assert "env_tokens_mean" not in rows["grpo"]  # budgets are not estimates
    results = (out / "results.md").read_text()
    means = results[results.index("## Mean ± standard error") :]
    mean, se = float(rows["grpo"]["judge/vader_mean"]), float(rows["grpo"]["judge/vader_se"])
    assert re.search(rf"\| grpo +\| Text +\| reward +\| 3 +\|.*\| {mean:.3f} ± {se:.3f} +\|", means)
    assert "<h2>Mean ± standard error</h2>" in (out / "index.html").read_text()


def test_a_mean_of_one_seed_has_no_standard_error():
    from tokenmdp.reports.compare.output import mean_se

    assert mean_se([0.25]) == (0.25, None)
    assert mean_se([None, 0.25, None]) == (0.25, None)
    assert mean_se([]) == (None, None)
    assert mean_se([1.0, 3.0]) == (2.0, pytest.approx(1.0))  # stdev sqrt(2) over sqrt(2)
