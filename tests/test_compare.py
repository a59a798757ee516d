"""`tokenmdp compare`: a tiny grid end to end, its files, resume, and the exact frontier."""

import contextlib
import csv
import io
import json
import struct
from pathlib import Path

import pytest

from tokenmdp import ConfigError, TokenMDPError, cli
from tokenmdp.config import load_config
from tokenmdp.reports import compare
from tokenmdp.reports.compare import cells as compare_cells
from tokenmdp.reports.plots import png_data_uri
from tokenmdp.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

#: Every cell: a few steps of a tiny GRU on V=4, H=3 (about a second each).
TINY = [
    "env.vocab_size=4",
    "env.horizon=3",
    "policy.kind=gru",
    "policy.hidden=16",
    "reference.sft_samples=256",
    "reference.sft_epochs=2",
    "train.steps=4",
    "train.batch_size=16",
    "train.eval_every=2",
]


def write_grid(path: Path, recipes: str, extra: str = "", seeds="[0, 1, 2]", shared=()) -> Path:
    settings = ", ".join(json.dumps(s) for s in [*TINY, *shared])
    path.write_text(
        f'[compare]\nrecipes = {recipes}\nenvs = ["Pattern"]\nseeds = {seeds}\n'
        f'out = "{path.parent / "out"}"\nset = [{settings}]\n{extra}'
    )
    return path


