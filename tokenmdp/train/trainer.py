"""The training loop, as a template method: collect -> estimate -> construct -> update.

Everything that can fail on bad input (config, plugin names, composition, env options)
is checked in ``Trainer.__init__``, before any model is built or any file is written.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import gymnasium
import torch
from gymnasium.vector import AutoresetMode

from .. import distributed
from ..config import Config, dump_config, load_config
from ..devices import PRECISIONS, resolve_device
from ..errors import CheckpointError, ConfigError, PluginError, RewardError, TokenMDPError, TrainingInterrupted
from ..mdp.env import TokenVectorEnv
from ..plugin.batch import concat_batches, token_logprobs
from ..plugin.composition import Composition, compose
from ..plugin.context import TrainContext
from ..plugin.ops import check_finite
from ..plugin.registry import Registry, plugin_manager
from ..policies import TokenPolicy, build_policy
from ..policies.base import place
from .evaluation import ExactEvaluator, SampledEvaluator
from .rollout import collect, sampling_generator
from .sft import make_sft_data, supervised_finetune

CHECKPOINT_DIR = "checkpoints"


@contextlib.contextmanager
def deferred_interrupt():
    """Turn the first SIGINT into a flag checked between steps (a second one aborts)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@attrs.define
class Run:
    """What lifecycle hooks see: the run directory, config and a slot for per-run resources."""

    dir: Path
    config: Config
    composition: Composition
    start_step: int = 0
    resources: dict = attrs.field(factory=dict)


