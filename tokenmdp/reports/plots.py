"""Matplotlib figures for `tokenmdp compare` (and any other report): plain data in, PNG out.

Every function takes numbers, not runs, so it can be reused and tested without training.
The Agg backend is forced: these run in terminals, CI and worker processes with no display.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import median

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: One series per seed: (x values, y values), the same length.
Series = tuple[Sequence[float], Sequence[float]]

#: Regret is plotted on a log axis; an exact optimum's 0 (or -1e-17) is drawn at this floor.
REGRET_FLOOR = 1e-6


def png_data_uri(path: str | Path) -> str:
    """A ``data:image/png;base64,...`` URI, so an HTML page carries its images inside it."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _panels(count: int):
    fig, axes = plt.subplots(1, count, figsize=(5.2 * count, 4.2), squeeze=False)
    return fig, axes[0]


def _colours(ax, count: int) -> None:
    """Distinct colours for ``count`` series: matplotlib's cycle repeats after ten."""
    if count > 10:
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)


#: How baselines (series that are not methods: a text grid's reference and guided
#: reference) are drawn on the KL plot, in the order given: outside the methods' colours.
BASELINE_STYLES = ({"color": "black", "marker": "*"}, {"color": "dimgray", "marker": "D"})


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _median_bands(ax, by_recipe: Mapping[str, list[Series]], floor: float | None = None) -> tuple[float, float]:
    """One line per recipe (the median over seeds) with a band from the seeds' min to max;
    the smallest and largest y drawn."""
    low, high = float("inf"), float("-inf")
    _colours(ax, len(by_recipe))
    for recipe, seeds in by_recipe.items():
        # Seeds share the evaluation steps; one that stopped early is cut to the shortest.
        length = min(len(x) for x, _ in seeds)
        xs = [median(x[i] for x, _ in seeds) for i in range(length)]
        ys = [[y[i] if floor is None else max(y[i], floor) for _, y in seeds] for i in range(length)]
        (line,) = ax.plot(xs, [median(y) for y in ys], label=recipe)
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.2)
        low = min(low, *(min(y) for y in ys))
        high = max(high, *(max(y) for y in ys))
    return low, high


def regret_vs_tokens(curves: Mapping[str, Mapping[str, list[Series]]], path: str | Path) -> Path:
    """``curves[env][recipe]`` = one (env_tokens, regret) series per seed. One panel per env,
    one line per recipe (the median over seeds) with a band from the seeds' min to max."""
    fig, axes = _panels(len(curves))
    for ax, (env, by_recipe) in zip(axes, curves.items()):
        low, high = _median_bands(ax, by_recipe, REGRET_FLOOR)
        if high > 10 * low:  # regret often spans orders of magnitude between pi_ref and pi*
            ax.set_yscale("log")
        ax.set(title=env, xlabel="environment tokens (RL rollouts)", ylabel="regret  J* - J(pi)")
        ax.legend(fontsize=8)
    return _save(fig, path)


def score_vs_tokens(curves: Mapping[str, Mapping[str, list[Series]]], ylabel: str, path: str | Path) -> Path:
    """As :func:`regret_vs_tokens`, for a sampled score (a text grid's judge), on a linear axis."""
    fig, axes = _panels(len(curves))
    for ax, (env, by_recipe) in zip(axes, curves.items()):
        _median_bands(ax, by_recipe)
        ax.set(title=env, xlabel="environment tokens (RL rollouts)", ylabel=ylabel)
        ax.legend(fontsize=8)
    return _save(fig, path)


def reward_kl_frontier(
    points: Mapping[str, Mapping[str, list[Series]]],
    frontiers: Mapping[str, list[Series]],
    path: str | Path,
    ylabel: str = "E_pi[R]  (true_reward)",
    symlog: bool = False,
    baselines: Sequence[str] = (),
) -> Path:
    """``points[env][recipe]`` = one (kl_ref, true_reward) trajectory per seed, the last point
    being the final policy; ``frontiers[env]`` = the exact (KL(pi*_b || pi_ref), E_pi*_b[R])
    curves over a sweep of b, one per reference model. As in the DPO paper's sentiment plot.
    ``symlog``: the KL axis linear up to 1 nat and logarithmic past it (text grids, whose
    methods end anywhere from 1 to 50 nats). ``baselines``: the recipes of ``points`` that
    are not methods, drawn as points in :data:`BASELINE_STYLES` (a star, a diamond)."""
    fig, axes = _panels(len(points))
    for ax, (env, by_recipe) in zip(axes, points.items()):
        widest = 0.0
        _colours(ax, len([r for r in by_recipe if r not in baselines]))
        for recipe, seeds in by_recipe.items():
            if recipe in baselines:
                style = BASELINE_STYLES[list(baselines).index(recipe) % len(BASELINE_STYLES)]
                kls, scores = [kl[-1] for kl, _ in seeds], [score[-1] for _, score in seeds]
                ax.scatter(kls, scores, s=70, zorder=4, label=recipe, **style)
                widest = max(widest, *kls)
                continue
            color = None
            for k, (kl, reward) in enumerate(seeds):
                (line,) = ax.plot(kl, reward, color=color, alpha=0.35, linewidth=0.8)
                color = line.get_color()
                ax.scatter(kl[-1:], reward[-1:], color=color, s=28, zorder=3, label=recipe if k == 0 else None)
                widest = max(widest, *kl)
        # The exact curve reaches huge KL at small b; show it just past the trained policies.
        limit = 1.5 * widest if widest > 0 else None
        for k, (kl, reward) in enumerate(frontiers.get(env, [])):
            keep = [i for i, v in enumerate(kl) if limit is None or v <= limit]
            ax.plot(
                [kl[i] for i in keep],
                [reward[i] for i in keep],
                color="black",
                linewidth=1.0,
                linestyle="--",
                alpha=0.6,
                label="exact frontier (solver)" if k == 0 else None,
            )
        ax.set(title=env, xlabel="KL(pi || pi_ref)" + (", nats (symlog)" if symlog else ""), ylabel=ylabel)
        if symlog:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.legend(fontsize=8)
    return _save(fig, path)
