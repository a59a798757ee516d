"""tokenmdp.reports.plots: series a reader must tell apart are drawn apart."""

from __future__ import annotations

from matplotlib.colors import to_hex

from tokenmdp.reports import plots


def _drawn(monkeypatch):
    """The figures the plots would save, kept open to be read."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def _legend_colours(ax) -> dict[str, str]:
    handles, labels = ax.get_legend_handles_labels()
    colours = {}
    for handle, label in zip(handles, labels):
        colour = handle.get_facecolor()[0] if hasattr(handle, "get_offsets") else handle.get_color()
        colours[label] = to_hex(colour)
    return colours


def test_the_kl_plot_draws_baselines_outside_the_methods_colours(tmp_path, monkeypatch):
    figures = _drawn(monkeypatch)
    methods = {f"method {i}": [([0.0, 1.0 + i], [0.3, 0.4]), ([0.0, 2.0 + i], [0.2, 0.5])] for i in range(10)}
    baselines = {"reference": [([0.0], [0.3]), ([0.0], [0.2])], "guided reference": [([6.5], [0.54])]}
    points = {"Text": {**methods, **baselines}}
    plots.reward_kl_frontier(points, {}, tmp_path / "kl.png", symlog=True, baselines=list(baselines))
    ax = figures[0].axes[0]
    colours = _legend_colours(ax)
    method_colours = {colours[m] for m in methods}
    assert len(method_colours) == 10  # ten methods, ten colours
    assert colours["reference"] == "#000000" and colours["guided reference"] not in method_colours
    # a baseline is its seeds' points, one each, not a trajectory
    reference = next(c for c in ax.collections if c.get_label() == "reference")
    assert reference.get_offsets().tolist() == [[0.0, 0.3], [0.0, 0.2]]


def test_more_than_ten_curves_get_distinct_colours(tmp_path, monkeypatch):
    figures = _drawn(monkeypatch)
    curves = {"Text": {f"method {i}": [([0, 100], [0.1, 0.2 + i / 100])] for i in range(12)}}
    plots.score_vs_tokens(curves, "judge/vader", tmp_path / "tokens.png")
    colours = _legend_colours(figures[0].axes[0])
    assert len(set(colours.values())) == 12  # matplotlib's own cycle would repeat the first two
