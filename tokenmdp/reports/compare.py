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
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import json
import math
import os
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import torch
from tqdm.auto import tqdm

from ..config import SECTIONS, Config, load_config, merge, parse_override, read_toml
from ..errors import ConfigError
from ..mdp.solver import solve, tree_logprobs
from ..options import build, to_dict
from ..plugin.composition import compose, with_recipe_defaults
from ..plugin.registry import Registry, plugin_manager
from ..policies import build_policy
from ..training import rundir
from ..training.models import reference_key
from ..training.rundir import absolute_paths, atomic_write_text, exclusive_lock
from ..training.sft import make_sft_data
from ..training.trainer import (
    Trainer,
    TrainingInterrupted,
    latest_checkpoint,
    load_reference,
    load_task,
)
from .tables import markdown

#: The issue asks for a spread across seeds; fewer than 3 cannot show one honestly.
MIN_SEEDS = 3
#: "Tokens to 90% of the achievable improvement": first evaluation with closure >= this.
TARGET_CLOSURE = 0.9
#: The beta sweep that traces the exact reward-KL frontier (1/128 .. 128, 4 points per octave).
FRONTIER_BETAS = tuple(2.0 ** (k / 4) for k in range(-28, 29))
#: Allowed slack in ``E[R] - b KL <= J*_b``: both sides are exact float64 sums.
FRONTIER_TOLERANCE = 1e-6
#: (key, header) of the columns that show median [min, max] across seeds, in table order.
COLUMNS = [
    ("true_reward", "true_reward"),
    ("kl_ref", "kl_ref"),
    ("regret", "regret"),
    ("kl_to_optimal", "kl_to_optimal"),
    ("credit_corr", "credit_corr"),
    ("ceiling", "ceiling"),
    ("data_tokens", "data tokens"),
    ("tokens_to_90", "tokens to 90% (RL)"),
    ("tokens_to_90_with_data", "tokens to 90% (+ data)"),
    ("wall_seconds", "wall s"),
]
PLOTS = {"regret_vs_tokens.png": "Regret against environment tokens", "reward_kl_frontier.png": "Reward-KL frontier"}
#: In ``out``: held (``fcntl.flock``) by the one ``tokenmdp compare`` that uses the folder.
LOCK = ".tokenmdp-compare.lock"


def _strings(instance, attribute, value):
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{attribute.name} must be a list of non-empty strings (got {list(value)!r})")


def _names(instance, attribute, value):
    _strings(instance, attribute, value)
    if not value or len(set(value)) != len(value):
        raise ValueError(f"{attribute.name} must list at least one name, each once (got {list(value)!r})")
    bad = [v for v in value if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v.split("/")[-1])]
    if bad:
        raise ValueError(f"{attribute.name}: {bad[0]!r} cannot name a folder (letters, digits, _ . - only)")


def _seeds(instance, attribute, value):
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value) or len(set(value)) != len(value):
        raise ValueError(f"seeds must be distinct integers >= 0 (got {list(value)!r})")
    if len(value) < MIN_SEEDS:
        raise ValueError(f"seeds must list at least {MIN_SEEDS} seeds for a min-max spread (got {list(value)!r})")


@attrs.frozen
class CompareOptions:
    """The ``[compare]`` table."""

    recipes: tuple[str, ...] = attrs.field(default=(), validator=_names)
    envs: tuple[str, ...] = attrs.field(default=(), validator=_names)
    seeds: tuple[int, ...] = attrs.field(default=(0, 1, 2), validator=_seeds)
    out: str = "runs/compare"
    set: tuple[str, ...] = attrs.field(default=(), validator=_strings)


@attrs.frozen
class RecipeEntry:
    """A ``[recipes.<label>]`` table: a run config (relative to the grid file) and overrides."""

    config: str | None = None
    set: tuple[str, ...] = attrs.field(default=(), validator=_strings)


@attrs.frozen
class Grid:
    options: CompareOptions
    recipes: dict[str, RecipeEntry]
    #: Where ``[recipes.*] config`` paths are read from: the grid file's folder.
    base_dir: Path
    #: ``--set`` overrides of run-config sections (``train.steps=...``), applied last.
    cell_overrides: tuple[str, ...] = ()

    @property
    def out(self) -> Path:
        return Path(self.options.out)


