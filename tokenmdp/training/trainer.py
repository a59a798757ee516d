"""The training loop, as a template method: collect -> estimate -> construct -> update.

Everything that can fail on bad input (config, plugin names, composition, env options)
is checked in ``Trainer.__init__``, before any model is built or any file is written.
Building the models and saving checkpoints are the trainer's too; the other jobs around the
loop have modules of their own (``envs``, ``checks``, ``resume``, ``recording``, ``rundir``,
``models``, ``rows``, ``interrupts``, ``summary``).
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from .. import distributed, host_memory, sharding
from ..config import Config, dump_config
from ..devices import PRECISIONS, resolve_device
from ..errors import ConfigError, PluginError, RewardError, TrainingInterrupted
from ..plugin.batch import RolloutBatch, token_logprobs
from ..plugin.chunked import resolve_chunk
from ..plugin.composition import Composition, compose, lm_defaults_line, with_recipe_defaults
from ..plugin.context import TrainContext
from ..plugin.ops import check_finite
from ..plugin.registry import Registry, plugin_manager
from ..plugin.signals import check_signal_shapes
from ..policies.base import place
from .budget import check_before_env, check_run
from .checkpoints import read_weights
from .checks import check_launch, check_model_options, check_text_setup
from .credit_check import credit_against_monte_carlo
from .envs import make_vector_env
from .evaluation import ExactEvaluator, SampledEvaluator
from .guards import call_component
from .interrupts import StopRequest, deferred_interrupt, quiet_after_a_stop
from .layout import REFERENCE
from .models import frozen_reference, initial_policy, pretrained_sharded, split_reference
from .recording import Recording, record_fresh, stage_given_objects
from .resume import checked_for_resume, resumed_config
from .rollout import collect_step, step_generators, step_seed, with_stop_strings
from .rows import RunLog, StepResult, completion_rows, step_row
from .rundir import RunDir, check_run_dir_value
from .summary import run_summary


@attrs.define
class Run:
    """What lifecycle hooks see: the run directory, config and a slot for per-run resources."""

    dir: Path
    config: Config
    composition: Composition
    start_step: int = 0
    resources: dict = attrs.field(factory=dict)


@attrs.frozen
class LoopEnd:
    """Where the loop stopped: env tokens so far, the step that reached ``train.target_regret_frac``
    (None: it went to ``train.steps``), and the last (up to) 10 steps' ``credit_corr``."""

    env_tokens: int
    stopped_at: int | None
    recent_credit: list[float]


