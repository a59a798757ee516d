"""``tokenmdp explain RUN_DIR``: token heat maps of credit assignment against the true A*.

For a finished (or checkpointed) toy run it samples responses from the trained policy and
scores every token with each installed plugin's *credit views* (hook
``tokenmdp_credit_views``, rows built from the plugins' own components through the
registry), beside the exact ``A*(s_t, a_t)`` of the solver under the run's own reference.
The built-in plugins contribute:

    Inverse-Q* token    beta * log(pi_hat*/pi_ref)(a_t|s_t)        (log-ratio, form=token)
    Inverse-Q* return   sum_{k>=t} of the above                    (log-ratio, form=return)
    GAE                 ppo-rewards + gae, with the run's critic, or exact V^pi if it has none
    DPO implicit        beta * log(pi_theta/pi_ref)(a_t|s_t)       (preference-pairs + implicit-reward)
    RLOO, GRPO          one number per response, on every token   (rloo/grpo + sequence-credit)

A run whose own estimator and advantage constructor no view shows (REINFORCE, or an
outside plugin's components) gets a row of its own: ``this run: <estimator> + <advantage>``.

Every advantage is shown unwhitened, so its numbers are in reward units (whitening is an
affine map over the batch and leaves the correlation with A* unchanged). RLOO and GRPO
need groups, so each shown response is the first of a group of ``group_size`` responses
to one prompt, sampled as ``train.samples_per_prompt`` samples them (two groups never
merge, even when they share a prompt); the correlations are over every token of every
sampled response.
"""

from __future__ import annotations

import io
from pathlib import Path

import attrs
import torch
from torch import Tensor

from ..config import Config, load_config
from ..errors import ConfigError, TokenMDPError
from ..mdp.solver import Solution, solve, tree_logprobs
from ..plugin.batch import RolloutBatch, token_logprobs
from ..plugin.components import CreditView
from ..plugin.composition import Composition, compose
from ..plugin.context import TrainContext
from ..plugin.ops import correlation_interval, masked_correlation
from ..plugin.registry import Registry
from ..text.callables import code_barrier
from ..training.checkpoints import read_checkpoint
from ..training.envs import load_task, make_vector_env
from ..training.mc_credit import monte_carlo_credit
from ..training.models import load_policy, load_reference
from ..training.rollout import collect
from ..training.rundir import latest_checkpoint
from .explorer import CMAP, page_data, prefix_trees, render

TRUE_ROW = "true A*"
#: Whose ``A(s_t, a_t)`` the Monte-Carlo ground truth of a text run estimates (``--truth``).
TRUTH_POLICIES = ("policy", "reference")
#: ``--budget``'s default: sampled tokens of the Monte-Carlo ground truth (docs/explain.md).
DEFAULT_BUDGET = 200_000
#: Bounds of ``--samples`` (one PNG each) and ``--group-size``.
MAX_SAMPLES, MAX_GROUP = 64, 256


@attrs.define
class Explanation:
    """What ``explain`` computed and wrote; also what the explorer page is drawn from
    (:func:`tokenmdp.reports.explorer.page_data`), whatever the ground truth is."""

    labels: list[str]  # one per estimator, then the ground truth (``truth``)
    notes: dict[str, str]  # label -> how it was computed
    credit: dict[str, Tensor]  # label -> [B, T] per-token credit (0 on padding)
    correlations: dict[str, float]  # label -> Pearson correlation with the ground truth over all real tokens
    batch: RolloutBatch  # with logprobs and ref_logprobs
    shown: list[int]  # batch rows drawn as heat maps and on the page
    skipped: dict[str, str]  # estimator -> why it could not be built for this run
    images: list[Path]
    html: Path
    header: str
    #: The ground truth's label (the last of ``labels``): TRUE_ROW on toy runs.
    truth: str = TRUE_ROW
    #: label -> [B, T] standard error per token (a Monte-Carlo ground truth); the page shows
    #: ``value ± stderr`` where one is given.
    stderr: dict[str, Tensor] = attrs.Factory(dict)
    #: label -> (low, high): a confidence interval of the correlation, shown beside it.
    intervals: dict[str, tuple[float, float]] = attrs.Factory(dict)


