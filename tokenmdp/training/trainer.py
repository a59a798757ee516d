"""The training loop, as a template method: collect -> estimate -> construct -> update.

Everything that can fail on bad input (config, plugin names, composition, env options)
is checked in ``Trainer.__init__``, before any model is built or any file is written. The
pieces around the loop have their own modules: the run directory (``rundir``), the
policy and its reference (``models``), plugin calls (``guards``), Ctrl-C
(``interrupts``) and ``summary.json`` (``summary``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import attrs
import gymnasium
import torch
from gymnasium.vector import AutoresetMode

from .. import distributed
from ..config import Config, dump_config, load_config
from ..devices import PRECISIONS, resolve_device
from ..errors import ConfigError, PluginError, RewardError, TrainingInterrupted
from ..mdp.env import TokenVectorEnv
from ..options import to_dict
from ..plugin.batch import concat_batches, token_logprobs
from ..plugin.composition import DEFAULT_BETA, Composition, compose, lm_defaults_line, with_recipe_defaults
from ..plugin.context import TrainContext
from ..plugin.ops import check_finite
from ..plugin.registry import Registry, plugin_manager
from ..policies.base import place
from ..text.callables import code_barrier
from .budget import check_before_env, check_run
from .evaluation import ExactEvaluator, SampledEvaluator
from .guards import call_component, call_hook
from .health import RunHealth
from .interrupts import STOP_SIGNALS, deferred_interrupt
from .models import initial_policy, load_policy, load_reference, split_reference
from .rollout import collect, sampling_generator, with_stop_strings
from .rundir import (
    BASE_MODEL,
    CHECKPOINT_DIR,
    PYTHON_OBJECT,
    REFERENCE,
    TOKENIZER,
    RunDir,
    absolute_paths,
    check_recorded_paths,
    check_run_dir_value,
    clash_message,
    config_header,
    latest_checkpoint,
    recorded_reward_folders,
)
from .summary import run_summary

__all__ = [
    "CHECKPOINT_DIR",
    "Run",
    "Trainer",
    "deferred_interrupt",
    "latest_checkpoint",
    "load_policy",
    "load_reference",
    "make_vector_env",
    "step_seed",
]


#: The keys a ``--resume --set`` may change: how long and how the run goes on, never what it trains.
RESUME_MAY_CHANGE = frozenset(
    {
        "train.steps",
        "train.eval_every",
        "train.target_regret_frac",
        "train.progress",
        "train.device",
        "train.max_memory_gb",
        "run.checkpoint_every",
        "run.keep_checkpoints",
    }
)


_MISSING = object()  # a key one of two configs lacks

#: Seconds after a run stopped on a signal during which more stop signals are ignored (the
#: rest of the same burst: three Ctrl-C within milliseconds).
STOP_BURST_SECONDS = 3.0


def _flat(config: Config) -> dict:
    """``{"section.key": value}`` of a config (nested tables flattened)."""
    out = {}

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out[prefix + key] = value

    walk("", to_dict(config))
    return out


@attrs.define
class Run:
    """What lifecycle hooks see: the run directory, config and a slot for per-run resources."""

    dir: Path
    config: Config
    composition: Composition
    start_step: int = 0
    resources: dict = attrs.field(factory=dict)


def _task_parameters(task_cls: type) -> list[str]:
    """The keyword arguments a task class takes: its own ``__init__``'s, and its parents'
    as long as each passes ``**kwargs`` on."""
    names = []
    for cls in task_cls.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return sorted(set(names))


def _given_keys(objects: dict) -> set[str]:
    """The config keys whose values ``objects`` (``tokenmdp.train``'s) give."""
    keys = {f"env.{key}" for key in objects.get("env") or {}}
    return keys | ({"policy.path"} if objects.get("model") is not None else set())


def _saveable(obj) -> bool:
    """A transformers model or tokenizer, which ``save_pretrained`` writes to a folder."""
    return obj is not None and callable(getattr(obj, "save_pretrained", None))


def _save_quietly(obj, folder: Path) -> None:
    """``obj.save_pretrained(folder)`` without transformers' progress bar (stderr stays for errors)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        obj.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _reward_entries(config: Config) -> list[str]:
    """The ``module:function`` entries of ``env.reward`` (not ``hf:DIR``, not objects)."""
    reward = config.env.get("reward")
    entries = reward if isinstance(reward, list) else [reward]
    return [e for e in entries if isinstance(e, str) and ":" in e and not e.startswith(("hf:", PYTHON_OBJECT))]


def _reward_module_folders(config: Config) -> list[str]:
    """The folders the run's reward modules were imported from (their top-level module's
    place on the search path): ``config.toml`` records them for a resume from another folder."""
    import sys

    folders = []
    for entry in _reward_entries(config):
        module = sys.modules.get(entry.split(":")[0].split(".")[0])
        where = getattr(module, "__file__", None)
        if where is None:
            continue
        folder = Path(where).parent.parent if Path(where).name == "__init__.py" else Path(where).parent
        if str(folder.absolute()) not in folders:
            folders.append(str(folder.absolute()))
    return folders


def _find_reward_modules(run_dir: str | Path, config: Config, given: set[str]) -> None:
    """A resume from another folder imports the run's reward modules from where they were
    imported when it started (recorded in ``config.toml``), as that start did: the folder goes
    last on the search path, only when the module is not found otherwise. The run directory
    itself stays barred (``code_barrier``)."""
    import sys

    if "env.reward" in given:
        return
    for entry in _reward_entries(config):
        top = entry.split(":")[0].split(".")[0]
        if top in sys.modules or importlib.util.find_spec(top) is not None:
            continue
        for folder in recorded_reward_folders(run_dir):
            if (folder / f"{top}.py").is_file() or (folder / top).is_dir():
                if str(folder) not in sys.path:
                    sys.path.append(str(folder))
                break


def make_vector_env(
    registry: Registry, config: Config, num_envs: int, compute_rewards: bool, objects: dict | None = None
) -> TokenVectorEnv:
    """The training env of ``config``; ``objects`` replace the ``[env]`` values that were
    given as Python objects (``tokenmdp.train``: prompts, tokenizer, reward)."""
    spec = registry.env(config.env["id"])
    kwargs = {**config.env_kwargs, **(objects or {})}
    missing = sorted(k for k, v in kwargs.items() if v == PYTHON_OBJECT)
    if missing:
        raise ConfigError(
            f"env.{missing[0]} was given to tokenmdp.train as a Python object; this run can only be "
            "resumed from Python, with the same objects: tokenmdp.train(..., run_dir=RUN_DIR, resume=True)"
        )
    if spec.vector_entry_point is None:
        raise ConfigError(f"env.id {spec.id!r} has no torch vector form; training needs one")
    try:
        # the run directory is data: no reward module from there, for whoever makes the env
        # (training, resuming, compare's cells, export, explain)
        with code_barrier(config.run.dir):
            env = gymnasium.make_vec(
                spec.id,
                num_envs=num_envs,
                autoreset_mode=AutoresetMode.DISABLED,
                compute_rewards=compute_rewards,
                **kwargs,
            )
    except TypeError as exc:
        valid = _task_parameters(getattr(spec.vector_entry_point, "task_cls", object))
        raise ConfigError(f"[env] ({spec.id}): {exc}; valid options: {', '.join(valid)}") from None
    except (ValueError, OverflowError, RuntimeError) as exc:  # RuntimeError: torch rejecting a value
        raise ConfigError(f"[env] ({spec.id}): {exc}") from None
    return env


def load_task(config: Config, compute_rewards: bool = True, registry: Registry | None = None):
    """``(registry, task)`` of ``config``'s env, for the tools that read a run or a config
    without training (``solve``, ``export``, ``explain``, compare's frontiers): the
    installed plugins (or ``registry``), their envs registered, and a one-env instance's task."""
    registry = registry if registry is not None else Registry(plugin_manager())
    registry.register_envs()
    return registry, make_vector_env(registry, config, 1, compute_rewards=compute_rewards).task


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Each step's sampling seed depends only on (seed, step) (and the rank of a distributed
    run), so a resumed run replays exactly. Rank 0 uses the single-process seed."""
    base = (seed * 1_000_003 + step * 7_919) % (2**63)
    return base if rank == 0 else (base + rank * 0x9E3779B97F4A7C15) % (2**63)


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
        #: What a fresh run saves for the objects it was given (folder name -> object), and
        #: where they are staged until the run directory is prepared.
        self._saving, self._staged, self._header = {}, {}, None
        # A run directory works from any folder: a fresh run records the paths it names
        # absolute; a resumed one first checks that they are all still there.
        self.pm = pm if pm is not None else plugin_manager()
        self.registry = Registry(self.pm)
        self.registry.register_envs()
        if resume:
            check_recorded_paths(config, f"--resume {str(config.run.dir)!r}", skip=_given_keys(self.objects))
            # config.toml records every default the run started with (below); one written by
            # hand without train.beta takes the plain default, never today's LM defaults
            config = attrs.evolve(config, train=attrs.evolve(config.train, beta=config.train.beta or DEFAULT_BETA))
            #: The recipe's LM defaults this run took when it started (a fresh run's only).
            self.lm_defaults = {}
        else:
            config, self.lm_defaults = with_recipe_defaults(self.registry, config)
            config = self._recorded(config)
        self.config = config
        #: A folder of fine-tuned references shared by runs with the same key (compare's).
        self.reference_cache = reference_cache
        self.composition = compose(self.registry, config)
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
        self._check_text_setup(config)
        self.sampling = with_stop_strings(self.sampling, config, self.task)  # training and evaluation
        self.device = resolve_device(config.train.device)
        if self.task.rewards is not None:
            self.task.rewards.place(self.device)  # reward models score on the policy's device
        self.autocast_dtype = PRECISIONS[config.train.precision]
        kind = config.policy.get("kind", "gru")
        if self.autocast_dtype is not None and kind != "hf":
            raise ConfigError(
                f"train.precision = {config.train.precision!r} applies to HF models (policy.kind = "
                f'"hf"); policy.kind = {kind!r} trains in "fp32"'
            )
        if config.train.gradient_checkpointing and kind != "hf":
            raise ConfigError(f'train.gradient_checkpointing applies to HF models (policy.kind = "hf"), not {kind!r}')
        for component in self.composition.components:
            component.check(config, self.task)
        check_run(config, self.task)  # before the solver, the SFT data and the models are built
        self.run_dir = Path(config.run.dir)
        self.rundir = RunDir(self.run_dir)
        self.rundir.saves = tuple(self._saving)
        self.resume = resume
        # Built by build_models(); the loop's state, set by train().
        self.policy = self.reference = self.evaluator = self.ctx = None
        self.sft_losses: list[float] = []
        self.stopped_at: int | None = None
        self.recent_credit: list[float] = []
        self.health: RunHealth | None = None  # text runs' warnings, set by train()
        self._last_eval: tuple[int, dict[str, float]] | None = None
        self._stop = None  # set while train() runs: the stop request of SIGINT/SIGTERM
        self._completions: list[dict] | None = None  # this step's sample, for train.log_completions
        t = config.train
        own_distribution = t.temperature == 1.0 and t.top_k is None and t.top_p is None
        wanted = t.logprobs_from == "sampling" or (t.logprobs_from == "auto" and config.policy.get("kind") == "hf")
        #: batch.logprobs read off the sampling pass instead of a second forward pass
        self.scores_while_sampling = wanted and own_distribution
        self.sampler = t.sampler_for(config.policy.get("kind"))
        simulate = config.train.simulate_world_size
        if simulate is not None and simulate > 1 and distributed.requested_world_size() > 1:
            raise ConfigError(
                "train.simulate_world_size stands in for a distributed run in one process; "
                "unset it when launching with torchrun"
            )
        check_run_dir_value(config.run.dir)
        if config.run.wandb_project is not None and importlib.util.find_spec("wandb") is None:
            raise ConfigError('run.wandb_project needs wandb: pip install "torch==2.13.0" -e ".[wandb]"')
        parent = next((p for p in [self.run_dir, *self.run_dir.absolute().parents] if p.exists()), None)
        if parent is not None and parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"run.dir {str(self.run_dir)!r}: {parent} is not writable, so the run could not be saved")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"run.dir {str(self.run_dir)!r} is a file, not a folder; name a folder for the run")
        if resume:
            if self.rundir.latest_checkpoint() is None:
                raise ConfigError(self.rundir.no_checkpoint_message())
        else:
            self._check_fresh_run_dir(config.run.overwrite)

    def _recorded(self, config: Config) -> Config:
        """A fresh run's config as ``config.toml`` records it: the paths it names absolute
        (resolved from the folder the run starts in), and a model or tokenizer given as an
        object named by the folder the run saves it to (``RUN/base_model``, ``RUN/tokenizer``:
        ``save_pretrained``), so that ``export`` and ``--resume`` from the command line need
        no objects. An object that cannot be saved stays ``"python:object"``."""
        started_in = os.getcwd()
        config, typed = absolute_paths(config, started_in)
        root = Path(config.run.dir).absolute()
        notes = []
        model, tokenizer = self.objects.get("model"), (self.objects.get("env") or {}).get("tokenizer")
        # a peft model (or one peft wrapped in an earlier run) would save its adapter only
        if config.policy.get("path") == PYTHON_OBJECT and _saveable(model) and not getattr(model, "peft_config", None):
            self._saving[BASE_MODEL] = model
            config = attrs.evolve(config, policy={**config.policy, "path": str(root / BASE_MODEL)})
            notes.append(f"policy.path: the model given to tokenmdp.train, saved in {BASE_MODEL}/ (save_pretrained)")
        if config.env.get("tokenizer") == PYTHON_OBJECT and _saveable(tokenizer):
            self._saving[TOKENIZER] = tokenizer
            config = attrs.evolve(config, env={**config.env, "tokenizer": str(root / TOKENIZER)})
            notes.append(f"env.tokenizer: the tokenizer given to tokenmdp.train, saved in {TOKENIZER}/")
        line = lm_defaults_line(config, self.lm_defaults)
        if line:
            notes.append(line)
        self._header = (started_in, typed, notes)
        return config

    def _config_text(self) -> str:
        """``config.toml`` of a fresh run: the config, under comments that say where the run
        started, how its paths were typed, and where its reward modules were imported from."""
        started_in, typed, notes = self._header or (os.getcwd(), {}, [])
        folders = _reward_module_folders(self.config)
        return config_header(started_in, typed, notes, folders) + dump_config(self.config)

    def _stage_given_objects(self) -> dict[str, Path]:
        """Save the objects the run records as folders of its own (:meth:`_recorded`) under
        temporary names; the run directory's preparation moves them into place. Done before
        the models are built: with ``policy.lora``, peft wraps the given model in place."""
        if self.resume or not distributed.is_main():
            return {}
        staged = {}
        for name, obj in self._saving.items():
            try:
                staged[name] = self.rundir.stage(name, functools.partial(_save_quietly, obj))
            except (ConfigError, KeyboardInterrupt):
                raise
            except Exception as exc:  # save_pretrained refused (what was staged goes with the failed run)
                what = "model" if name == BASE_MODEL else "tokenizer"
                raise ConfigError(
                    f"could not save the {what} given to tokenmdp.train into {self.run_dir / name} "
                    f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                    "export and --resume from the command line need it"
                ) from None
        return staged

    def _check_fresh_run_dir(self, overwrite: bool) -> None:
        """A fresh run needs a folder with nothing to lose: new, empty, or tokenmdp's own
        (the marker) without a run worth keeping; ``run.overwrite`` replaces such a run. In a
        folder without the marker every file is the user's: a name the run would write is
        refused even with ``run.overwrite``, and any other file needs it."""
        where = str(self.run_dir)
        if self.rundir.holds_run() and not overwrite:
            raise ConfigError(
                f"run.dir {where!r} already holds a run; use --resume {self.run_dir}, "
                "--set run.overwrite=true, or another run.dir"
            )
        clashes = self.rundir.clashes()
        if clashes:
            raise ConfigError(clash_message(self.run_dir, clashes))
        foreign = [] if overwrite else self.rundir.foreign()
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ConfigError(
                f"run.dir {where!r} holds files tokenmdp did not write ({shown}); use an empty or new "
                "folder, or --set run.overwrite=true (which never removes or rewrites a file tokenmdp did not write)"
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
    def from_run_dir(cls, run_dir: str | Path, overrides: list[str] = (), pm=None, objects=None) -> Trainer:
        """Resume the run in ``run_dir`` (wherever it now lives); ``overrides`` may extend
        it, e.g. ``train.steps=500``."""
        path = Path(run_dir) / "config.toml"
        if not path.is_file():
            raise ConfigError(f"--resume {str(run_dir)!r}: no config.toml there, so it is not a run directory")
        stored = load_config(path, [f"run.dir={Path(run_dir)}"])
        config = load_config(path, [*overrides, f"run.dir={Path(run_dir)}"])
        # Paths compare as the files they name: a path typed relative to this folder (an
        # override, or a run recorded before paths were absolute) is the same file.
        stored, config = absolute_paths(stored)[0], absolute_paths(config)[0]
        # An input given as an object again (tokenmdp.train(..., resume=True)) keeps the folder
        # the run saved it to, which config.toml goes on naming.
        given = _given_keys(objects or {})
        for key in sorted(given):
            section, name = key.split(".")
            table, recorded = dict(getattr(config, section)), getattr(stored, section).get(name)
            if table.get(name) == PYTHON_OBJECT and recorded is not None:
                config = attrs.evolve(config, **{section: {**table, name: recorded}})
        now, before = _flat(config), _flat(stored)
        changed = {key for key in now.keys() | before.keys() if now.get(key, _MISSING) != before.get(key, _MISSING)}
        fixed = sorted(changed - RESUME_MAY_CHANGE)
        if fixed:
            raise ConfigError(
                f"--resume can extend a run ({', '.join(sorted(RESUME_MAY_CHANGE))}), not change what it trains: "
                f"{', '.join(fixed)} differ from {path}; start a new run for that"
            )
        _find_reward_modules(run_dir, config, given)
        return cls(config, pm=pm, resume=True, objects=objects)

    # --- set-up -------------------------------------------------------------------
    def build_models(self) -> None:
        """The policy, its reference (on ``train.device``), the evaluator, ``ctx``, and each
        component's ``setup``."""
        cfg = self.config
        base, self.sft_losses = initial_policy(
            cfg,
            self.task,
            self.run_dir / REFERENCE if self.resume else None,
            model=self.objects.get("model"),
            cache_dir=self.reference_cache,
        )
        longest = self.task.prompts.shape[1] + self.task.horizon
        if base.max_positions is not None and longest > base.max_positions:
            raise ConfigError(
                f"env.horizon = {self.task.horizon} after prompts of up to {self.task.prompts.shape[1]} tokens is "
                f"{longest} positions, more than the model's {base.max_positions}; lower env.horizon or "
                "env.max_prompt_tokens"
            )
        policy, reference = split_reference(base)
        self.reference = place(reference, self.device, self.autocast_dtype, no_dropout=False)
        # The policy is in eval mode (no dropout) everywhere but the updater's forward;
        # train.disable_dropout (default) turns its dropout off there too.
        self.policy = place(policy, self.device, self.autocast_dtype, no_dropout=cfg.train.disable_dropout).eval()
        if cfg.train.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        self.exact = self.task.exact
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
                sampler=self.sampler,
                backend=self.sampling,
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
            call_component(component, "setup", self.ctx.step, component.setup, self.ctx)

    # --- the loop -----------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train; under torchrun, on every rank (rank 0 writes the files and calls the hooks)."""
        joined = distributed.init()
        main = distributed.is_main()
        created = not self.run_dir.exists()
        self._stop = None
        try:
            # signals are deferred for the whole run, teardown included: a second Ctrl-C while
            # the last step is saved cannot cut the run short
            with (
                self._quiet_after_a_stop(),
                self.rundir.locked() if main else contextlib.nullcontext(),
                deferred_interrupt() as self._stop,
            ):
                try:
                    if main and not self.resume:
                        self.rundir.claim()  # the folder is tokenmdp's from now on: rerunnable however it ends
                    return self._train()
                except BaseException:
                    if main and not self.resume and self.rundir.latest_checkpoint() is None:
                        self.rundir.discard(remove_folder=created)  # nothing to resume: leave no run behind
                    raise
        finally:
            if joined is not None:
                distributed.shutdown()

    @contextlib.contextmanager
    def _quiet_after_a_stop(self, seconds: float = STOP_BURST_SECONDS):
        """Once a run has stopped on SIGINT/SIGTERM (saved, or aborted by a third signal), the
        rest of the same burst of signals can arrive after the run's own handler is gone, and
        Python's default one would raise KeyboardInterrupt wherever the process then is: a
        traceback while the CLI prints the resume command, or at exit. Stop signals that
        arrive within ``seconds`` of the end of such a run are ignored; later ones reach the
        previous handlers as before. After a run that no signal stopped, nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        deadline: list[float] = []

        def absorbed() -> bool:
            stopped = self._stop is not None and self._stop.is_set()
            return stopped and (not deadline or time.monotonic() < deadline[0])

        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        previous = {s: h for s, h in previous.items() if h is not None}  # None: not set from Python

        def handler(signum, frame):
            if absorbed():
                return
            signal.signal(signum, previous[signum])  # the burst is over: the previous handler again
            if callable(previous[signum]):
                previous[signum](signum, frame)
            elif previous[signum] == signal.SIG_DFL:
                os.kill(os.getpid(), signum)

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            if self._stop is not None and self._stop.is_set():
                deadline.append(time.monotonic() + seconds)
            else:
                for s, h in previous.items():
                    signal.signal(s, h)

    def _train(self) -> dict[str, Any]:
        line = lm_defaults_line(self.config, self.lm_defaults)
        if line and distributed.is_main():
            print(f"tokenmdp: {line}", flush=True)
        self._staged = self._stage_given_objects()
        self.build_models()
        cfg = self.config
        main = distributed.is_main()
        start_step, env_tokens = self._prepare_run_dir()
        run = Run(dir=self.run_dir, config=cfg, composition=self.composition, start_step=start_step)
        started = time.perf_counter()
        self.stopped_at, self.recent_credit = None, []
        summary, outcome, hooked, ended = None, "failed", False, False
        try:
            with distributed.agreement("tokenmdp_on_train_start"):
                if main:
                    self.rundir.open_metrics()
                    hooked = True
                    call_hook(self.pm, "tokenmdp_on_train_start", run=run)
                    if not self.task.exact:  # text runs: collapse and run-away warnings (a resumed run's replayed)
                        self.health = RunHealth(row for _, row in self.rundir.metric_lines())
                    if start_step == 0:
                        self._emit(run, 0, {"env_tokens": 0, **self._evaluate(0)})
                    self.recent_credit = self.rundir.logged_values("credit_corr")[-10:]
            env_tokens = self._loop(run, start_step, env_tokens, self._stop)
            with distributed.agreement("the summary"):
                if main:
                    final = self._evaluate(self.stopped_at or cfg.train.steps)
                    summary = run_summary(self, final, env_tokens, time.perf_counter() - started)
                    self.rundir.write_summary(summary)
                    ended = True  # inside the agreement: a plugin failing here stops every rank
                    self._end(run, summary, "completed")
        except (TrainingInterrupted, KeyboardInterrupt):
            outcome = "interrupted"
            raise
        finally:
            if hooked and not ended:
                self._end(run, summary, outcome)
        return distributed.broadcast_object(summary)

    def _end(self, run: Run, summary: dict | None, outcome: str) -> None:
        """The end of a run however it ends: the metrics file is closed and every plugin's
        ``tokenmdp_on_train_end`` runs (so it can close its files). After a failure, a
        plugin that fails there too is reported as a warning: the run's own error wins."""
        self.rundir.close_metrics()
        if outcome == "completed":
            call_hook(self.pm, "tokenmdp_on_train_end", run=run, summary=summary, outcome=outcome)
            return
        try:
            call_hook(self.pm, "tokenmdp_on_train_end", run=run, summary=summary, outcome=outcome)
        except Exception as exc:  # the error in flight is the one to report
            warnings.warn(f"after the run {outcome}, tokenmdp_on_train_end failed too: {exc}", stacklevel=2)

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
            if distributed.any_rank(interrupted.is_set()):  # Ctrl-C/SIGTERM: finish the step, save, stop
                self.save_checkpoint(step, env_tokens)
                signum = interrupted.signum or signal.SIGINT
                raise TrainingInterrupted(
                    f"interrupted ({signal.Signals(signum).name}) after step {step}; checkpoint saved; continue "
                    f"with: tokenmdp train --resume {self.run_dir}",
                    signum=signum,
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
        rewards = self.task.rewards  # env.reward of a text task; None elsewhere
        if rewards is not None:  # TRL's trainer_state, and what rewards log for this step only
            rewards.state.global_step, rewards.state.max_steps = step, self.config.train.steps
            rewards.drain_logs()  # logged while the evaluation scored: not this step's
        batch = self._collect(step)
        reward_metrics, reward_columns = rewards.drain_logs() if rewards is not None else ({}, {})
        with torch.no_grad():
            if batch.logprobs is None:  # not read off the sampling pass (train.logprobs_from)
                batch.logprobs = token_logprobs(self.policy, batch)
        # Scored when a component or the objective/kl metric first reads it, else never.
        batch.score_reference_lazily(functools.partial(token_logprobs, self.reference))
        estimator, constructor, updater = self.composition.components
        # Under torchrun every phase ends with the ranks agreeing: a failure on one rank
        # stops all of them here. Batch statistics (tokenmdp.ops) are global in the first two.
        with distributed.agreement(f"estimator {estimator.name!r} at step {step}"), distributed.global_batch():
            signals = dict(call_component(estimator, "estimate", step, estimator.estimate, batch, ctx))
            check_finite(signals, f"estimator {estimator.name!r}", step)
        with distributed.agreement(f"advantage {constructor.name!r} at step {step}"), distributed.global_batch():
            advantages = dict(
                call_component(constructor, "construct", step, constructor.construct, batch, signals, ctx)
            )
            check_finite(advantages, f"advantage {constructor.name!r}", step)
            credit = self.evaluator.credit(batch, signals, advantages) if self.config.train.score_credit else {}
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
            trained = {name: p for name, p in self.policy.named_parameters() if p.requires_grad}
            check_finite(trained, f"the policy after updater {updater.name!r}", step)
        metrics: dict[str, Any] = {"rollout/tokens": batch.num_tokens}
        metrics["rollout/response_length"] = batch.num_tokens / batch.size
        if self.config.train.log_kl or batch.reference_scored:
            # k1 estimate of KL(pi_old || pi_ref) on this batch, before the update
            metrics["objective/kl"] = float(batch.token_kl.sum(1).mean())
        if batch.rewards_observed:
            metrics["rollout/reward_mean"] = float(batch.sequence_rewards.mean())
        metrics.update(credit)
        metrics.update(update_metrics)
        clash = sorted(set(reward_metrics) & set(metrics))
        if clash:
            raise RewardError(
                f"a reward logged {', '.join(clash)} through log_metric at step {step}, a name tokenmdp logs "
                "itself; give the metric another name"
            )
        metrics.update(reward_metrics)
        every = self.config.train.log_completions
        if every and step % every == 0:
            self._completions = self._completion_rows(batch, reward_columns)
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
                        score=self.scores_while_sampling,
                        sampler=self.sampler,
                        backend=self.sampling,
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
                    state = self.rundir.load_latest_checkpoint()
                    self.rundir.record_resume(dump_config(self.config), self.reference_state())
            state = distributed.broadcast_object(state)
            self.policy.load_checkpoint_state(state["policy"])
            for component in self.composition.components:
                component.load_state_dict(state["components"].get(component.kind, {}))
            return state["step"], state["env_tokens"]
        with distributed.agreement("preparing the run directory"):
            if main:
                self.rundir.start_fresh(self._config_text(), self.reference_state(), staged=self._staged)
        return 0, 0

    def reference_state(self) -> dict:
        """What reference.pt holds: the reference's weights (nothing for a LoRA view)."""
        return self.reference.state_dict()

    def save_checkpoint(self, step: int, env_tokens: int) -> Path:
        """Rank 0 writes the checkpoint (atomically); a failure stops every rank."""
        distributed.check_same_parameters(self.policy, f"at step {step}")
        with distributed.agreement(f"the checkpoint at step {step}"):
            if distributed.is_main():
                state = {
                    "step": step,
                    "env_tokens": env_tokens,
                    "policy": self.policy.checkpoint_state(),
                    "components": {c.kind: c.state_dict() for c in self.composition.components},
                }
                self.rundir.save_checkpoint(step, state, self.config.run.keep_checkpoints)
        return self.rundir.checkpoint_path(step)

    def _emit(self, run: Run, step: int, metrics: dict[str, Any]) -> None:
        """The core writes the step's line of metrics.jsonl (and its completions); then the
        loggers add theirs."""
        metrics = {"step": step, **metrics}
        self.rundir.append_metrics(metrics)
        for warning in self.health.observe(metrics) if self.health is not None else ():
            print(f"tokenmdp: warning: {warning}", file=sys.stderr)
        call_hook(self.pm, "tokenmdp_on_step_end", step=step, run=run, metrics=metrics)
        rows, self._completions = self._completions, None
        if rows:
            self.rundir.append_completions(step, rows)
            call_hook(self.pm, "tokenmdp_on_completions", step=step, run=run, completions=rows)

    def _completion_rows(self, batch, columns: dict | None = None, limit: int = 8) -> list[dict]:
        """Up to ``limit`` responses of ``batch``: prompt and completion as text (text tasks)
        or token ids (toy tasks), the response's reward (None if unobserved), and the
        ``columns`` rewards added with ``log_extra`` (those with one value per response)."""
        task, out = self.task, []
        columns = {name: values for name, values in (columns or {}).items() if len(values) == batch.size}
        rewards = batch.sequence_rewards.tolist() if batch.rewards_observed else None
        for i in range(min(limit, batch.size)):
            length = int(batch.response_mask[i].sum())
            response = batch.response_ids[i, :length].tolist()
            index = int(batch.prompt_index[i])
            if task.tokenizer is not None:  # a text task: the prompt and completion as text
                prompt, completion = task.prompt_text(index), task.completion_text(response)
            else:
                prompt, completion = task.prompts[index].tolist(), response
            row = {"prompt": prompt, "completion": completion, "reward": rewards[i] if rewards else None}
            out.append({**{name: values[i] for name, values in columns.items()}, **row})
        return out