class Trainer:
    def __init__(
        self,
        config: Config,
        pm=None,
        resume: bool = False,
        objects: dict | None = None,
        reference_cache: str | Path | None = None,
    ):
        #: Inputs given as Python objects (``tokenmdp.train``): ``env`` values and ``model``.
        self.objects = dict(objects or {})
        self.resume = resume
        #: A folder of fine-tuned references shared by runs with the same key (compare's).
        self.reference_cache = reference_cache
        self.pm = pm if pm is not None else plugin_manager()
        self.registry = Registry(self.pm)
        self.registry.register_envs()
        # A run directory works from any folder: a fresh run records the paths it names
        # absolute; a resumed one first checks that they are all still there.
        self.recording: Recording | None = None
        if resume:
            config, self.lm_defaults = checked_for_resume(config, self.objects), {}
        else:
            config, self.lm_defaults = with_recipe_defaults(self.registry, config)
            self.recording = record_fresh(config, self.objects, self.lm_defaults)
            config = self.recording.config
        self.config = config
        self.composition = compose(self.registry, config)
        self._make_env(config)
        self.device = resolve_device(config.train.device)
        if self.task.rewards is not None:
            self.task.rewards.place(self.device)  # reward models score on the policy's device
        self.autocast_dtype = PRECISIONS[config.train.precision]
        check_model_options(config)
        for component in self.composition.components:
            component.check(config, self.task)
        check_run(config, self.task)  # before the solver, the SFT data and the models are built
        self.run_dir = Path(config.run.dir)
        self.rundir = RunDir(self.run_dir)
        self.rundir.saves = tuple(self.recording.saving) if self.recording is not None else ()
        #: Whether each step scores the reference (``batch.ref_logprobs``): for the
        #: ``objective/kl`` metric, or for a component that declares it reads them.
        self.scores_reference = config.train.log_kl or any(
            "ref_logprobs" in c.requires for c in self.composition.components
        )
        check_launch(config)
        sharding.check_sharding(config)
        check_run_dir_value(config.run.dir)
        self.rundir.check_usable(resume, config.run.overwrite)
        # Built by build_models().
        self.policy = self.reference = self.evaluator = self.ctx = None
        self.sft_losses: list[float] = []
        self._last_eval: tuple[int, dict[str, float]] | None = None
        #: The run's wall clock across resumes: (this piece's start, seconds of the earlier
        #: pieces, the step the count starts at: 0, or where a checkpoint without a count resumed)
        self._clock: tuple[float, float, int] = (time.perf_counter(), 0.0, 0)

    def _make_env(self, config: Config) -> None:
        """The training env and its task, and how the run samples from it."""
        t = config.train
        own_distribution = t.temperature == 1.0 and t.top_k is None and t.top_p is None
        wanted = t.logprobs_from == "sampling" or (t.logprobs_from == "auto" and config.policy.get("kind") == "hf")
        #: batch.logprobs read off the sampling pass instead of a second forward pass
        self.scores_while_sampling = wanted and own_distribution
        self.sampler = t.sampler_for(config.policy.get("kind"))
        try:
            self.sampling = self.registry.sampling_backend(config.train.sampling_backend)(config)
        except PluginError as exc:
            raise ConfigError(str(exc)) from None
        check_before_env(config)  # a huge batch would fail inside the env's allocation
        self.env = make_vector_env(
            self.registry,
            config,
            config.train.batch_size,
            compute_rewards=self.composition.needs_env_reward,
            objects=self.objects.get("env"),
        )
        self.task = self.env.task
        check_text_setup(config, self.task)
        self.sampling = with_stop_strings(self.sampling, config, self.task)  # training and evaluation

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, overrides: list[str] = (), pm=None, objects=None) -> Trainer:
        """Resume the run in ``run_dir`` (wherever it now lives); ``overrides`` may extend
        it, e.g. ``train.steps=500``."""
        return cls(resumed_config(run_dir, overrides, objects), pm=pm, resume=True, objects=objects)

    # --- set-up -------------------------------------------------------------------
    def build_models(self) -> None:
        """The policy, its reference (on ``train.device``), the evaluator, ``ctx``, and each
        component's ``setup``."""
        cfg = self.config
        if cfg.train.release_memory and not host_memory.release_freed_memory():
            raise ConfigError("train.release_memory: glibc's mallopt refused the threshold; unset train.release_memory")
        sharded = cfg.train.sharding == "fsdp"
        # a sharded full fine-tune of a saved model loads each rank's shards only; anything else
        # (LoRA, a model object, a reference fine-tuned first) is built whole, then sharded
        meta = "path" in cfg.policy and not cfg.policy.get("lora") and cfg.reference.init == "init"
        if sharded and meta and self.objects.get("model") is None:
            self._build_sharded_models()
        else:
            self._build_models(sharded)
        t = cfg.train
        if self.task.exact:
            self.evaluator = ExactEvaluator(self.task, self.reference, t.beta)
        else:
            self.evaluator = SampledEvaluator(
                self.task.eval_task,
                self.reference,
                t.beta,
                t.eval_samples or t.batch_size,
                seed=step_seed(t.seed, 0) ^ 0x5CA1AB1E,
                temperature=t.temperature,
                top_k=t.top_k,
                top_p=t.top_p,
                sampler=self.sampler,
                backend=self.sampling,
                logit_chunk=resolve_chunk(t.logit_chunk, self.task.vocab_size),
            )
        exact = self.evaluator if self.task.exact else None
        self.ctx = TrainContext(
            policy=self.policy,
            reference=self.reference,
            beta=t.beta,
            task=self.task,
            config=cfg,
            solution=exact.solution if exact else None,
            evaluator=exact,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )
        # on the sharded models: a setup builds optimizers over the parameters (their shards);
        # one that samples (DPO's pairs) gets them gathered by tokenmdp.generate
        for component in self.composition.components:
            call_component(component, "setup", self.ctx.step, component.setup, self.ctx)

    def _build_models(self, sharded: bool) -> None:
        """The policy and its reference, each built whole in this process (then sharded)."""
        cfg = self.config
        base, self.sft_losses = initial_policy(
            cfg,
            self.task,
            self.run_dir / REFERENCE if self.resume else None,
            model=self.objects.get("model"),
            cache_dir=self.reference_cache,
        )
        self._check_positions(base)
        policy, reference = split_reference(base)
        self._place(policy, reference)
        if sharded:  # after the reference's split: the copy is sharded apart
            sharding.shard_policy(self.policy, self.autocast_dtype)
            if base.reference_view() is None:  # a full fine-tune's frozen copy (LoRA: the policy's view)
                sharding.shard_policy(self.reference, self.autocast_dtype)

    def _build_sharded_models(self) -> None:
        """A full fine-tune's policy and reference from ``policy.path``, sharded, no rank
        holding either whole: each rank reads its shards of the pretrained weights
        (:func:`.models.pretrained_sharded`); a resumed run's reference from its
        reference.pt."""
        path = self.config.policy["path"]
        policy = pretrained_sharded(path, self.task.vocab_size, self.autocast_dtype, self.device)
        self._check_positions(policy)
        reference = pretrained_sharded(path, self.task.vocab_size, self.autocast_dtype, self.device)
        if self.resume and (self.run_dir / REFERENCE).is_file():
            reference.load_state_dict(read_weights(self.run_dir / REFERENCE))  # whole: cut into shards
        self._place(policy, frozen_reference(reference))

    def _check_positions(self, base) -> None:
        longest = self.task.prompts.shape[1] + self.task.horizon
        if base.max_positions is not None and longest > base.max_positions:
            raise ConfigError(
                f"env.horizon = {self.task.horizon} after prompts of up to {self.task.prompts.shape[1]} tokens is "
                f"{longest} positions, more than the model's {base.max_positions}; lower env.horizon or "
                "env.max_prompt_tokens"
            )

    def _place(self, policy, reference) -> None:
        """The policy and reference on ``train.device`` in the run's precision; the policy in
        eval mode (no dropout) everywhere but the updater's forward, where
        ``train.disable_dropout`` (default) turns its dropout off too."""
        cfg = self.config
        self.reference = place(reference, self.device, self.autocast_dtype, no_dropout=False)
        self.policy = place(policy, self.device, self.autocast_dtype, no_dropout=cfg.train.disable_dropout).eval()
        if cfg.train.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()

    def whole_models(self):
        """Sharded models gathered whole for the block (rank 0's evaluation, which runs
        forwards on one rank only); every rank enters it. Unsharded: nothing."""
        return sharding.gathered(self.policy, self.reference)

    # --- the loop -----------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train; under torchrun, on every rank (rank 0 writes the files and calls the hooks)."""
        joined = distributed.init()
        main = distributed.is_main()
        created = not self.run_dir.exists()
        stop = StopRequest()  # set by SIGINT/SIGTERM: the loop stops after the step in flight
        try:
            # signals are deferred for the whole run, teardown included: a second Ctrl-C while
            # the last step is saved cannot cut the run short
            with (
                quiet_after_a_stop(stop),
                self.rundir.locked() if main else contextlib.nullcontext(),
                deferred_interrupt(stop),
            ):
                try:
                    if main and not self.resume:
                        self.rundir.claim()  # the folder is tokenmdp's from now on: rerunnable however it ends
                    return self._train(stop)
                except BaseException:
                    if main and not self.resume and self.rundir.latest_checkpoint() is None:
                        self.rundir.discard(remove_folder=created)  # nothing to resume: leave no run behind
                    raise
        finally:
            if self.config.train.sharding == "fsdp":
                self._release_sharded_models()
            if joined is not None:
                distributed.shutdown()

    def _release_sharded_models(self) -> None:
        """Drop the sharded models (and the optimizers over their shards) before the process
        group goes: FSDP2's state holds the group, and a group freed at interpreter exit,
        after ``destroy_process_group``, aborted the process ("terminate called without an
        active exception", in 4 of 31 two-rank runs on gloo). The trained weights are in the checkpoint
        (``tokenmdp.load_policy(run_dir)``)."""
        import gc

        self.policy = self.reference = self.ctx = self.evaluator = self.composition = None
        gc.collect()

    def _train(self, stop: StopRequest) -> dict[str, Any]:
        cfg = self.config
        main = distributed.is_main()
        line = lm_defaults_line(cfg, self.lm_defaults)
        if line and main:
            print(f"tokenmdp: {line}", flush=True)
        fresh = self.recording is not None and main
        staged = stage_given_objects(self.rundir, self.recording.saving) if fresh else {}
        self.build_models()
        start_step, env_tokens = self._prepare_run_dir(staged)
        run = Run(dir=self.run_dir, config=cfg, composition=self.composition, start_step=start_step)
        log = RunLog(self.rundir, self.pm, run)
        self._clock = (time.perf_counter(), *self._clock[1:])
        recent_credit: list[float] = []
        summary, outcome, ended = None, "failed", False
        try:
            with self.whole_models(), distributed.agreement("tokenmdp_on_train_start"):
                if main:
                    log.start(text=not self.task.exact)
                    if start_step == 0:
                        log.emit(0, {"env_tokens": 0, **self._evaluate(0)})
                    recent_credit = self.rundir.metrics.logged_values("credit_corr")[-10:]
            end = self._loop(log, start_step, env_tokens, recent_credit, stop)
            with self.whole_models(), distributed.agreement("the summary"):
                if main:
                    final = self._evaluate(end.stopped_at or cfg.train.steps)
                    summary = run_summary(
                        cfg,
                        self.composition,
                        self.task,
                        start=self.evaluator.start,
                        final=final,
                        env_tokens=end.env_tokens,
                        wall_seconds=self._wall_seconds(),
                        j_star=self.evaluator.solution.j_star if self.task.exact else None,
                        stopped_at=end.stopped_at,
                        recent_credit=end.recent_credit,
                        warnings=log.warnings,
                        guided_reference=self._guided_reference(),
                    )
                    # where wall_seconds starts: 0, or the step an older checkpoint without a count resumed at
                    summary["wall_from_step"] = self._clock[2]
                    score = cfg.train.score_credit
                    if not self.task.exact and not isinstance(score, bool):
                        # the run's own credit against a Monte-Carlo ground truth (no A* on text)
                        seed = step_seed(cfg.train.seed, cfg.train.steps + 1) ^ 0xC4ED17
                        summary |= credit_against_monte_carlo(self, score, cfg.train.score_credit_k, seed)
                    self.rundir.write_summary(summary, self.evaluator.samples)
                    ended = True  # inside the agreement: a plugin failing here stops every rank
                    log.end(summary, "completed")
        except (TrainingInterrupted, KeyboardInterrupt):
            outcome = "interrupted"
            raise
        finally:
            if log.started and not ended:
                log.end(summary, outcome)
        return distributed.broadcast_object(summary)

    def _loop(
        self, log: RunLog, start_step: int, env_tokens: int, recent_credit: list[float], stop: StopRequest
    ) -> LoopEnd:
        cfg = self.config
        main = distributed.is_main()
        target = cfg.train.target_regret_frac
        for step in range(start_step + 1, cfg.train.steps + 1):
            result = self.train_step(step)
            metrics = dict(result.metrics)
            if "credit_corr" in metrics:
                recent_credit = [*recent_credit, metrics["credit_corr"]][-10:]
            env_tokens += result.tokens
            metrics["env_tokens"] = env_tokens
            evaluates = step % cfg.train.eval_every == 0 or step == cfg.train.steps
            with (
                self.whole_models() if evaluates else contextlib.nullcontext(),
                distributed.agreement(f"tokenmdp_on_step_end at step {step}"),
            ):
                if main:  # the ranks hold the same weights: rank 0 evaluates and logs
                    if evaluates:
                        metrics.update(self._evaluate(step))
                    log.emit(step, metrics, result.completions)
            reached = target is not None and metrics.get("regret_frac", float("inf")) <= target
            if target is not None:
                reached = distributed.broadcast_object(reached)
            every = cfg.run.checkpoint_every
            if (every and step % every == 0) or step == cfg.train.steps or reached:
                self.save_checkpoint(step, env_tokens)
            if reached:
                return LoopEnd(env_tokens, step, recent_credit)
            if distributed.any_rank(stop.is_set()):  # Ctrl-C/SIGTERM: finish the step, save, stop
                self.save_checkpoint(step, env_tokens)
                signum = stop.signum or signal.SIGINT
                raise TrainingInterrupted(
                    f"interrupted ({signal.Signals(signum).name}) after step {step}; checkpoint saved; continue "
                    f"with: tokenmdp train --resume {self.run_dir}",
                    signum=signum,
                )
        return LoopEnd(env_tokens, None, recent_credit)

    def _guided_reference(self) -> dict[str, float] | None:
        """A text run's guided reference ``pi_ref(.|c + x)`` on the held-out prompts, for the
        first text guide of its components (:meth:`Component.guide`); None without one."""
        guide = next((g for c in self.composition.components if isinstance(g := c.guide(), str)), None)
        if self.task.exact or guide is None:
            return None
        return self.evaluator.evaluate(self.reference, prefix_ids=self.task.eval_task.encode_guide(guide))

    def _evaluate(self, step: int) -> dict[str, float]:
        """Score the policy, once per step: the summary reuses the last step's scores (the
        policy has not changed since), which saves a full exact or sampled evaluation."""
        cached = self._last_eval
        if cached is not None and cached[0] == step:
            return dict(cached[1])
        try:
            scores = self.evaluator.evaluate(self.policy)
        except RewardError as exc:
            raise RewardError(f"{exc} (in the evaluation at step {step})") from exc
        self._last_eval = (step, dict(scores))
        return scores

    def train_step(self, step: int) -> StepResult:
        """collect -> estimate -> construct -> update, for one batch of responses."""
        rewards = self.task.rewards  # env.reward of a text task; None elsewhere
        if rewards is not None:  # TRL's trainer_state, and what rewards log for this step only
            rewards.state.global_step, rewards.state.max_steps = step, self.config.train.steps
            rewards.drain_logs()  # logged while the evaluation scored: not this step's
        generators = self._generators(step)
        # The step's context, set here only: the components read its step, and its generator
        # goes on from where this rank's first sub-batch left it (on the CPU, it sampled it).
        ctx = self.ctx
        ctx.step, ctx.generator = step, generators[0][1]
        # sharded models: sampling gathers the policy (tokenmdp.generate), scoring runs sharded
        batch, signals, advantages, credit, reward_metrics, reward_columns = self._score(step, generators)
        updater = self.composition.components[2]
        with (
            distributed.agreement(f"updater {updater.name!r} at step {step}"),
            distributed.synchronised_optimizer_steps(f"updater {updater.name!r}"),
            self._training_mode(),
        ):
            update_metrics = dict(
                call_component(updater, "update", step, updater.update, batch, signals, advantages, ctx)
            )
            check_finite(update_metrics, f"updater {updater.name!r}", step)
            # the update changes only what trains (a LoRA adapter, not its frozen base)
            trained = {name: sharding.local(p) for name, p in self.policy.named_parameters() if p.requires_grad}
            check_finite(trained, f"the policy after updater {updater.name!r}", step)
        metrics = step_row(batch, step, self.scores_reference, credit, update_metrics, reward_metrics)
        every = self.config.train.log_completions
        completions = completion_rows(self.task, batch, reward_columns) if every and step % every == 0 else None
        (tokens,) = distributed.all_sum(torch.tensor(float(batch.num_tokens), dtype=torch.float64))
        return StepResult(distributed.reduce_metrics(metrics), round(float(tokens)), completions)

    def _score(self, step: int, generators: list[tuple[int, torch.Generator]]) -> tuple:
        """collect -> estimate -> construct: the step's batch, signals, advantages, credit
        scores and the reward's logged metrics and columns."""
        rewards, ctx = self.task.rewards, self.ctx
        batch = self._collect(step, generators)
        reward_metrics, reward_columns = rewards.drain_logs() if rewards is not None else ({}, {})
        with torch.no_grad():
            if batch.logprobs is None:  # not read off the sampling pass (train.logprobs_from)
                batch.logprobs = token_logprobs(self.policy, batch, chunk=self.ctx.logit_chunk)
            if self.scores_reference:  # train.log_kl, or a component requires ref_logprobs
                batch.ref_logprobs = token_logprobs(self.reference, batch, chunk=self.ctx.logit_chunk)
        estimator, constructor, _ = self.composition.components
        # Under torchrun every phase ends with the ranks agreeing (a failure on one rank stops all);
        # batch statistics (tokenmdp.plugin.ops) are global in the first two.
        with distributed.agreement(f"estimator {estimator.name!r} at step {step}"), distributed.global_batch():
            signals = dict(call_component(estimator, "estimate", step, estimator.estimate, batch, ctx))
            check_signal_shapes(signals, batch, estimator, step)
            check_finite(signals, f"estimator {estimator.name!r}", step)
        with distributed.agreement(f"advantage {constructor.name!r} at step {step}"), distributed.global_batch():
            advantages = dict(
                call_component(constructor, "construct", step, constructor.construct, batch, signals, ctx)
            )
            check_signal_shapes(advantages, batch, constructor, step)
            check_finite(advantages, f"advantage {constructor.name!r}", step)
            credit = self.evaluator.credit(batch, signals, advantages) if self.config.train.score_credit else {}
        return batch, signals, advantages, credit, reward_metrics, reward_columns

    @contextlib.contextmanager
    def _training_mode(self):
        """The policy in train mode for the updater's forward (dropout only where
        ``train.disable_dropout = false``), and back in eval mode for everything else."""
        self.policy.train()
        try:
            yield
        finally:
            self.policy.eval()

    def _generators(self, step: int) -> list[tuple[int, torch.Generator]]:
        """``(seed, generator)`` of each batch this process samples at ``step``: its rank's,
        or with ``train.simulate_world_size = N`` those of ranks 0..N-1."""
        t = self.config.train
        ranks = range(t.simulate_world_size or 1) if distributed.world_size() == 1 else [distributed.rank()]
        return step_generators(t.seed, step, ranks)

    def make_env(self, num_envs: int):
        """A vector env of the run's task with ``num_envs`` rows, paying its reward (if any)."""
        return make_vector_env(
            self.registry, self.config, num_envs, compute_rewards=self.task.has_reward, objects=self.objects.get("env")
        )

    def _collect(self, step: int, generators: list[tuple[int, torch.Generator]] | None = None) -> RolloutBatch:
        """This rank's batch, sampled with its own seed; with ``train.simulate_world_size = N``
        the concatenation of the N sub-batches ranks 0..N-1 would sample."""
        generators = generators or self._generators(step)
        score, t = self.scores_while_sampling, self.config.train
        try:
            return collect_step(self.policy, self.env, generators, t, self.device, score, self.sampler, self.sampling)
        except RewardError as exc:
            raise RewardError(f"{exc} (while collecting step {step})") from exc

    # --- run directory, checkpoints -------------------------------------------------
    def _prepare_run_dir(self, staged: dict[str, Path]) -> tuple[int, int]:
        """Start a fresh run directory (moving the ``staged`` folders of the objects it was
        given into place) or restore the newest checkpoint. Only rank 0 touches files; under
        torchrun the others get the checkpoint from it."""
        main = distributed.is_main()
        if self.resume:
            state = None
            sharded = self.config.train.sharding == "fsdp"
            # reference.pt is written again only if it was deleted: the reference's weights
            # (gathered on every rank when sharded) only then
            missing = distributed.broadcast_object(main and not (self.run_dir / REFERENCE).exists())
            reference = self.reference_state() if missing else None
            with distributed.agreement("loading the checkpoint"):
                if main:  # a sharded run's: the .pt file only (its shard files checked)
                    state = self.rundir.load_latest_checkpoint(whole=not sharded)
                    self.rundir.record_resume(dump_config(self.config), reference)
            state = distributed.broadcast_object(state)
            if "shards" in state:  # each rank reads its own shards of every sharded tensor
                folder = self.rundir.checkpoints / state.pop("shards")["dir"]
                state = sharding.fill_sharded(state, sharding.read_own_shards(folder, self.policy))
            self.policy.load_checkpoint_state(state["policy"])
            for component in self.composition.components:
                component.load_state_dict(state["components"].get(component.kind, {}))
            # a checkpoint written before the clock was kept resumes the count at its step
            self._clock = (self._clock[0], state.get("wall_seconds", 0.0), state.get("wall_from_step", state["step"]))
            return state["step"], state["env_tokens"]
        reference = self.reference_state()  # gathered on every rank when sharded
        with distributed.agreement("preparing the run directory"):
            if main:
                self.rundir.start_fresh(self.recording.config_text(), reference, staged=staged)
        return 0, 0

    def _write_shards(self, step: int, tensors: dict) -> Path:
        """Every rank writes its shards of ``tensors`` into one folder under a temporary name
        (rank 0's), which rank 0 renames once the ``.pt`` file can follow."""
        folder = None
        with distributed.agreement(f"the shards folder of step {step}"):
            if distributed.is_main():
                folder = self.rundir.new_shards_folder(step)
        folder = Path(distributed.broadcast_object(str(folder)))
        sharding.write_shards(tensors, folder)
        return folder

    def _wall_seconds(self) -> float:
        """Seconds of training so far over every piece of the run (from step
        ``self._clock[2]``): the earlier pieces' time up to their last checkpoint, and this
        piece's. Time after a piece's last checkpoint is lost with the steps it redoes."""
        started, before, _ = self._clock
        return before + time.perf_counter() - started

    def _checkpoint_state(self) -> dict:
        """The policy's and the components' states, as a checkpoint holds them."""
        return {
            "policy": self.policy.checkpoint_state(),
            "components": {c.kind: c.state_dict() for c in self.composition.components},
        }

    def reference_state(self) -> dict:
        """What reference.pt holds: the reference's weights (nothing for a LoRA view),
        whole (every rank gathers a sharded reference's)."""
        return sharding.full_tensors(self.reference.state_dict(), keep=distributed.is_main())

    def save_checkpoint(self, step: int, env_tokens: int) -> Path:
        """Rank 0 writes the checkpoint (atomically); a failure stops every rank."""
        distributed.check_same_parameters(self.policy, f"at step {step}")
        state = shards = None
        if self.config.train.sharding == "fsdp":
            # every rank writes its own shards (no rank gathers the model); the .pt file holds the rest
            state, tensors = sharding.split_sharded(self._checkpoint_state())
            shards = self._write_shards(step, tensors)
        with distributed.agreement(f"the checkpoint at step {step}"):
            if distributed.is_main():
                clock = {"wall_seconds": self._wall_seconds(), "wall_from_step": self._clock[2]}
                state = {"step": step, "env_tokens": env_tokens, **clock, **(state or self._checkpoint_state())}
                self.rundir.save_checkpoint(step, state, self.config.run.keep_checkpoints, shards=shards)
        return self.rundir.checkpoint_path(step)