def load_run(run_dir: str | Path):
    """(config, registry, task, policy, reference, checkpoint path) of a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"explain: {str(run_dir)!r} is not a run directory (no config.toml)")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not (run_dir / "reference.pt").is_file():
        raise ConfigError(
            f"explain: {str(run_dir)!r} has no checkpoint and reference.pt (an unfinished run); "
            "explain reads the policy of the last checkpoint"
        )
    config = load_config(run_dir / "config.toml")
    with code_barrier(run_dir):  # where the run now lives (its config names where it was made)
        registry, task = load_task(config)
    policy = load_policy(run_dir, task).requires_grad_(False).eval()
    return config, registry, task, policy, load_reference(run_dir, config, task), checkpoint


def exact_policy_values(solution: Solution, policy_logp: list[Tensor], kl_coef: float) -> list[Tensor]:
    """``V^pi(s)`` of the KL-penalised reward ``R - kl_coef * log(pi/pi_ref)`` on every state:
    the value a perfect PPO critic of ``pi`` would learn (stands in when the run has none)."""
    return solution.policy_values(policy_logp, kl_coef)[1]


def sample(
    policy, reference, env, prompt_index: Tensor, seed: int, group_size: int = 1
) -> tuple[RolloutBatch, torch.Generator]:
    """Responses of ``policy`` to the given prompts, rewarded by the env and scored by both
    models; each ``group_size`` consecutive rows are one group (as ``train.samples_per_prompt``)."""
    generator = torch.Generator().manual_seed(seed)
    batch = collect(
        policy, env, seed=seed, generator=generator, prompt_index=prompt_index, samples_per_prompt=group_size
    )
    with torch.no_grad():
        batch.logprobs = token_logprobs(policy, batch)
        batch.ref_logprobs = token_logprobs(reference, batch)
    return batch, generator


@attrs.define
class ExplainContext:
    """What a plugin's credit views read (hook ``tokenmdp_credit_views``)."""

    #: The run's own components, built with its options.
    run: Composition
    registry: Registry
    #: The run's config.
    config: Config
    #: The run's trained policy, its reference, the exact solution; step 1.
    ctx: TrainContext
    #: The sampled responses, with ``logprobs`` and ``ref_logprobs``.
    batch: RolloutBatch
    #: The run's last checkpoint.
    checkpoint: Path
    #: ``explain --guide``: the guide an Inverse-Q* view uses on a run that trained without
    #: one (a text run has no exact pi* to fall back on); None: none given.
    guide: str | None = None

    @property
    def exact(self) -> bool:
        """Whether the run's env has an exact solver (``ctx.solution``): toy envs do."""
        return self.ctx.solution is not None

    def like_run(self, kind: str, name: str, **overrides):
        """Component ``name`` with the run's options if the run used it, else the defaults,
        with ``overrides`` applied (e.g. ``whiten=False``)."""
        used = getattr(self.run, kind)
        cls = self.registry.component(kind, name)
        options = used.options if used.name == name else cls.Options()
        return cls(attrs.evolve(options, **overrides))

    def credit_of(self, estimator, advantage, values: Tensor | None = None) -> Tensor:
        """``[B, T]``: ``advantage``'s advantages from ``estimator``'s signals on the batch."""
        signals = dict(estimator.estimate(self.batch, self.ctx))
        if values is not None:
            signals["values"] = values
        return advantage.construct(self.batch, signals, self.ctx)["advantages"] * self.batch.response_mask

    def checkpoint_state(self, kind: str) -> dict:
        """The run's checkpointed state of its component of ``kind`` (e.g. a critic)."""
        return read_checkpoint(self.checkpoint)["components"].get(kind, {})

    def exact_values(self, kl_coef: float) -> Tensor:
        """``[B, T]``: the exact ``V^pi(s_t)`` of the KL-penalised reward at each response
        token's state, the value a perfect critic of the run's policy would learn."""
        ctx, batch = self.ctx, self.batch
        if not self.exact:
            raise TokenMDPError(
                f"env {self.config.env['id']} has no exact solver, so no exact V^pi: GAE is shown with a run's own "
                "critic only (a PPO run)"
            )
        v = exact_policy_values(ctx.solution, tree_logprobs(ctx.policy, ctx.task), kl_coef)
        return ctx.solution.along_responses(
            v.__getitem__, batch.prompt_index, batch.response_ids, batch.response_mask, per_action=False
        ).float()


