"""``tokenmdp compare``: recipes x environments x seeds, each cell an ordinary training run,
summarised against the exact optimum in a results folder (docs/compare.md).

A grid file::

    [compare]
    recipes = ["inverse-q", "ppo", "dpo"]   # [recipes.<label>] tables, or registered recipe names
    envs = ["Pattern", "SumThreshold"]      # env names or ids (`tokenmdp envs`)
    seeds = [0, 1, 2]
    out = "runs/compare"
    set = ["train.steps=100"]               # run-config overrides for every cell

    [recipes.ppo]
    config = "ppo.toml"                     # a run config, relative to the grid file
    set = ["updater.lr=1e-3"]               # overrides for this recipe only, after the shared ones

Cell (recipe, env, seed) trains in ``<out>/cells/<recipe>__<Env>__seed<k>/``. Its
``summary.json`` marks it finished, so a rerun skips it: the grid resumes. One ``tokenmdp
compare`` at a time uses an ``out`` folder (a lock, ``<out>/.tokenmdp-compare.lock``).

The modules, one job each: ``grid`` (the grid file, the cells' run configs), ``references``
(the grid's cache of fine-tuned references), ``cells`` (one cell's run and numbers),
``pool`` (cells in worker processes), ``run`` (:func:`run_grid`), ``output`` (the results folder).
"""

from .cells import (
    FRONTIER_BETAS,
    FRONTIER_TOLERANCE,
    TARGET_CLOSURE,
    cell_record,
    exact_frontier,
    first_reaching,
    frontier_excess,
    run_cell,
    tagged_sft_tokens,
)
from .grid import MIN_SEEDS, Cell, CompareOptions, Grid, RecipeEntry, load_grid, plan_cells, short_env
from .output import COLUMNS, PLOTS, markdown_table, summarise, write_csv, write_results
from .references import check_cached_reference, reference_cache
from .run import LOCK, PARTIAL, report_grid, run_grid

__all__ = [
    "COLUMNS",
    "FRONTIER_BETAS",
    "FRONTIER_TOLERANCE",
    "LOCK",
    "MIN_SEEDS",
    "PARTIAL",
    "PLOTS",
    "TARGET_CLOSURE",
    "Cell",
    "CompareOptions",
    "Grid",
    "RecipeEntry",
    "cell_record",
    "check_cached_reference",
    "exact_frontier",
    "first_reaching",
    "frontier_excess",
    "load_grid",
    "markdown_table",
    "plan_cells",
    "reference_cache",
    "report_grid",
    "run_cell",
    "run_grid",
    "short_env",
    "summarise",
    "tagged_sft_tokens",
    "write_csv",
    "write_results",
]
