"""A grid file and its cells: ``[compare]`` and ``[recipes.*]`` read and checked, and every
cell's run config planned (and checked against a finished cell's) before any cell runs.

Cell (recipe, env, seed) trains in ``<out>/cells/<recipe>__<Env>__seed<k>/``; its
``summary.json`` marks it finished.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from ...config import SECTIONS, Config, load_config, merge, parse_override, read_toml
from ...errors import ConfigError
from ...options import build, to_dict
from ...plugin.composition import compose, with_recipe_defaults
from ...plugin.registry import Registry
from ...training.paths import absolute_paths

#: The issue asks for a spread across seeds; fewer than 3 cannot show one honestly.
MIN_SEEDS = 3


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
    check_one_model(cells)
    for cell in cells:
        recorded = recorded_config(cell)
        if cell.finished and recorded != cell.config:
            raise ConfigError(
                f"cell {cell.dir} finished with another config (differs in: {_differences(recorded, cell.config)}); "
                f"use another --out, or delete that folder to rerun it"
            )
    return cells


def check_one_model(cells: list[Cell]) -> None:
    """The cells that train a Hugging Face model must all start from the same model and
    tokenizer: a comparison of methods, not of models."""
    seen: dict[tuple, Cell] = {}
    for cell in cells:
        if cell.config.policy.get("kind") == "hf":
            seen.setdefault((cell.config.policy.get("path"), cell.config.env.get("tokenizer")), cell)
    if len(seen) > 1:
        (a, first), (b, second) = list(seen.items())[:2]
        raise ConfigError(
            f"cells {first.dir.name} and {second.dir.name} train different models or tokenizers "
            f"(policy.path, env.tokenizer = {a} and {b}); a grid compares methods on one model"
        )


def short_env(env_id: str) -> str:
    """``tokenmdp/Pattern-v0`` -> ``Pattern``: folder names and table cells."""
    return env_id.split("/")[-1].removesuffix("-v0")


def recorded_config(cell: Cell) -> Config | None:
    path = cell.dir / "config.toml"
    return load_config(path) if path.is_file() else None


def _differences(a: Config | None, b: Config) -> str:
    if a is None:
        return "config.toml is missing"
    a, b = to_dict(a), to_dict(b)
    return ", ".join(s for s in SECTIONS if a.get(s) != b.get(s)) or "?"