def credit_views(explain: ExplainContext, pm) -> list[CreditView]:
    """Every installed plugin's credit views (in ``order``), then, when no view shows the
    run's own ``(estimator, advantage)`` pair, a generic view of it."""
    views = sorted(
        (v for found in pm.hook.tokenmdp_credit_views(explain=explain) for v in found), key=lambda v: v.order
    )
    run = explain.run
    pair = (run.estimator.name, run.advantage.name)
    if not any(pair in v.shows for v in views):
        views.append(CreditView(name="this run", rows=_the_runs_own_rows, order=1000, shows=(pair,)))
    return views


def _the_runs_own_rows(explain: ExplainContext):
    """The run's own estimator and advantage constructor, with its options and its
    checkpointed estimator state, unwhitened (so any plugin's components get a row)."""
    run = explain.run
    estimator = explain.like_run("estimator", run.estimator.name)
    fields = attrs.fields_dict(type(run.advantage.options))
    advantage = explain.like_run("advantage", run.advantage.name, **({"whiten": False} if "whiten" in fields else {}))
    estimator.setup(explain.ctx)
    estimator.load_state_dict(explain.checkpoint_state("estimator"))
    yield (
        f"this run: {estimator.name} + {advantage.name}",
        f"the run's own {estimator.name} + {advantage.name}, with its options, unwhitened",
        explain.credit_of(estimator, advantage),
    )