GUIDE = f"""
[recipes.guide]
config = "{ROOT / "configs" / "inverse_q_guide.toml"}"
set = ["reference.sft_samples=256", "reference.tagged_samples=128"]
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """reinforce (a registered name, default config) and the guide recipe, 3 seeds, via the CLI."""
    grid = write_grid(tmp_path_factory.mktemp("grid") / "grid.toml", '["reinforce", "guide"]', GUIDE)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["compare", str(grid)]) == 0
    return grid, grid.parent / "out", stdout.getvalue()


def test_every_file_is_written_and_the_table_printed(finished):
    _, out, printed = finished
    for name in ["results.md", "results.csv", "index.html", *compare.PLOTS]:
        assert (out / name).is_file(), name
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == [f"{r}__Pattern__seed{s}" for r in ("guide", "reinforce") for s in (0, 1, 2)]
    assert all((out / "cells" / c / "summary.json").is_file() for c in cells)
    assert "| reinforce | Pattern | reward" in printed and "| guide     | Pattern | none" in printed
    assert printed.rstrip().endswith(f"index.html: {out / 'index.html'}")


def test_plots_are_real_pngs(finished):
    _, out, _ = finished
    for name in compare.PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
        assert width >= 400 and height >= 300, (name, width, height)
        assert len(data) > 15_000, f"{name} is only {len(data)} bytes: an empty figure?"


def test_html_page_inlines_every_plot(finished):
    _, out, _ = finished
    page = (out / "index.html").read_text()
    for name in compare.PLOTS:
        assert png_data_uri(out / name) in page, f"{name} is not inlined in index.html"
    assert 'src="http' not in page and "<link" not in page  # self-contained
    assert page.count("<tr>") == 1 + 2  # header + one row per recipe x env


def test_html_page_escapes_what_the_grid_puts_in(tmp_path):
    from tokenmdp.reports.compare import output

    for name in compare.PLOTS:
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    record = {"recipe": "a<b", "env": "tokenmdp/X&Y-v0", "seed": 0, "supervision": "none", "true_reward": 1.0}
    page = output._html_page('grid <line> & "quotes"', compare.summarise([record]), tmp_path)
    assert "<td>a&lt;b</td><td>X&amp;Y</td>" in page and "grid &lt;line&gt; &amp; &quot;quotes&quot;." in page
    assert "a<b" not in page and "<line>" not in page
    assert page.count("<tr>") == 1 + 1 and page.startswith("<!doctype html>") and page.endswith("</html>\n")


def test_tables_have_every_column_median_and_range(finished):
    _, out, _ = finished
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["recipe"], r["env"], r["supervision"], r["seeds"]) for r in rows] == [
        ("reinforce", "tokenmdp/Pattern-v0", "reward", "3"),
        ("guide", "tokenmdp/Pattern-v0", "none", "3"),
    ]
    for key in [
        "true_reward",
        "kl_ref",
        "regret",
        "kl_to_optimal",
        "credit_corr",
        "response_length",
        "optimal_length",
        "data_tokens",
        "tokens_to_90",
        "tokens_to_90_with_data",
        "wall_seconds",
    ]:
        for r in rows:
            low, mid, high = (float(r[f"{key}_{s}"]) for s in ("min", "median", "max"))
            assert low <= mid <= high, (key, r)
    assert rows[0]["ceiling_median"] == "" and 0 <= float(rows[1]["ceiling_median"]) <= 1
    # Pattern without EOS: every response, the policy's and pi*'s, is horizon (3) tokens long
    for r in rows:
        for key in ("response_length", "optimal_length"):
            assert float(r[f"{key}_min"]) == pytest.approx(3.0, abs=1e-9) == float(r[f"{key}_max"])
    md = (out / "results.md").read_text()
    for key, title in compare.COLUMNS:
        # no length varies without an EOS: the table leaves those two columns to the CSV
        assert (title in md) == (key not in ("response_length", "optimal_length")), title
    assert md.count("| Pattern |") == 2


def test_guide_tokens_count_its_tagged_sft_data(finished):
    grid, out, _ = finished
    for r in _records(grid):
        extras = json.loads((out / "cells" / f"{r['recipe']}__Pattern__seed{r['seed']}" / "compare.json").read_text())
        if r["recipe"] == "guide":
            assert 128 < extras["tagged_sft_tokens"] <= 128 * 3  # 128 tagged responses of 1..3 tokens
        # only the recipe that reads the guide pays for tagged data (inf + n == inf: never reached)
        tagged = extras["tagged_sft_tokens"] if r["recipe"] == "guide" else 0
        assert r["tokens_to_90_with_data"] == r["tokens_to_90"] + tagged
        assert r["data_tokens"] == tagged
    rows = [{"closure": 0.0, "env_tokens": 0}, {"closure": 0.95, "env_tokens": 96}]
    assert compare.first_reaching(rows) is rows[1] and compare.first_reaching(rows[:1]) is None


def _records(grid):
    from tokenmdp.plugin.registry import Registry, plugin_manager

    registry = Registry(plugin_manager())
    registry.register_envs()
    return [compare.cell_record(c, registry) for c in compare.plan_cells(compare.load_grid(grid), registry)]


def test_every_trained_policy_is_on_or_below_the_exact_frontier(finished):
    """For every policy, E[R] - b KL(pi||pi_ref) <= J*_b for every b: the frontier's supporting
    lines. Both sides are exact, so this checks that the solver and the evaluator agree."""
    grid, _, _ = finished
    records = _records(grid)
    assert len(records) == 6
    for r in records:
        frontier = r["frontier"]
        assert len(frontier) >= 40
        at_run_beta = next(f for f in frontier if f["beta"] == 1.0)
        # the compare's solver saw the run's own reference: same J* as the trainer's evaluator
        assert at_run_beta["j_star"] == pytest.approx(r["eval_rows"][0]["j_star"], abs=1e-9)
        for row in r["eval_rows"]:
            for f in frontier:
                slack = f["j_star"] - (row["true_reward"] - f["beta"] * row["kl_ref"])
                assert slack >= -compare.FRONTIER_TOLERANCE, (r["recipe"], r["seed"], row["step"], f["beta"])
        assert r["frontier_excess"] <= compare.FRONTIER_TOLERANCE
        # the sweep traces the curve: KL(pi*_b || pi_ref) falls as b grows (flat, up to rounding,
        # where pi*_b is already all but greedy)
        kls = [f["kl_ref"] for f in frontier]
        assert all(a >= b - 1e-9 for a, b in zip(kls, kls[1:])) and kls[0] > 10 * kls[-1]


class Counting(Trainer):
    """Records which cells were trained, and can crash one cell at one step."""

    trained: list = []
    crash: tuple | None = None  # (cell folder name, step)

    def train(self):
        Counting.trained.append((self.run_dir.name, self.resume))
        return super().train()

    def train_step(self, step):
        if Counting.crash == (self.run_dir.name, step):
            raise KeyboardInterrupt
        return super().train_step(step)


@pytest.fixture
def counting(monkeypatch):
    Counting.trained, Counting.crash = [], None
    monkeypatch.setattr(compare_cells, "Trainer", Counting)  # where run_cell looks it up
    return Counting


def test_rerun_recomputes_nothing(finished, counting):
    grid, out, _ = finished
    summaries = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")}
    compare.run_grid(compare.load_grid(grid), progress=False)
    assert counting.trained == []
    assert {p: p.stat().st_mtime_ns for p in summaries} == summaries


def test_interrupted_grid_resumes_without_recomputing(tmp_path, counting):
    grid = write_grid(tmp_path / "grid.toml", '["reinforce"]', shared=["run.checkpoint_every=2"])
    counting.crash = ("reinforce__Pattern__seed1", 3)  # after seed 0 finished and seed 1's step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        compare.run_grid(compare.load_grid(grid), progress=False)
    done = tmp_path / "out/cells/reinforce__Pattern__seed0/summary.json"
    first_mtime = done.stat().st_mtime_ns
    counting.trained, counting.crash = [], None
    compare.run_grid(compare.load_grid(grid), progress=False)
    # seed 0 untouched; seed 1 continued from its checkpoint; seed 2 from scratch
    assert counting.trained == [("reinforce__Pattern__seed1", True), ("reinforce__Pattern__seed2", False)]
    assert done.stat().st_mtime_ns == first_mtime
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "out/cells/reinforce__Pattern__seed1/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 1, 2, 3, 4]
    assert (tmp_path / "out/index.html").is_file()


def test_finished_cell_with_another_config_is_refused(tmp_path, counting):
    grid = write_grid(tmp_path / "grid.toml", '["reinforce"]')
    compare.run_grid(compare.load_grid(grid), progress=False)
    with pytest.raises(ConfigError, match=r"finished with another config \(differs in: train\)"):
        compare.run_grid(compare.load_grid(grid, ["train.steps=6"]), progress=False)


@pytest.mark.parametrize(
    "edit, message",
    [
        (['compare.recipes=["reinforce", "nope"]'], r"unknown recipe 'nope'; available: .*ppo"),
        (['compare.envs=["Nowhere"]'], r"unknown env 'Nowhere'; available: .*tokenmdp/Pattern-v0"),
        (["compare.seeds=[0, 1]"], r"at least 3 seeds"),
        (["compare.colour=1"], r"unknown option\(s\) colour; valid options: recipes, envs, seeds, out, set"),
        (["train.stepz=3"], r"unknown option\(s\) stepz"),
    ],
)
def test_bad_grids_fail_before_training(tmp_path, counting, edit, message):
    grid = write_grid(tmp_path / "grid.toml", '["reinforce"]')
    with pytest.raises(TokenMDPError, match=message):
        compare.run_grid(compare.load_grid(grid, edit), progress=False)
    assert counting.trained == []


def test_cli_error_is_one_line(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.toml", '["reinforce"]', seeds="[0]")
    assert cli.main(["compare", str(grid)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenmdp: error: [compare]: seeds must list at least 3") and "\n" not in err


@pytest.mark.parametrize(
    "name, cells",
    [
        ("compare.toml", 5 * 3 * 3),
        ("compare_demo.toml", 3 * 2 * 3),
        ("compare_paper_gemma.toml", 9 * 1 * 3),
        ("compare_grpo_family.toml", 8 * 3 * 3),
    ],
)
def test_shipped_grids_plan_and_share_one_reference(name, cells, tmp_path):
    """Every cell of the shipped grids is a valid run; all recipes of one (env, seed) start
    from the same reference (METHOD.md section 5), so their regrets share one scale."""
    from tokenmdp.plugin.registry import Registry, plugin_manager

    registry = Registry(plugin_manager())
    registry.register_envs()
    planned = compare.plan_cells(compare.load_grid(ROOT / "configs" / name, out=str(tmp_path)), registry)
    assert len(planned) == cells
    references = {}
    for cell in planned:
        c = cell.config
        # beta shapes a fine-tuned reference (its tilt); a pretrained one ("init") is the model itself
        key = (c.reference, c.policy, c.env, c.train.seed, c.train.beta if c.reference.init == "sft" else None)
        references.setdefault((cell.env, cell.seed), set()).add(repr(key))
    assert all(len(keys) == 1 for keys in references.values())


# --- parallel cells and the shared reference ---------------------------------------------


def _results_without_wall_time(out: Path) -> list[dict]:
    with open(out / "results.csv") as fh:
        return [{k: v for k, v in row.items() if "wall" not in k} for row in csv.DictReader(fh)]


def test_parallel_cells_give_the_serial_results(tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count, so the serial cells compute the same floats
    (tmp_path / "serial").mkdir()
    (tmp_path / "parallel").mkdir()
    try:
        serial = write_grid(tmp_path / "serial" / "grid.toml", '["reinforce", "guide"]', GUIDE)
        compare.run_grid(compare.load_grid(serial), progress=False, jobs=1)
        parallel = write_grid(tmp_path / "parallel" / "grid.toml", '["reinforce", "guide"]', GUIDE)
        compare.run_grid(compare.load_grid(parallel), progress=False, jobs=2)
    finally:
        torch.set_num_threads(before)
    assert _results_without_wall_time(tmp_path / "serial" / "out") == _results_without_wall_time(
        tmp_path / "parallel" / "out"
    )
    # bit-equal: a worker process runs the same code with the same seeds and the same thread
    # count (1) as the serial cell, so it makes the same floating-point operations in the same order
    for cell in (tmp_path / "serial" / "out" / "cells").iterdir():
        twin = tmp_path / "parallel" / "out" / "cells" / cell.name
        assert (cell / "metrics.jsonl").read_text() == (twin / "metrics.jsonl").read_text(), cell.name


def test_cells_with_one_reference_key_fine_tune_it_once_and_match_a_fresh_fine_tune(tmp_path, counting):
    import torch

    from tokenmdp.training.checkpoints import read_weights

    grid = write_grid(tmp_path / "grid.toml", '["reinforce", "guide"]', GUIDE, shared=())
    compare.run_grid(compare.load_grid(grid), progress=False)
    cache = tmp_path / "out" / "references"
    # reinforce and guide differ in their reference (guide adds tagged samples): two keys per seed
    assert len(list(cache.glob("*.safetensors"))) == 6
    cell = tmp_path / "out" / "cells" / "reinforce__Pattern__seed1"
    config = load_config(cell / "config.toml", [f"run.dir={tmp_path / 'fresh'}"])
    Trainer(config).train()  # no cache: its own fine-tune
    cached, fresh = read_weights(cell / "reference.pt"), read_weights(tmp_path / "fresh" / "reference.pt")
    # bit-equal: the cache holds the output of the same fine-tune (same code, seed and data)
    assert cached.keys() == fresh.keys() and all(torch.equal(cached[k], fresh[k]) for k in cached)
    assert (cell / "metrics.jsonl").read_text() == (tmp_path / "fresh" / "metrics.jsonl").read_text()


def test_the_cli_runs_cells_in_parallel_by_default_and_checks_jobs(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.toml", '["reinforce"]')
    assert cli.main(["compare", str(grid), "--jobs", "0"]) == 2
    assert "--jobs and --threads must be at least 1" in capsys.readouterr().err
    assert cli.main(["compare", str(grid), "--jobs", "2"]) == 0
    assert len(list((tmp_path / "out" / "cells").glob("*/summary.json"))) == 3
