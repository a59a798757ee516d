"""The results folder of a grid: the cells' records summarised across seeds (median, min,
max; a text grid's sampled scores also as mean ± standard error) as ``results.md``,
``results.csv``, two plots and ``index.html``, a page filled in from :data:`PAGE`
(``string.Template``: jinja2 is not among tokenmdp's dependencies).
"""

from __future__ import annotations

import csv
import gzip
import html
import json
import math
import statistics
import time
from pathlib import Path
from string import Template
from typing import Any

from ...errors import ConfigError
from ..tables import markdown
from .grid import Grid, short_env

#: (key, header) of the columns that show median [min, max] across seeds, in table order.
COLUMNS = [
    ("true_reward", "true_reward"),
    ("kl_ref", "kl_ref"),
    ("regret", "regret"),
    ("kl_to_optimal", "kl_to_optimal"),
    ("credit_corr", "credit_corr"),
    ("response_length", "length"),
    ("optimal_length", "pi* length"),
    ("ceiling", "ceiling"),
    ("data_tokens", "data tokens"),
    ("tokens_to_90", "tokens to 90% (RL)"),
    ("tokens_to_90_with_data", "tokens to 90% (+ data)"),
    ("wall_seconds", "wall s"),
]
PLOTS = {"regret_vs_tokens.png": "Regret against environment tokens", "reward_kl_frontier.png": "Reward-KL frontier"}
#: A text grid's columns (sampled on held-out prompts; no exact optimum), before its judges'.
TEXT_COLUMNS = [
    ("true_reward", "true_reward"),
    ("kl_ref", "kl_ref"),
    ("kl_ref_se", "kl_ref s.e."),
    ("distinct_2", "distinct-2"),
    ("response_length", "length"),
    ("data_tokens", "data tokens"),
    ("env_tokens", "env tokens"),
    ("wall_seconds", "wall s"),
    ("tokens_per_second", "tokens/s"),
]
#: The keys of a text cell's summary its record keeps (with every ``judge/...`` key).
TEXT_KEYS = frozenset(key for key, _ in TEXT_COLUMNS) - {"data_tokens", "tokens_per_second"}
#: A text grid's held-out responses, every cell's (:func:`write_completions`).
COMPLETIONS = "completions.jsonl.gz"
#: A text grid's columns also given as mean ± standard error over seeds (with each judge's):
#: each seed's value is a mean over its held-out responses, so the seeds' spread holds both
#: the training seed's noise and the sampled responses'.
MEAN_KEYS = ("true_reward", "kl_ref", "distinct_2")
TEXT_PLOTS = {"judge_vs_tokens.png": "Held-out score against environment tokens", "judge_vs_kl.png": "Score against KL"}
SCORES = {
    "exact": "Every score is exact (the soft-Bellman solver over the whole prefix tree).",
    "text": "Scores are sampled on held-out prompts; judges score those responses and never train.",
}


#: ``index.html``, self-contained (the plots inlined as data URIs). :func:`_html_page` escapes
#: every text it puts in that comes from the grid (labels, env names, the grid line).
PAGE = Template("""\
<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>tokenmdp compare</title>
<style>
body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
img{max-width:100%}
</style>
</head>
<body>
<h1>tokenmdp compare</h1>
<p>$grid_line. $scores
Columns: docs/compare.md. Data: results.csv; runs: cells/.</p>
<table>
$table
</table>
$means
$figures
</body>
</html>
""")
_ROW = Template("<tr>$cells</tr>")
_HEADER_CELL = Template("<th>$text</th>")
_CELL = Template("<td>$text</td>")
_MEANS = Template("<h2>Mean ± standard error</h2>\n<p>$line</p>\n<table>\n$table\n</table>")
_FIGURE = Template('<h2>$title</h2>\n<img alt="$name" src="$uri">')