def explain(
    run_dir: str | Path,
    samples: int = 4,
    seed: int = 0,
    out: str | Path | None = None,
    group_size: int = 8,
    k: int = 8,
    budget: int | None = DEFAULT_BUDGET,
    truth_policy: str = "policy",
    guide: str | None = None,
) -> Explanation:
    """Sample ``samples`` responses (each with ``group_size - 1`` more to the same prompt),
    compute every estimator's credit and the ground truth, write PNGs and the explorer page.

    The ground truth is the solver's exact A* on a toy env; on a text env (no solver) it is
    the Monte-Carlo ``A(s_t, a_t)`` under ``truth_policy`` (``"policy"``: the run's trained
    policy, or ``"reference"``) from ``k`` continuations of every prefix, on the shown
    responses first and then the others while their cost fits ``budget`` sampled tokens
    (:mod:`tokenmdp.training.mc_credit`). ``guide``: the text guide of the Inverse-Q* row on
    a text run that trained without one."""
    if not 1 <= samples <= MAX_SAMPLES or not 2 <= group_size <= MAX_GROUP:
        raise ConfigError(
            f"explain: --samples must be in 1..{MAX_SAMPLES} (one heat map each) and --group-size in "
            f"2..{MAX_GROUP} (got {samples}, {group_size})"
        )
    if truth_policy not in TRUTH_POLICIES:
        raise ConfigError(f"explain: --truth must be one of {', '.join(TRUTH_POLICIES)} (got {truth_policy!r})")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ConfigError(f"explain: --budget must be a positive number of sampled tokens (got {budget!r})")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"explain: --out {str(out)!r} is a file; give a folder for the heat maps and the page")
    run_dir = Path(run_dir)
    config, registry, task, policy, reference, checkpoint = load_run(run_dir)
    run = compose(registry, config)
    solution = solve(task, reference, config.train.beta) if task.exact else None
    n_prompts = task.prompts.shape[0]
    prompt_index = (torch.arange(samples) % n_prompts).repeat_interleave(group_size)
    with code_barrier(run_dir):
        env = make_vector_env(registry, config, len(prompt_index), compute_rewards=task.has_reward)
    batch, generator = sample(policy, reference, env, prompt_index, seed, group_size)
    # explain is one step of each estimator: train.steps = 1 keeps step-budgeted set-ups tiny
    one_step = attrs.evolve(config, train=attrs.evolve(config.train, steps=1))
    ctx = TrainContext(
        policy=policy,
        reference=reference,
        beta=config.train.beta,
        task=task,
        config=one_step,
        step=1,
        generator=generator,
        solution=solution,
    )

    labels, notes, credit, skipped = [], {}, {}, {}
    context = ExplainContext(
        run=run, registry=registry, config=config, ctx=ctx, batch=batch, checkpoint=checkpoint, guide=guide
    )
    for view in credit_views(context, registry.pm):
        name = view.name
        try:
            with torch.no_grad():
                computed = list(view.rows(context))
            for label, note, values in computed:
                labels.append(label)
                notes[label], credit[label] = note, values.detach().double()
        except TokenMDPError as exc:  # e.g. a run-specific option this estimator cannot honour
            skipped[name] = str(exc)
    shown = list(range(0, len(prompt_index), group_size))
    truth = ground_truth(
        solution, policy, reference, task, batch, config.train.beta, shown, k, budget, truth_policy, seed
    )
    labels.append(truth.label)
    notes[truth.label], credit[truth.label] = truth.note, truth.values
    scored = batch.response_mask.double() * truth.rows[:, None]  # tokens the truth covers
    correlations = {label: masked_correlation(credit[label], truth.values, scored) for label in labels}
    intervals = {label: correlation_interval(credit[label], truth.values, scored, seed=seed) for label in labels}

    out = Path(out) if out is not None else run_dir / "explain"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("response_*.png"):  # an earlier explain with more samples
        old.unlink()
    images = []
    for i, row in enumerate(shown):
        path = out / f"response_{i}.png"
        path.write_bytes(heat_map_png(labels, credit, batch, row, task))
        images.append(path)
    step = int(checkpoint.stem.split("_")[-1])
    finished = "finished" if (run_dir / "summary.json").is_file() else "NOT finished"
    header = (
        f"{run_dir}: {config.env['id']} (vocab {task.vocab_size}, horizon {task.horizon}), "
        f"{run.estimator.name} + {run.advantage.name} + {run.updater.name}, checkpoint step {step} ({finished}), "
        f"beta={config.train.beta:g}; {len(prompt_index)} responses ({samples} shown, groups of "
        f"{group_size}), {batch.num_tokens} tokens, seed {seed}; ground truth: {truth.summary}"
    )
    result = Explanation(
        labels,
        notes,
        credit,
        correlations,
        batch,
        shown,
        skipped,
        images,
        out / "index.html",
        header,
        truth=truth.label,
        stderr={truth.label: truth.stderr} if truth.stderr is not None else {},
        intervals=intervals,
    )
    trees = ()
    if solution is not None:
        prompts = list(dict.fromkeys(int(batch.prompt_index[row]) for row in shown))  # the shown ones, in order
        trees = prefix_trees(
            solution,
            tree_logprobs(policy, task),
            prompts,
            lambda a: token_label(task, a),
            lambda p: prompt_label(task, p),
        )
    prompt_of_row = lambda row: prompt_label(task, int(batch.prompt_index[row]))
    data = page_data(result, lambda a: token_label(task, a), prompt_of_row, trees, images)
    result.html.write_text(render(data), encoding="utf-8")
    return result


@attrs.frozen
class GroundTruth:
    """What explain compares every estimator with."""

    label: str
    note: str
    values: Tensor  # [B, T] float64, 0 on padding and on rows not estimated
    stderr: Tensor | None  # [B, T] (a Monte-Carlo estimate), else None
    rows: Tensor  # [B] float64 1/0: the rows it covers
    summary: str  # for the header


def ground_truth(solution, policy, reference, task, batch, beta, shown, k, budget, truth_policy, seed) -> GroundTruth:
    """The solver's exact A* (toy envs), or the Monte-Carlo estimate of ``A(s_t, a_t)``
    under ``truth_policy`` with K continuations per prefix, the ``shown`` rows first."""
    if solution is not None:
        values = solution.token_advantages(batch.prompt_index, batch.response_ids, batch.response_mask)
        note = f"Q*(s_t,a_t) - V*(s_t) from the exact solver, under this run's reference, beta={beta:g}"
        return GroundTruth(TRUE_ROW, note, values, None, torch.ones(batch.size, dtype=torch.float64), "exact A*")
    model = policy if truth_policy == "policy" else reference
    which = "A^pi" if truth_policy == "policy" else "A^pi_ref"
    order = torch.tensor(shown + [r for r in range(batch.size) if r not in set(shown)])
    generator = torch.Generator().manual_seed(seed ^ 0x7E57)  # its own stream: the batch's stays as it was
    mc = monte_carlo_credit(model, reference, task, batch.select(order.to(batch.device)), beta, k, generator, budget)
    values, stderr = torch.zeros_like(mc.advantages), torch.zeros_like(mc.stderr)
    values[order], stderr[order] = mc.advantages, mc.stderr
    rows = torch.zeros(batch.size, dtype=torch.float64)
    rows[order] = mc.estimated.double()
    label = f"Monte-Carlo {which} (K={k})"
    model_name = "the run's policy" if truth_policy == "policy" else "the reference"
    note = (
        f"Q(s_t,a_t) - V(s_t) of the reward less beta={beta:g} x log(pi/pi_ref), from {k} continuations of every "
        f"prefix sampled from {model_name}; {int(rows.sum())} of {batch.size} responses, "
        f"{mc.sampled_tokens:,} sampled tokens"
    )
    summary = f"{label}, {int(rows.sum())}/{batch.size} responses, {mc.sampled_tokens:,} sampled tokens"
    return GroundTruth(label, note, values, stderr, rows, summary)