def _task_parameters(task_cls: type) -> list[str]:
    names = []
    for cls in task_cls.__mro__:
        if "__init__" in vars(cls):
            names += [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
    return sorted(set(names))


def make_vector_env(registry: Registry, config: Config, num_envs: int, compute_rewards: bool) -> TokenVectorEnv:
    spec = registry.env(config.env["id"])
    if spec.vector_entry_point is None:
        raise ConfigError(f"env.id {spec.id!r} has no torch vector form; training needs one")
    try:
        env = gymnasium.make_vec(
            spec.id,
            num_envs=num_envs,
            autoreset_mode=AutoresetMode.DISABLED,
            compute_rewards=compute_rewards,
            **config.env_kwargs,
        )
    except TypeError as exc:
        valid = _task_parameters(getattr(spec.vector_entry_point, "task_cls", object))
        raise ConfigError(f"[env] ({spec.id}): {exc}; valid options: {', '.join(valid)}") from None
    except (ValueError, OverflowError, RuntimeError) as exc:  # RuntimeError: torch rejecting a value
        raise ConfigError(f"[env] ({spec.id}): {exc}") from None
    return env


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Each step's sampling seed depends only on (seed, step) (and the rank of a distributed
    run), so a resumed run replays exactly. Rank 0 uses the single-process seed."""
    base = (seed * 1_000_003 + step * 7_919) % (2**63)
    return base if rank == 0 else (base + rank * 0x9E3779B97F4A7C15) % (2**63)


class Trainer:
    def __init__(self, config: Config, pm=None, resume: bool = False):
        self.config = config
        self.pm = pm if pm is not None else plugin_manager()
        self.registry = Registry(self.pm)
        self.registry.register_envs()
        self.composition = compose(self.registry, config)
        self.env = make_vector_env(
            self.registry, config, config.train.batch_size, compute_rewards=self.composition.needs_env_reward
        )
        self.task = self.env.task
        self._check_text_setup(config)
        self.device = resolve_device(config.train.device)
        self.autocast_dtype = PRECISIONS[config.train.precision]
        kind = config.policy.get("kind", "gru")
        if self.autocast_dtype is not None and kind != "hf":
            raise ConfigError(
                f"train.precision = {config.train.precision!r} applies to HF models (policy.kind = "
                f'"hf"); policy.kind = {kind!r} trains in "fp32"'
            )
        for component in self.composition.components:
            component.check(config, self.task)
        self.run_dir = Path(config.run.dir)
        self.resume = resume
        simulate = config.train.simulate_world_size
        if simulate is not None and simulate > 1 and distributed.requested_world_size() > 1:
            raise ConfigError(
                "train.simulate_world_size stands in for a distributed run in one process; "
                "unset it when launching with torchrun"
            )
        if not resume and (self.run_dir / "metrics.jsonl").exists() and not config.run.overwrite:
            raise ConfigError(
                f"run.dir {str(self.run_dir)!r} already holds a run; use --resume {self.run_dir}, "
                "--set run.overwrite=true, or another run.dir"
            )

    def _check_text_setup(self, config: Config) -> None:
        """Tasks without an exact solver (text) have no base distribution to fine-tune a
        reference on, and only HF causal LMs handle their padded prompts."""
        if self.task.exact:
            return
        env_id = config.env["id"]
        if config.policy.get("kind", "gru") != "hf":
            raise ConfigError(
                f'env {env_id} needs policy.kind = "hf" (with policy.path = a model directory); '
                f"got policy.kind = {config.policy.get('kind', 'gru')!r}"
            )
        if config.reference.init != "init":
            raise ConfigError(
                f"env {env_id} has no base distribution to fine-tune a reference on; set "
                'reference.init = "init" (the loaded model is the reference)'
            )
        if config.train.target_regret_frac is not None:
            raise ConfigError(f"train.target_regret_frac needs an exact solver, which env {env_id} does not have")

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, overrides: list[str] = (), pm=None) -> Trainer:
        """Resume the run in ``run_dir`` (wherever it now lives); ``overrides`` may extend
        it, e.g. ``train.steps=500``."""
        path = Path(run_dir) / "config.toml"
        if not path.is_file():
            raise ConfigError(f"--resume {str(run_dir)!r}: no config.toml there, so it is not a run directory")
        return cls(load_config(path, [*overrides, f"run.dir={Path(run_dir)}"]), pm=pm, resume=True)

    # --- set-up -------------------------------------------------------------------
    def build_models(self) -> None:
        cfg = self.config
        reference = build_policy(cfg.policy, self.task, seed=cfg.train.seed)
        self.sft_losses: list[float] = []
        ref_file = self.run_dir / "reference.pt"
        view = reference.reference_view()  # shares the weights (LoRA), or None
        shared = view is not None
        if shared and cfg.reference.init == "sft":
            raise ConfigError(
                "policy.lora trains an adapter on a fixed base, and the base is the reference; "
                'set reference.init = "init"'
            )
        if self.resume and ref_file.exists() and not shared:
            reference.load_state_dict(torch.load(ref_file, weights_only=True, map_location="cpu"))
        elif cfg.reference.init == "sft":
            generator = torch.Generator().manual_seed(cfg.train.seed)
            ref_cfg = cfg.reference
            groups = make_sft_data(
                self.task, ref_cfg.sft_samples, ref_cfg.tagged_samples, ref_cfg.tilt_beta or cfg.train.beta, generator
            )
            self.sft_losses = supervised_finetune(
                reference, groups, ref_cfg.sft_epochs, ref_cfg.sft_batch_size, ref_cfg.sft_lr, generator
            )
        distributed.broadcast_module(reference)  # every rank starts from rank 0's weights
        if shared:  # LoRA: the reference is the policy with its adapter off (shared weights)
            self.policy, self.reference = reference, view.eval()
        else:  # full fine-tuning changes every weight: the reference is a frozen copy
            self.policy = copy.deepcopy(reference)
            self.reference = place(
                reference.requires_grad_(False).eval(), self.device, self.autocast_dtype, no_dropout=False
            )
        # The policy is in eval mode (no dropout) everywhere but the updater's forward;
        # train.disable_dropout (default) turns its dropout off there too.
        place(self.policy, self.device, self.autocast_dtype, no_dropout=cfg.train.disable_dropout).eval()
        self.exact = self.task.exact
        self._last_eval: tuple[int, dict[str, float]] | None = None
        if self.exact:
            self.evaluator = ExactEvaluator(self.task, self.reference, cfg.train.beta)
        else:
            t = cfg.train
            self.evaluator = SampledEvaluator(
                self.task.eval_task,
                self.reference,
                t.beta,
                t.eval_samples or t.batch_size,
                seed=step_seed(t.seed, 0) ^ 0x5CA1AB1E,
                temperature=t.temperature,
                top_k=t.top_k,
                top_p=t.top_p,
            )
        exact = self.evaluator if self.exact else None
        self.ctx = TrainContext(
            policy=self.policy,
            reference=self.reference,
            beta=cfg.train.beta,
            task=self.task,
            config=cfg,
            solution=exact.solution if exact else None,
            evaluator=exact,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )
        for component in self.composition.components:
            self._guard(component, "setup", component.setup, self.ctx)

    def _lifecycle(self, hook_name: str, **kwargs):
        """Call a lifecycle hook; a crash is reported with the plugin's name (and the step)."""
        hook = getattr(self.pm.hook, hook_name)
        try:
            return hook(**kwargs)
        except TokenMDPError:
            raise
        except Exception as exc:
            where = f" at step {kwargs['step']}" if "step" in kwargs else ""
            raise PluginError(
                f"plugin {_plugin_that_raised(hook, exc)} raised in {hook_name}{where}: {type(exc).__name__}: {exc}"
            ) from exc

    def _guard(self, component, what: str, fn, *args):
        """Call a component, reporting a crash with the plugin's name and the step."""
        try:
            return fn(*args)
        except TokenMDPError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{component.kind} {component.name!r} raised in {what} at step {self.ctx.step}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    # --- the loop -----------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train; under torchrun, on every rank (rank 0 writes the files and calls the hooks)."""
        joined = distributed.init()
        try:
            return self._train()
        finally:
            if joined is not None:
                distributed.shutdown()

    def _train(self) -> dict[str, Any]:
        self.build_models()
        cfg = self.config
        main = distributed.is_main()
        start_step, env_tokens = self._prepare_run_dir()
        run = Run(dir=self.run_dir, config=cfg, composition=self.composition, start_step=start_step)
        started = time.perf_counter()
        self.stopped_at = None
        self.recent_credit = []
        with distributed.agreement("tokenmdp_on_train_start"):
            if main:
                self._lifecycle("tokenmdp_on_train_start", run=run)
                if start_step == 0:
                    self._emit(run, 0, {"env_tokens": 0, **self._evaluate(0)})
                self.recent_credit = _logged_values(self.run_dir / "metrics.jsonl", "credit_corr")[-10:]
        with deferred_interrupt() as interrupted:
            env_tokens = self._loop(run, start_step, env_tokens, interrupted)
        summary = None
        with distributed.agreement("the summary"):
            if main:
                summary = self._summary(env_tokens, time.perf_counter() - started)
                _atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
                self._lifecycle("tokenmdp_on_train_end", run=run, summary=summary)
        return distributed.broadcast_object(summary)

    def _loop(self, run: Run, start_step: int, env_tokens: int, interrupted: threading.Event) -> int:
        cfg = self.config
        main = distributed.is_main()
        target = cfg.train.target_regret_frac
        for step in range(start_step + 1, cfg.train.steps + 1):
            metrics = self.train_step(step)  # averaged over ranks
            if "credit_corr" in metrics:
                self.recent_credit = [*self.recent_credit, metrics["credit_corr"]][-10:]
            env_tokens += metrics.pop("rollout/tokens")
            metrics["env_tokens"] = env_tokens
            with distributed.agreement(f"tokenmdp_on_step_end at step {step}"):
                if main:  # the ranks hold the same weights: rank 0 evaluates and logs
                    if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                        metrics.update(self._evaluate(step))
                    self._emit(run, step, metrics)
            reached = target is not None and metrics.get("regret_frac", float("inf")) <= target
            if target is not None:
                reached = distributed.broadcast_object(reached)
            every = cfg.run.checkpoint_every
            if (every and step % every == 0) or step == cfg.train.steps or reached:
                self.save_checkpoint(step, env_tokens)
            if reached:
                self.stopped_at = step
                break
            if distributed.any_rank(interrupted.is_set()):  # Ctrl-C: finish the step, save, stop cleanly
                self.save_checkpoint(step, env_tokens)
                raise TrainingInterrupted(
                    f"interrupted after step {step}; checkpoint saved; continue with: "
                    f"tokenmdp train --resume {self.run_dir}"
                )
        return env_tokens

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

    def train_step(self, step: int) -> dict[str, Any]:
        """collect -> estimate -> construct -> update, for one batch of responses."""
        ctx = self.ctx
        ctx.step = step
        batch = self._collect(step)
        with torch.no_grad():
            batch.logprobs = token_logprobs(self.policy, batch)
            batch.ref_logprobs = token_logprobs(self.reference, batch)
        estimator, constructor, updater = self.composition.components
        # Under torchrun every phase ends with the ranks agreeing: a failure on one rank
        # stops all of them here. Batch statistics (tokenmdp.ops) are global in the first two.
        with distributed.agreement(f"estimator {estimator.name!r} at step {step}"), distributed.global_batch():
            signals = dict(self._guard(estimator, "estimate", estimator.estimate, batch, ctx))
            check_finite(signals, f"estimator {estimator.name!r}", step)
        with distributed.agreement(f"advantage {constructor.name!r} at step {step}"), distributed.global_batch():
            advantages = dict(self._guard(constructor, "construct", constructor.construct, batch, signals, ctx))
            check_finite(advantages, f"advantage {constructor.name!r}", step)
            credit = self.evaluator.credit(batch, signals, advantages)
        with (
            distributed.agreement(f"updater {updater.name!r} at step {step}"),
            distributed.synchronised_optimizer_steps(f"updater {updater.name!r}"),
            self._training_mode(),
        ):
            update_metrics = dict(self._guard(updater, "update", updater.update, batch, signals, advantages, ctx))
            check_finite(update_metrics, f"updater {updater.name!r}", step)
            check_finite(dict(self.policy.named_parameters()), f"the policy after updater {updater.name!r}", step)
        metrics: dict[str, Any] = {"rollout/tokens": batch.num_tokens}
        metrics["rollout/response_length"] = batch.num_tokens / batch.size
        # k1 estimate of KL(pi_old || pi_ref) on this batch, before the update (every recipe)
        metrics["objective/kl"] = float(((batch.logprobs - batch.ref_logprobs) * batch.response_mask).sum(1).mean())
        if batch.rewards_observed:
            metrics["rollout/reward_mean"] = float(batch.sequence_rewards.mean())
        metrics.update(credit)
        metrics.update(update_metrics)
        return distributed.reduce_metrics(metrics)

    @contextlib.contextmanager
    def _training_mode(self):
        """The policy in train mode for the updater's forward (dropout only where
        ``train.disable_dropout = false``), and back in eval mode for everything else."""
        self.policy.train()
        try:
            yield
        finally:
            self.policy.eval()

    def _collect(self, step: int):
        """This rank's batch, sampled with its own seed; with ``train.simulate_world_size = N``
        the concatenation of the N sub-batches ranks 0..N-1 would sample. ``ctx.generator``
        is left as the (first) sampling generator, for the components."""
        cfg = self.config
        ranks = range(cfg.train.simulate_world_size or 1) if distributed.world_size() == 1 else [distributed.rank()]
        batches = []
        for r in ranks:
            seed = step_seed(cfg.train.seed, step, r)
            generator = torch.Generator().manual_seed(seed)
            # On the CPU one generator samples and then shuffles; a GPU policy samples with
            # its own generator (same seed) and ctx.generator stays on the CPU.
            sampling = generator if self.device.type == "cpu" else sampling_generator(seed, self.device)
            if not batches:
                self.ctx.generator = generator
            try:
                batches.append(
                    collect(
                        self.policy,
                        self.env,
                        seed=seed,
                        generator=sampling,
                        temperature=cfg.train.temperature,
                        top_k=cfg.train.top_k,
                        top_p=cfg.train.top_p,
                        samples_per_prompt=cfg.train.samples_per_prompt,
                    )
                )
            except RewardError as exc:
                raise RewardError(f"{exc} (while collecting step {step})") from exc
        try:
            return concat_batches(batches)
        except ValueError as exc:
            raise ConfigError(f"train.simulate_world_size: {exc}") from None

    # --- run directory, checkpoints -------------------------------------------------
    def _prepare_run_dir(self) -> tuple[int, int]:
        """Start a fresh run directory or restore the newest checkpoint. Only rank 0 touches
        files; under torchrun the others get the checkpoint from it."""
        main = distributed.is_main()
        if self.resume:
            state = None
            with distributed.agreement("loading the checkpoint"):
                if main:
                    _remove_stale_temp_files(self.run_dir)
                    latest = latest_checkpoint(self.run_dir)
                    if latest is None:
                        raise ConfigError(f"--resume {str(self.run_dir)!r}: no checkpoint to resume from")
                    state = torch.load(latest, weights_only=False, map_location="cpu")
                    _truncate_metrics(self.run_dir / "metrics.jsonl", state["step"])
            state = distributed.broadcast_object(state)
            self.policy.load_checkpoint_state(state["policy"])
            for component in self.composition.components:
                component.load_state_dict(state["components"].get(component.kind, {}))
            return state["step"], state["env_tokens"]
        with distributed.agreement("preparing the run directory"):
            if main:
                if self.run_dir.exists():
                    _remove_stale_temp_files(self.run_dir)
                    for name in ("metrics.jsonl", "summary.json", CHECKPOINT_DIR, "tensorboard"):
                        path = self.run_dir / name
                        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                (self.run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
                _atomic_write_text(self.run_dir / "config.toml", dump_config(self.config))
                _atomic_save(self.reference.state_dict(), self.run_dir / "reference.pt")
        return 0, 0

    def save_checkpoint(self, step: int, env_tokens: int) -> Path:
        """Rank 0 writes the checkpoint (atomically); a failure stops every rank."""
        path = self.run_dir / CHECKPOINT_DIR / f"step_{step:08d}.pt"
        distributed.check_same_parameters(self.policy, f"at step {step}")
        with distributed.agreement(f"the checkpoint at step {step}"):
            if distributed.is_main():
                state = {
                    "step": step,
                    "env_tokens": env_tokens,
                    "policy": self.policy.checkpoint_state(),
                    "components": {c.kind: c.state_dict() for c in self.composition.components},
                }
                _atomic_save(state, path)
                for old in sorted(path.parent.glob("step_*.pt"))[: -self.config.run.keep_checkpoints]:
                    old.unlink()
        return path

    def _emit(self, run: Run, step: int, metrics: dict[str, Any]) -> None:
        self._lifecycle("tokenmdp_on_step_end", step=step, run=run, metrics={"step": step, **metrics})

    def _summary(self, env_tokens: int, wall_seconds: float) -> dict[str, Any]:
        final = self._evaluate(self.stopped_at or self.config.train.steps)
        start = self.evaluator.start
        if not self.exact:  # sampled scores; nothing knows the optimum
            return {
                **self.composition.describe(),
                "env": self.config.env["id"],
                "steps": self.config.train.steps,
                "env_tokens": env_tokens,
                "wall_seconds": wall_seconds,
                "used_env_reward": self.composition.needs_env_reward,
                "eval_on": (
                    f"held-out prompts: env.eval_prompts = {self.task.eval_task.prompts_path}"
                    if self.task.eval_task is not self.task
                    else "the training prompts (env.eval_prompts unset)"
                ),
                "start": dict(start),
                **final,
                **{k: v for c in self.composition.components for k, v in c.report().items()},
            }
        return {
            **self.composition.describe(),
            "env": self.config.env["id"],
            "steps": self.stopped_at or self.config.train.steps,
            "reached_target": self.stopped_at is not None,
            "env_tokens": env_tokens,
            "wall_seconds": wall_seconds,
            "used_env_reward": self.composition.needs_env_reward,
            "j_star": self.evaluator.solution.j_star,
            "start": {**start, "regret_frac": 1.0, "closure": 0.0},
            **final,
            # mean over the last (up to) 10 steps: one step's correlation is noisy
            "credit_corr": _nan_mean(self.recent_credit),
            **{k: v for c in self.composition.components for k, v in c.report().items()},
        }


def _plugin_that_raised(hook, exc: BaseException) -> str:
    """The plugin whose implementation of ``hook`` is on ``exc``'s traceback (outermost first)."""
    owners = {}
    for impl in hook.get_hookimpls():
        code = getattr(impl.function, "__code__", None)
        if code is not None:
            owners[code] = impl.plugin_name
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in owners:
            return repr(owners[tb.tb_frame.f_code])
        tb = tb.tb_next
    names = ", ".join(repr(impl.plugin_name) for impl in hook.get_hookimpls())
    return f"(one of {names})"


def _logged_values(path: Path, key: str) -> list[float]:
    if not path.exists():
        return []
    rows = (json.loads(line) for line in path.read_text().splitlines() if line)
    return [row[key] if row[key] is not None else float("nan") for row in rows if key in row]


def _nan_mean(values: list[float]) -> float | None:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else None


def load_policy(path: str | Path, task) -> TokenPolicy:
    """A trained policy from a run directory (its last checkpoint) or an HF model directory."""
    path = Path(path)
    if (path / "config.toml").is_file():
        config = load_config(path / "config.toml")
        policy = build_policy(config.policy, task, seed=config.train.seed)
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise ConfigError(f"{str(path)!r} is a run directory without checkpoints")
        policy.load_checkpoint_state(torch.load(checkpoint, weights_only=False, map_location="cpu")["policy"])
        return policy
    from ..policies.hf import HFCausalLMPolicy

    return HFCausalLMPolicy.from_pretrained(path, vocab_size=task.vocab_size)


def load_reference(run_dir: str | Path, config: Config, task) -> TokenPolicy:
    """The frozen reference model a run was trained and scored against (its reference.pt)."""
    reference = build_policy(config.policy, task, seed=config.train.seed)
    view = reference.reference_view()
    if view is not None:  # LoRA: the base with its adapter off (reference.pt holds no weights)
        return view.eval()
    reference.load_state_dict(torch.load(Path(run_dir) / "reference.pt", weights_only=True, map_location="cpu"))
    return reference.requires_grad_(False).eval()


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step_*.pt"))
    return found[-1] if found else None


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    _atomic_write_text(path, "".join(line + "\n" for line in keep))


TEMP_MARK = ".tmp-"


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Temporary files a killed process left behind (never under a final name)."""
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        for stale in folder.glob(f".*{TEMP_MARK}*"):
            stale.unlink(missing_ok=True)


def _write_failed(path: Path, exc: BaseException) -> CheckpointError:
    reason = f"{exc.strerror} (errno {exc.errno})" if isinstance(exc, OSError) and exc.strerror else str(exc)
    kept = (
        f"the existing {path.name} is unchanged"
        if path.exists()
        else f"nothing was written there; the other files in {path.parent} are unchanged"
    )
    return CheckpointError(f"could not write {path}: {reason}; {kept}")


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves half a file.
    A failed write (disk full, ...) removes the temporary file and raises CheckpointError."""
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        raise _write_failed(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