def _spread(values: list) -> tuple[float | None, float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def mean_se(values: list) -> tuple[float | None, float | None]:
    """The mean of ``values`` (``None`` dropped) and its standard error, ``stdev / sqrt(n)``;
    no error for fewer than two values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    if len(values) < 2:
        return values[0], None
    # Not statistics.stdev: it raises on an infinite value, where this gives nan (the page
    # is written after hours of training; one odd score must not stop it).
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "never"
    if key == "tokens_per_second":
        return f"{value:.1f}"
    if "tokens" in key:
        return f"{value:,.0f}"
    return f"{value:.1f}" if key == "wall_seconds" else f"{value:.3f}"


def text_columns(records: list[dict]) -> list[tuple[str, str]]:
    """A text grid's columns: :data:`TEXT_COLUMNS`, then each judge's mean and win rate."""
    judges = sorted({k for r in records for k in r if k.startswith("judge/") and not k.endswith("_se")})
    return [*TEXT_COLUMNS, *((k, k.removeprefix("judge/").replace("_win_rate", " win rate")) for k in judges)]


def _has_mean(key: str) -> bool:
    """Whether ``key`` is a sampled score given as mean ± s.e.: :data:`MEAN_KEYS` and the judges'."""
    return key in MEAN_KEYS or key.startswith("judge/")


def mean_columns(columns) -> list[tuple[str, str]]:
    """The columns of a text grid's mean ± s.e. table."""
    return [(k, title) for k, title in columns if _has_mean(k)]


#: The exact expected lengths (of the policy and of pi*), shown when some length varies.
LENGTH_KEYS = ("response_length", "optimal_length")


def exact_columns(records: list[dict]) -> list[tuple[str, str]]:
    """A toy grid's table columns: :data:`COLUMNS`, without the two length columns when no
    length varies anywhere (no env of the grid has an EOS, so every response is horizon
    long); ``results.csv`` keeps them."""
    lengths = [r[key] for r in records for key in LENGTH_KEYS if r.get(key) is not None]
    if not lengths or max(lengths) - min(lengths) < 1e-6:  # float sums of one horizon
        return [c for c in COLUMNS if c[0] not in LENGTH_KEYS]
    return COLUMNS


def summarise(records: list[dict], columns=COLUMNS) -> list[dict[str, Any]]:
    """One row per recipe x env (grid order): median, min and max across seeds per column."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["recipe"], record["env"]), []).append(record)
    rows = []
    for (recipe, env), cell_records in groups.items():
        row = {"recipe": recipe, "env": env, "supervision": cell_records[0]["supervision"], "seeds": len(cell_records)}
        rows.append(_with_stats(row, [*columns, ("frontier_excess", "")], cell_records))
    return rows


def _with_stats(row: dict, columns, per_seed: list[dict], default: dict | None = None) -> dict:
    """``row`` with each column's median [min, max] across the seeds' records ``per_seed``
    (``row[key]``) and, for :data:`MEAN_KEYS` and judges, their mean ± s.e.
    (``row["means"][key]``); a key a record lacks is ``default``'s, else ``None``."""
    default = default or {}
    row["means"] = {}
    for key, _ in columns:
        values = [record.get(key, default.get(key)) for record in per_seed]
        row[key] = _spread(values)
        if _has_mean(key):
            row["means"][key] = mean_se(values)
    return row


#: A text grid's baseline rows: (label, the record's key holding its scores, supervision).
BASELINES = (("reference", "start", "-"), ("guided reference", "guided_reference", "none"))
#: What a baseline consumed: it is scored, never trained.
_UNTRAINED = {"env_tokens": 0, "data_tokens": 0}


def _one_per_seed(records: list[dict], env: str, key: str) -> list[dict]:
    """One record of ``env`` per seed among those holding ``key`` (a baseline's scores):
    every cell of a seed shares the reference and its held-out draw, so each seed counts once."""
    return list({r["seed"]: r for r in records if r["env"] == env and r.get(key)}.values())


def baseline_rows(records: list[dict], columns) -> list[dict[str, Any]]:
    """A text grid's rows for the reference and the guided reference (``pi_ref(.|c + x)``, from
    the cells of guide methods), per env: their held-out scores, median [min, max] across seeds."""
    rows = []
    for label, key, supervision in BASELINES:
        for env in dict.fromkeys(r["env"] for r in records):
            scored = [r[key] for r in _one_per_seed(records, env, key)]
            if not scored:
                continue
            row = {"recipe": label, "env": env, "supervision": supervision, "seeds": len(scored)}
            rows.append(_with_stats(row, [*columns, ("frontier_excess", "")], scored, _UNTRAINED))
    return rows


def _table(rows: list[dict], columns=COLUMNS, means: bool = False) -> tuple[list[str], list[list[str]]]:
    """The results table's header and cells: median [min, max] across seeds, or with
    ``means`` mean ± s.e. where a column has one (:func:`_mean_text`)."""
    header = ["recipe", "env", "supervision", *(title for _, title in columns)]
    text = _mean_text if means else (lambda r, key: _cell_text(r[key], key))
    body = [[r["recipe"], short_env(r["env"]), r["supervision"], *(text(r, key) for key, _ in columns)] for r in rows]
    return header, body


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    header, body = _table(rows, columns)
    return markdown(body, header)


def mean_table(rows: list[dict], columns) -> tuple[list[str], list[list[str]]]:
    """A text grid's second table: each row's seeds, then mean ± standard error over seeds
    (:func:`mean_se`) of ``columns``."""
    return _table(rows, [("seeds", "seeds"), *columns], means=True)


def _mean_text(row: dict, key: str) -> str:
    if key not in row["means"]:  # the seeds column
        return _cell_text(row[key], key)
    mean, se = row["means"][key]
    if mean is None:
        return "-"
    return _fmt(mean, key) if se is None else f"{_fmt(mean, key)} ± {_fmt(se, key)}"


#: What the mean ± s.e. table shows, said above it in ``results.md`` and on the page.
MEANS_LINE = (
    "Mean ± standard error over seeds (stdev / sqrt(seeds); no error with one seed) of each seed's "
    "mean over its held-out responses: the error holds both the training seed's and the samples' noise."
)


def _cell_text(spread: tuple | int, key: str) -> str:
    if isinstance(spread, int):  # the seeds a row has (a partial report's column)
        return str(spread)
    median, low, high = spread
    if median is None:
        return "-"
    return f"{_fmt(median, key)} [{_fmt(low, key)}, {_fmt(high, key)}]"


def write_csv(rows: list[dict], path: Path, columns=COLUMNS, means=()) -> None:
    """One row per table row: each column's median, min and max, then the mean and s.e. of
    each of ``means`` (a text grid's :func:`mean_columns`)."""
    keys = [key for key, _ in columns] + ["frontier_excess"]
    mean_keys = [key for key, _ in means]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "recipe",
                "env",
                "supervision",
                "seeds",
                *(f"{k}_{s}" for k in keys for s in ("median", "min", "max")),
                *(f"{k}_{s}" for k in mean_keys for s in ("mean", "se")),
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r["recipe"],
                    r["env"],
                    r["supervision"],
                    r["seeds"],
                    *("" if v is None else v for k in keys for v in r[k]),
                    *("" if v is None else v for k in mean_keys for v in r["means"][k]),
                ]
            )