# --- rendering --------------------------------------------------------------------------


def token_label(task, token: int) -> str:
    tokenizer = task.tokenizer
    text = tokenizer.decode([token]) if tokenizer is not None else str(token)
    return f"{text} (eos)" if token == task.eos_token else text


def prompt_label(task, prompt: int) -> str:
    """A toy prompt as its token list (``[2, 0]``), a text prompt as its text."""
    if task.tokenizer is not None:
        return task.prompt_text(prompt)
    return str(task.prompts[prompt].tolist())


def _row_scaled(values: Tensor) -> Tensor:
    """Each row divided by its own max |value|: the estimators' scales differ (a sum, a
    z-score, a log-ratio), and the picture is about *where* the credit goes."""
    scale = values.abs().amax(-1, keepdim=True)
    return torch.where(scale > 0, values / scale.clamp(min=1e-12), 0)


def _matrix(labels, credit, batch, row) -> tuple[Tensor, int]:
    length = int(batch.response_mask[row].sum())  # real tokens only: padding is not drawn
    return torch.stack([credit[label][row, :length] for label in labels]), length


def heat_map_png(labels, credit, batch, row: int, task) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values, length = _matrix(labels, credit, batch, row)
    fig = Figure(figsize=(3.2 + 1.0 * length, 0.9 + 0.42 * len(labels)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scaled = _row_scaled(values)
    image = ax.imshow(scaled.numpy(), cmap=CMAP, vmin=-1, vmax=1, aspect="auto")
    for i in range(values.shape[0]):
        for t in range(length):
            ink = "white" if abs(float(scaled[i, t])) > 0.6 else "black"
            ax.text(t, i, f"{float(values[i, t]):+.2f}", ha="center", va="center", fontsize=8, color=ink)
    ax.axhline(len(labels) - 1.5, color="black", linewidth=1.5)  # the true A* row below the line
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    tokens = batch.response_ids[row, :length].tolist()
    ax.set_xticks(range(length), [f"t={t}\n{token_label(task, a)}" for t, a in enumerate(tokens)], fontsize=8)
    prompt = batch.prompt_ids[row].tolist()
    reward = float(batch.sequence_rewards[row])
    ax.set_title(f"prompt {prompt} (#{int(batch.prompt_index[row])}), response {tokens}, R = {reward:g}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="credit / row's max |credit|")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def correlation_table(explanation: Explanation) -> str:
    """Plain-text table of the correlations with the ground truth and their 95% intervals
    (a bootstrap over responses), for the command line."""
    width = max(len(label) for label in explanation.labels)
    truth = "A*" if explanation.truth == TRUE_ROW else "truth"
    lines = [f"{'estimator'.ljust(width)}  corr with {truth}  95% interval     how"]
    for label in explanation.labels:
        low, high = explanation.intervals.get(label, (float("nan"), float("nan")))
        interval = f"[{low:+.3f}, {high:+.3f}]"
        lines.append(
            f"{label.ljust(width)}  {explanation.correlations[label]:>{11 + len(truth)}.3f}  {interval:<16} "
            f"{explanation.notes[label]}"
        )
    lines += [f"skipped {name}: {why}" for name, why in explanation.skipped.items()]
    return "\n".join(lines)
