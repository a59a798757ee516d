"""``tokenmdp compare``'s entry point: every unfinished cell run (in this process or in
workers) under the ``out`` folder's lock, then the results folder (re)written; or, with
``--report``, the finished cells' results alone (:func:`report_grid`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tqdm.auto import tqdm

from ...errors import ConfigError
from ...plugin.registry import Registry, plugin_manager
from ...training.files import exclusive_lock
from .cells import cell_record, run_cell
from .grid import Grid, plan_cells
from .output import write_results
from .pool import run_in_workers

#: In ``out``: held (``fcntl.flock``) by the one ``tokenmdp compare`` that uses the folder.
LOCK = ".tokenmdp-compare.lock"


@contextlib.contextmanager
def _locked_out(out: Path):
    """Hold ``out``'s lock (``fcntl.flock`` on ``.tokenmdp-compare.lock``) while the block
    runs: a second ``tokenmdp compare`` on the same folder is a one-line error naming the
    holder, instead of two processes rewriting the same cells and results. The operating
    system releases the lock however the process ends."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        open(out / LOCK, "a").close()
    except OSError as exc:
        raise ConfigError(f"compare out {str(out)!r} cannot be used: {exc.strerror or exc}") from None
    with exclusive_lock(out / LOCK, "tokenmdp compare", f"compare out {str(out)!r}", "use another --out"):
        yield


def run_grid(grid: Grid, pm=None, progress: bool = True, jobs: int = 1, threads: int = 1) -> tuple[str, Path]:
    """Run every unfinished cell, then (re)write the results folder; returns the Markdown
    results table and the path of index.html. With ``jobs > 1`` the cells run in that
    many worker processes with ``threads`` torch threads each (the installed plugins only:
    a custom ``pm`` needs ``jobs = 1``). The progress bar shows on a terminal only."""
    if jobs > 1 and pm is not None:
        raise ConfigError("compare --jobs > 1 runs the installed plugins in worker processes; use --jobs 1 here")
    if grid.out.exists() and not grid.out.is_dir():
        raise ConfigError(f"compare out {str(grid.out)!r} is a file, not a folder; name a folder for the results")
    pm = pm if pm is not None else plugin_manager()
    registry = Registry(pm)
    registry.register_envs()
    plan_cells(grid, registry)  # a bad grid fails before the folder is made
    with _locked_out(grid.out):
        cells = plan_cells(grid, registry)  # again under the lock: which cells another run finished
        # seed-major (every recipe's first seed, then the second, ...): a grid stopped part
        # way holds whole seeds of every method, which a partial table can already compare
        todo = sorted((c for c in cells if not c.finished), key=lambda c: c.seed)
        with tqdm(
            total=len(cells),
            initial=len(cells) - len(todo),
            desc="compare",
            unit="cell",
            disable=None if progress else True,  # None: only on a terminal, not in a log
        ) as bar:
            if jobs > 1 and len(todo) > 1:
                run_in_workers(todo, min(jobs, len(todo)), threads, bar)
            else:
                for cell in todo:
                    bar.set_postfix_str(cell.dir.name)
                    run_cell(cell, pm)
                    bar.update()
        records = [cell_record(cell, registry) for cell in cells]
        return write_results(grid, records)


#: ``tokenmdp compare --report`` writes here, inside ``out``: never the grid's own results.
PARTIAL = "partial"


def report_grid(grid: Grid, pm=None) -> tuple[str, Path]:
    """The results folder of the grid's finished cells so far, in ``<out>/partial/``,
    training nothing (``tokenmdp compare --report``): a long grid's table while it runs.
    It takes no lock (the running grid holds it) and writes nothing outside that folder;
    each row counts the seeds it has. Cells finished with another config are refused as
    when the grid runs."""
    pm = pm if pm is not None else plugin_manager()
    registry = Registry(pm)
    registry.register_envs()
    cells = plan_cells(grid, registry)
    finished = [cell for cell in cells if cell.finished]
    if not finished:
        raise ConfigError(f"compare --report: no cell under {str(grid.out / 'cells')!r} has finished yet")
    records = [cell_record(cell, registry) for cell in finished]
    partial = f"partial: {len(finished)} of {len(cells)} cells finished"
    return write_results(grid, records, out=grid.out / PARTIAL, partial=partial)