def write_results(grid: Grid, records: list[dict], out: Path | None = None, partial: str = "") -> tuple[str, Path]:
    """The results folder (``out``, default the grid's) of ``records``; ``partial`` (e.g.
    "partial: 7 of 27 cells finished") is said in the grid line of the table and the page."""
    from .. import plots

    out = grid.out if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    text = [r["frontier"] is None for r in records]
    if any(text) and not all(text):
        raise ConfigError("the grid mixes toy envs (exact scores) and text envs (sampled); compare them as two grids")
    columns = text_columns(records) if all(text) else COLUMNS
    shown = columns if all(text) else exact_columns(records)  # the CSV keeps every column
    rows = summarise(records, columns)
    if all(text):
        rows = baseline_rows(records, columns) + rows
    if partial:  # rows may have fewer seeds than the grid: the table says how many
        shown = [("seeds", "seeds"), *shown]
    table = markdown_table(rows, shown)
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

    if all(text):  # the first judge's score (else the training reward) against tokens and KL
        write_completions(records, out / COMPLETIONS)
        score = next((k for k, _ in columns if k.startswith("judge/") and not k.endswith("_win_rate")), "true_reward")
        plots.score_vs_tokens(per_seed("env_tokens", score), score, out / "judge_vs_tokens.png")
        points = per_seed("kl_ref", score)
        for label, key, _ in BASELINES:  # a point per seed
            for e in envs:
                points[e][label] = [([r[key]["kl_ref"]], [r[key][score]]) for r in _one_per_seed(records, e, key)]
        baselines = [label for label, _, _ in BASELINES]
        plots.reward_kl_frontier(points, {}, out / "judge_vs_kl.png", ylabel=score, symlog=True, baselines=baselines)
    else:
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
    if partial:  # some cells are missing: each row's seeds column says how many it has
        grid_line += f"; {partial}"
    means = mean_columns(columns) if all(text) else []
    second = ""
    if means:  # a text grid: the sampled scores also as mean ± s.e. over seeds
        header, body = mean_table(rows, means)
        second = f"\n## Mean ± standard error\n\n{MEANS_LINE}\n\n{markdown(body, header)}\n"
    (out / "results.md").write_text(f"# tokenmdp compare\n\n{grid_line}\n\n{table}\n{second}")
    write_csv(rows, out / "results.csv", columns, means)
    index = out / "index.html"
    mode = "text" if all(text) else "exact"
    index.write_text(_html_page(grid_line, rows, out, shown, mode, means))
    return table, index


def write_completions(records: list[dict], path: Path) -> None:
    """Every text cell's held-out responses (its final policy's and its reference's, with
    their scores and sampling settings) in one gzip JSONL, each row naming its cell: the
    grid's samples, to score again with another judge without training."""
    lines = []
    for r in records:
        with gzip.open(r["eval_completions"], "rt", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                lines.append(
                    json.dumps({"cell": r["cell"], "recipe": r["recipe"], "env": r["env"], "seed": r["seed"], **row})
                )
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0))


def _html_rows(header: list[str], body: list[list[str]]) -> str:
    rows = [_ROW.substitute(cells="".join(_HEADER_CELL.substitute(text=html.escape(h)) for h in header))]
    rows += [_ROW.substitute(cells="".join(_CELL.substitute(text=html.escape(str(c))) for c in row)) for row in body]
    return "\n".join(rows)


def _html_page(grid_line: str, rows: list[dict], out: Path, columns=COLUMNS, mode: str = "exact", means=()) -> str:
    from ..plots import png_data_uri

    figures = [
        _FIGURE.substitute(title=html.escape(title), name=name, uri=png_data_uri(out / name))
        for name, title in (TEXT_PLOTS if mode == "text" else PLOTS).items()
    ]
    second = ""
    if means:  # a text grid's mean ± s.e. table, under the main one
        second = _MEANS.substitute(line=html.escape(MEANS_LINE), table=_html_rows(*mean_table(rows, means)))
    return PAGE.substitute(
        grid_line=html.escape(grid_line),
        scores=SCORES[mode],
        table=_html_rows(*_table(rows, columns)),
        means=second,
        figures="\n".join(figures),
    )