@attrs.frozen
class Cell:
    recipe: str  # the grid's label
    env: str  # env id
    seed: int
    config: Config

    @property
    def dir(self) -> Path:
        return Path(self.config.run.dir)

    @property
    def finished(self) -> bool:
        return (self.dir / "summary.json").is_file()


def load_grid(path: str | Path, overrides: list[str] = (), out: str | None = None) -> Grid:
    """Read a grid file. ``--set compare.*``/``recipes.*`` edit the grid; any run-config
    section (``train.steps=...``) goes to every cell, after the grid's own overrides."""
    path = Path(path)
    data = read_toml(path, "compare config")
    cell_overrides = []
    for text in overrides:
        key_path, value = parse_override(text)
        if key_path[0] in SECTIONS:
            cell_overrides.append(text)
        else:
            merge(data, key_path, value)
    unknown = sorted(set(data) - {"compare", "recipes"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {', '.join(unknown)}; valid sections: compare, recipes "
            f"(run-config overrides go in compare.set)"
        )
    if out is not None:
        data.setdefault("compare", {})["out"] = out
    options = build(CompareOptions, data.get("compare"), "[compare]")
    tables = data.get("recipes", {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError("[recipes] must hold one table per recipe, e.g. [recipes.ppo]")
    extra = sorted(set(tables) - set(options.recipes))
    if extra:
        raise ConfigError(f"[recipes.{extra[0]}] is not in [compare] recipes = {list(options.recipes)}")
    # A label without a table is a registered recipe name with the default run config.
    entries = {
        label: build(RecipeEntry, tables[label], f"[recipes.{label}]")
        if label in tables
        else RecipeEntry(set=(f"algorithm.name={label}",))
        for label in options.recipes
    }
    return Grid(options, entries, path.parent, tuple(cell_overrides))


def plan_cells(grid: Grid, registry: Registry) -> list[Cell]:
    """Every cell's run config, all checked (names, options, compositions) before any runs."""
    env_ids = [registry.env(name).id for name in grid.options.envs]  # an unknown name lists the ids
    cells = []
    for label, entry in grid.recipes.items():
        config_path = grid.base_dir / entry.config if entry.config else None
        for env_id in env_ids:
            for seed in grid.options.seeds:
                run_dir = grid.out / "cells" / f"{label}__{short_env(env_id)}__seed{seed}"
                try:
                    config = load_config(
                        config_path,
                        [
                            *grid.options.set,
                            *entry.set,
                            *grid.cell_overrides,
                            f"env.id={env_id}",
                            f"train.seed={seed}",
                            f"run.dir={run_dir}",
                            "train.progress=false",
                            "run.overwrite=true",
                        ],
                    )
                except ConfigError as exc:
                    raise ConfigError(f"[recipes.{label}]: {exc}") from None
                if config.algorithm.name is None:
                    raise ConfigError(
                        f"[recipes.{label}]: the run config must name a recipe (algorithm.name), "
                        "whose supervision the table reports"
                    )
                compose(registry, config)  # an unknown recipe lists the registered ones
                config = with_recipe_defaults(registry, config)[0]  # as the cell's run records it
                # the paths the cell records (absolute, as every run records them), so that a
                # finished cell's config.toml compares equal to its plan from any folder
                cells.append(Cell(label, env_id, seed, absolute_paths(config)[0]))
    for cell in cells:
        recorded = _recorded_config(cell)
        if cell.finished and recorded != cell.config:
            raise ConfigError(
                f"cell {cell.dir} finished with another config (differs in: {_differences(recorded, cell.config)}); "
                f"use another --out, or delete that folder to rerun it"
            )
    return cells


def short_env(env_id: str) -> str:
    """``tokenmdp/Pattern-v0`` -> ``Pattern``: folder names and table cells."""
    return env_id.split("/")[-1].removesuffix("-v0")


def _recorded_config(cell: Cell) -> Config | None:
    path = cell.dir / "config.toml"
    return load_config(path) if path.is_file() else None


def _differences(a: Config | None, b: Config) -> str:
    if a is None:
        return "config.toml is missing"
    a, b = to_dict(a), to_dict(b)
    return ", ".join(s for s in SECTIONS if a.get(s) != b.get(s)) or "?"


def reference_cache(cell: Cell) -> Path:
    """The grid's folder of fine-tuned references (one per env, seed, policy and reference)."""
    return cell.dir.parent.parent / "references"


def _reference_files(cell: Cell) -> tuple[Path, Path] | None:
    """``(KEY.safetensors, KEY.json)`` of the cell's entry in the reference cache (as
    ``training/models.py`` writes them), or None when its reference is not fine-tuned."""
    if cell.config.reference.init != "sft":
        return None
    key = reference_key(cell.config)
    return reference_cache(cell) / f"{key}.safetensors", reference_cache(cell) / f"{key}.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_problem(data: bytes) -> str | None:
    """What is wrong with a ``KEY.json`` (the SFT losses and the tagged-SFT tokens), or None."""
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        return "is not JSON"
    if not isinstance(meta, dict) or set(meta) != {"losses", "tagged_sft_tokens"}:
        return "does not hold exactly losses and tagged_sft_tokens"
    losses, tagged = meta["losses"], meta["tagged_sft_tokens"]
    if not isinstance(losses, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in losses
    ):
        return "has losses that are not a list of finite numbers"
    if isinstance(tagged, bool) or not isinstance(tagged, int) or tagged < 0:
        return "has a tagged_sft_tokens that is not a count"
    return None


def _policy_shapes(cell: Cell, registry: Registry) -> dict[str, tuple[int, ...]]:
    """The shape of every weight of the cell's initial policy, which a cached reference
    must have: the policy built on the meta device (no memory, no init), the RNG kept."""
    _, task = load_task(cell.config, compute_rewards=False, registry=registry)
    with torch.random.fork_rng(devices=[]):  # build_policy seeds the global generator
        try:
            with torch.device("meta"):
                base = build_policy(cell.config.policy, task, seed=cell.config.train.seed)
        except Exception:  # a model that cannot be built on the meta device: built for real
            base = build_policy(cell.config.policy, task, seed=cell.config.train.seed)
    return {name: tuple(t.shape) for name, t in base.state_dict().items()}


def _reference_problem(cell: Cell, weights: Path, meta: Path, registry: Registry) -> str | None:
    """Why the cached reference cannot be used, or None when it is whole. Whole means: both
    files regular, their ``.sha256`` files match (when they exist), the metadata well-formed,
    and the weights load (from the bytes just hashed), are finite, and have the shapes of
    the cell's policy, plus the RNG state after the fine-tune. An entry without checksums
    (just written by a fine-tune, or by an older tokenmdp) that is whole gets them here."""
    import safetensors.torch

    data = {}
    for path in (weights, meta):
        if path.is_symlink() or not path.is_file():
            return f"is incomplete ({path.name} is missing or not a regular file)"
        try:
            data[path] = path.read_bytes()
        except OSError as exc:
            return f"cannot be read ({path.name}: {exc.strerror or exc})"
    checksums = {path: rundir.checksum_path(path) for path in data}
    sealed = all(c.is_file() for c in checksums.values())
    if sealed:
        for path, checksum in checksums.items():
            try:
                expected = checksum.read_text().strip()
            except (OSError, ValueError):
                expected = None
            if expected != _sha256(data[path]):
                return f"is corrupt ({path.name} does not match {checksum.name})"
    problem = _meta_problem(data[meta])
    if problem is not None:
        return f"has damaged metadata ({meta.name} {problem})"
    try:
        stored = safetensors.torch.load(data[weights])
    except Exception as exc:  # truncated, empty, not safetensors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"cannot be loaded ({weights.name}: {type(exc).__name__}: {first})"
    rng = stored.pop("__rng_state__", None)
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        return f"is not a fine-tuned reference ({weights.name} lacks the RNG state after the fine-tune)"
    bad = [name for name, t in stored.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        return f"holds non-finite weights ({bad[0]}, ...)"
    found, expected_shapes = {k: tuple(t.shape) for k, t in stored.items()}, _policy_shapes(cell, registry)
    if found != expected_shapes:
        name = next((k for k in expected_shapes if found.get(k) != expected_shapes[k]), None)
        name = name if name is not None else next(k for k in found if k not in expected_shapes)
        return (
            f"does not fit the cell's policy ({name}: {found.get(name, 'missing')} where the policy has "
            f"{expected_shapes.get(name, 'no such weight')})"
        )
    if not sealed:  # whole: from now on any change to it is detected
        for path, checksum in checksums.items():
            atomic_write_text(checksum, _sha256(data[path]) + "\n")
    return None


def check_cached_reference(cell: Cell, pm) -> None:
    """Make the cell's entry in the reference cache whole or absent: a damaged, truncated,
    empty, non-finite, wrong-shaped or corrupt-metadata one is removed with a one-line note,
    so that the cell's trainer fine-tunes it again (and a whole one gets its checksums).
    Under the cache's lock per key, so a fine-tune of the same key in another worker is
    waited for, never read half-written."""
    import fcntl

    files = _reference_files(cell)
    if files is None:
        return
    weights, meta = files
    related = [weights, meta, *(rundir.checksum_path(p) for p in files)]
    if not any(os.path.lexists(p) for p in related):
        return
    with open(weights.parent / f"{weights.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.lexists(weights) and not os.path.lexists(meta):
            problem = "is incomplete (only checksums left)"
        else:
            problem = _reference_problem(cell, weights, meta, Registry(pm))
        if problem is None:
            return
        print(f"tokenmdp: cached reference {weights} {problem}; fine-tuning it again", file=sys.stderr)
        for path in related:
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)  # an empty folder in a file's place; one with files in it is an error
                elif os.path.lexists(path):
                    os.unlink(path)
            except OSError as exc:  # a folder in its place, no permission: the fine-tune could not replace it
                raise ConfigError(f"cached reference {path} cannot be removed: {exc.strerror or exc}") from None


def _cached_tagged_sft_tokens(cell: Cell) -> int | None:
    """The tagged-SFT tokens the cell's cached fine-tune recorded, when its metadata is
    whole (checksum and form); None otherwise (they are then recounted, exactly)."""
    files = _reference_files(cell)
    if files is None:
        return None
    meta = files[1]
    try:
        data = meta.read_bytes() if meta.is_file() and not meta.is_symlink() else None
        checksum = rundir.checksum_path(meta).read_text().strip()
    except (OSError, ValueError):
        return None
    if data is None or checksum != _sha256(data) or _meta_problem(data) is not None:
        return None
    return json.loads(data)["tagged_sft_tokens"]


def run_cell(cell: Cell, pm) -> None:
    """Train one cell; one interrupted after a checkpoint continues from it, anything else
    unfinished starts from scratch (``run.overwrite = true``). Its reference comes from the
    grid's cache when another cell fine-tuned the same one (checked first; a damaged one is
    fine-tuned again), and the entry gets its checksums once the cell ends."""
    resume = latest_checkpoint(cell.dir) is not None and _recorded_config(cell) == cell.config
    (cell.dir / "compare.json").unlink(missing_ok=True)  # cached numbers of an older run of this cell
    check_cached_reference(cell, pm)
    try:
        Trainer(cell.config, pm=pm, resume=resume, reference_cache=reference_cache(cell)).train()
    except TrainingInterrupted:
        raise TrainingInterrupted(
            f"interrupted in cell {cell.dir.name}; rerun the same `tokenmdp compare` "
            "command to resume the grid (finished cells are kept)"
        ) from None
    check_cached_reference(cell, pm)  # the checksums of an entry this cell's fine-tune wrote


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
        todo = [c for c in cells if not c.finished]
        with tqdm(
            total=len(cells),
            initial=len(cells) - len(todo),
            desc="compare",
            unit="cell",
            disable=None if progress else True,  # None: only on a terminal, not in a log
        ) as bar:
            if jobs > 1 and len(todo) > 1:
                _run_in_workers(todo, min(jobs, len(todo)), threads, bar)
            else:
                for cell in todo:
                    bar.set_postfix_str(cell.dir.name)
                    run_cell(cell, pm)
                    bar.update()
        records = [cell_record(cell, registry) for cell in cells]
        return write_results(grid, records)


# --- worker processes ---------------------------------------------------------------------

#: In a worker process: the grid's stop request (set by the parent on Ctrl-C), whether
#: this process saw SIGINT, and whether a cell is being set up or run here.
_stop = None
_interrupted = False
_in_cell = False


def _worker_start(threads: int, stop) -> None:
    global _stop
    _stop = stop
    # SIGINT reaches the whole process group. A worker waiting for its next cell only notes
    # it (no KeyboardInterrupt traceback from the pool's machinery); a cell being set up
    # stops there; a cell training gets the trainer's own handler (checkpoint, then stop).
    signal.signal(signal.SIGINT, _worker_interrupted)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent while it spawned us
    torch.set_num_threads(threads)


def _worker_interrupted(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    if _in_cell:
        raise KeyboardInterrupt


def _worker_cell(cell: Cell) -> str | None:
    """Train the cell, then compute its table extras (the exact frontier) here too, so the
    parent only reads them (``compare.json``). None: the grid is stopping, so the cell
    was not started (or was stopped before its run began)."""
    global _in_cell, _interrupted
    if _interrupted or (_stop is not None and _stop.is_set()):
        return None
    try:
        _in_cell = True
        pm = plugin_manager()
        run_cell(cell, pm)
        _cell_extras(cell, Registry(pm))  # registers the envs itself (load_task)
    except KeyboardInterrupt:
        return None
    except TrainingInterrupted:
        _interrupted = True  # its trainer took the Ctrl-C: no next cell starts here either
        raise
    finally:
        _in_cell = False
    return cell.dir.name


def _run_in_workers(cells: list[Cell], jobs: int, threads: int, bar) -> None:
    """The cells in ``jobs`` spawned processes. Ctrl-C reaches the workers too (one process
    group): each cell training checkpoints and stops, as a run does; cells not started are
    cancelled (the pool's queue, and a stop request for those already handed to a worker);
    finished ones are kept, and a rerun continues."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    stop = context.Event()
    main = threading.current_thread() is threading.main_thread()
    # The workers start with SIGINT blocked (a spawned process inherits the mask) until
    # their initializer installs their handler: a Ctrl-C while they import torch is held
    # until then, never a traceback. Here it is held until the pool is set up.
    # The mask alone is not enough: another thread of this process (tqdm's monitor) may take
    # the signal, and Python then raises KeyboardInterrupt in this thread anyway, possibly in
    # the middle of starting a worker that the pool has not registered yet (so it is never
    # joined, and it fails unpickling after this process has exited). So the handler only
    # notes a Ctrl-C until every worker is started, and it is raised right after.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if main else None
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum)) if main else None
    pool = None
    try:
        try:
            pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=jobs, mp_context=context, initializer=_worker_start, initargs=(threads, stop)
            )
            futures = [pool.submit(_worker_cell, cell) for cell in cells]
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C held meanwhile arrives now
        if held:
            raise KeyboardInterrupt
        for future in concurrent.futures.as_completed(futures):
            name = future.result()
            if name is None:  # a worker saw Ctrl-C first
                raise KeyboardInterrupt
            bar.set_postfix_str(name)
            bar.update()
    except (KeyboardInterrupt, TrainingInterrupted):
        _stop_pool(pool, stop, main)
        raise TrainingInterrupted(
            "interrupted; rerun the same `tokenmdp compare` command to resume the grid (finished cells are kept)"
        ) from None
    except BaseException:
        _stop_pool(pool, stop, main)
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool, stop, main: bool) -> None:
    """Cancel every cell not started and wait for those in flight to stop (each saves a
    checkpoint). Meanwhile this process ignores SIGINT: the workers get a repeated Ctrl-C
    themselves (the trainer's second and third press), and this one must not leave them."""
    stop.set()
    if pool is None:
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# --- one cell's numbers ---------------------------------------------------------------


def exact_frontier(task, reference, betas=FRONTIER_BETAS) -> list[dict[str, float]]:
    """For each beta: J*_beta and the exact E[R] and KL(pi*_beta || pi_ref) of pi*_beta."""
    ref_logp = tree_logprobs(reference, task)
    out = []
    for beta in betas:
        solution = solve(task, reference, beta, ref_logp=ref_logp)
        scores = solution.evaluate(solution.opt_logp)
        out.append(
            {"beta": beta, "j_star": solution.j_star, "true_reward": scores["true_reward"], "kl_ref": scores["kl_ref"]}
        )
    return out


def frontier_excess(points: list[tuple[float, float]], frontier: list[dict[str, float]]) -> float:
    """``max over points and beta of E[R] - beta KL - J*_beta``: <= 0 for every policy, because
    ``J*_beta`` is the best ``E[R] - beta KL`` of all. So > 0 means a point above the frontier."""
    return max(r - f["beta"] * kl - f["j_star"] for kl, r in points for f in frontier)


def tagged_sft_tokens(task, config: Config) -> int:
    """Real tokens of the guide-tagged SFT data in the cell's reference: the same draw as
    ``Trainer.build_models`` (same generator seed), recounted."""
    ref = config.reference
    if ref.init != "sft" or ref.tagged_samples == 0:
        return 0
    generator = torch.Generator().manual_seed(config.train.seed)
    groups = make_sft_data(task, ref.sft_samples, ref.tagged_samples, ref.tilt_beta or config.train.beta, generator)
    return int(groups[-1][2].sum())


def _cell_extras(cell: Cell, registry: Registry) -> dict[str, Any]:
    """The exact frontier of the cell's own reference and its tagged SFT tokens (cached)."""
    path = cell.dir / "compare.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = cell.config
    _, task = load_task(config, registry=registry)
    reference = load_reference(cell.dir, config, task)
    betas = sorted({*FRONTIER_BETAS, config.train.beta})  # the run's own beta: pi*'s point is on the curve
    tagged = _cached_tagged_sft_tokens(cell)
    tagged = tagged_sft_tokens(task, config) if tagged is None else tagged  # a cell fine-tuned before the cache
    extras = {"frontier": exact_frontier(task, reference, betas), "tagged_sft_tokens": tagged}
    atomic_write_text(path, json.dumps(extras))  # a cache that is whole or absent
    return extras


def first_reaching(rows: list[dict], target: float = TARGET_CLOSURE) -> dict | None:
    """The first evaluation row with ``closure >= target`` (90% of ``J* - J(pi_ref)``), or None."""
    return next((row for row in rows if row["closure"] >= target), None)


def cell_record(cell: Cell, registry: Registry) -> dict[str, Any]:
    """Everything the tables and plots need from one finished cell."""
    summary = json.loads((cell.dir / "summary.json").read_text())
    lines = (cell.dir / "metrics.jsonl").read_text().splitlines()
    rows = [row for row in map(json.loads, filter(None, lines)) if "closure" in row]
    extras = _cell_extras(cell, registry)
    points = [(row["kl_ref"], row["true_reward"]) for row in rows]
    hit = first_reaching(rows)
    never = float("inf")
    supervision = registry.recipe(cell.config.algorithm.name).supervision
    # The guide-tagged SFT data is the teacher of a recipe that uses neither reward nor pairs;
    # reward and pair recipes may start from the same reference but never read the guide.
    tagged = extras["tagged_sft_tokens"] if supervision == "none" else 0
    # the supervision data the run's components count themselves (DPO's pairs, ...)
    counters = [m for c in compose(registry, cell.config).components for m in c.data_token_metrics]

    def data_tokens(row: dict) -> int:
        return tagged + sum(row.get(m, 0) for m in counters)

    return {
        "recipe": cell.recipe,
        "env": cell.env,
        "seed": cell.seed,
        "supervision": supervision,
        **{key: summary.get(key) for key, _ in COLUMNS if key in summary},
        "tokens_to_90": hit["env_tokens"] if hit else never,
        # Supervision data is paid for in tokens too: the guide-tagged SFT data, and DPO's
        # preference pairs (both responses) sampled up to that step.
        "tokens_to_90_with_data": hit["env_tokens"] + data_tokens(hit) if hit else never,
        "data_tokens": data_tokens(rows[-1]),
        "frontier_excess": frontier_excess(points + [(summary["kl_ref"], summary["true_reward"])], extras["frontier"]),
        "eval_rows": rows,
        "frontier": extras["frontier"],
    }


# --- the results folder -----------------------------------------------------------------


def _spread(values: list) -> tuple[float | None, float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "never"
    if "tokens" in key:
        return f"{value:,.0f}"
    return f"{value:.1f}" if key == "wall_seconds" else f"{value:.3f}"


def summarise(records: list[dict]) -> list[dict[str, Any]]:
    """One row per recipe x env (grid order): median, min and max across seeds per column."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["recipe"], record["env"]), []).append(record)
    rows = []
    for (recipe, env), cell_records in groups.items():
        row = {"recipe": recipe, "env": env, "supervision": cell_records[0]["supervision"], "seeds": len(cell_records)}
        for key, _ in [*COLUMNS, ("frontier_excess", "")]:
            row[key] = _spread([r.get(key) for r in cell_records])
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    header = ["recipe", "env", "supervision", *(title for _, title in COLUMNS)]
    body = [
        [r["recipe"], short_env(r["env"]), r["supervision"], *(_cell_text(r[key], key) for key, _ in COLUMNS)]
        for r in rows
    ]
    return markdown(body, header)


def _cell_text(spread: tuple, key: str) -> str:
    median, low, high = spread
    if median is None:
        return "-"
    return f"{_fmt(median, key)} [{_fmt(low, key)}, {_fmt(high, key)}]"


def write_csv(rows: list[dict], path: Path) -> None:
    keys = [key for key, _ in COLUMNS] + ["frontier_excess"]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["recipe", "env", "supervision", "seeds", *(f"{k}_{s}" for k in keys for s in ("median", "min", "max"))]
        )
        for r in rows:
            writer.writerow(
                [
                    r["recipe"],
                    r["env"],
                    r["supervision"],
                    r["seeds"],
                    *("" if v is None else v for k in keys for v in r[k]),
                ]
            )


def write_results(grid: Grid, records: list[dict]) -> tuple[str, Path]:
    from . import plots

    out = grid.out
    rows = summarise(records)
    table = markdown_table(rows)
    envs = list(dict.fromkeys(r["env"] for r in records))
    recipes = list(dict.fromkeys(r["recipe"] for r in records))

    def per_seed(x: str, y: str) -> dict:
        """``[env][recipe]`` -> one (x, y) series per seed, over the cell's evaluations."""
        return {
            e: {
                rc: [
                    ([row[x] for row in r["eval_rows"]], [row[y] for row in r["eval_rows"]])
                    for r in records
                    if (r["env"], r["recipe"]) == (e, rc)
                ]
                for rc in recipes
            }
            for e in envs
        }

    curves, points = per_seed("env_tokens", "regret"), per_seed("kl_ref", "true_reward")
    frontiers = {}
    for e in envs:  # one curve per distinct reference model (cells that share one, draw it once)
        unique = {tuple((f["kl_ref"], f["true_reward"]) for f in r["frontier"]) for r in records if r["env"] == e}
        frontiers[e] = [tuple(map(list, zip(*curve))) for curve in sorted(unique)]
    plots.regret_vs_tokens(curves, out / "regret_vs_tokens.png")
    plots.reward_kl_frontier(points, frontiers, out / "reward_kl_frontier.png")
    when = time.strftime("%Y-%m-%d %H:%M")
    grid_line = (
        f"{len(recipes)} recipes x {len(envs)} envs x {len(grid.options.seeds)} seeds "
        f"({', '.join(map(str, grid.options.seeds))}); median [min, max] across seeds; written {when}"
    )
    (out / "results.md").write_text(f"# tokenmdp compare\n\n{grid_line}\n\n{table}\n")
    write_csv(rows, out / "results.csv")
    index = out / "index.html"
    index.write_text(_html_page(grid_line, rows, out))
    return table, index


def _html_page(grid_line: str, rows: list[dict], out: Path) -> str:
    from .plots import png_data_uri

    header = ["recipe", "env", "supervision", *(title for _, title in COLUMNS)]
    cells = [
        [r["recipe"], short_env(r["env"]), r["supervision"], *(_cell_text(r[k], k) for k, _ in COLUMNS)] for r in rows
    ]
    table = (
        "<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in cells)
        + "</table>"
    )
    figures = "".join(
        f'<h2>{html.escape(title)}</h2><img alt="{name}" src="{png_data_uri(out / name)}">'
        for name, title in PLOTS.items()
    )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>tokenmdp compare</title>'
        f"<style>{style}</style></head><body><h1>tokenmdp compare</h1><p>{html.escape(grid_line)}. "
        "Every score is exact (the soft-Bellman solver over the whole prefix tree). "
        "Columns: docs/compare.md. Data: results.csv; runs: cells/.</p>"
        f"{table}{figures}</body></html>\n"
    )
