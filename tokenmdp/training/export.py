"""``tokenmdp export``: a run's trained policy as a folder that loads without tokenmdp.

An HF policy becomes a transformers folder (``config.json``, safetensors weights, the
tokenizer, ``generation_config.json`` and a ``README.md`` model card); a LoRA policy its
peft adapter folder, or with ``merge_lora`` the merged model. A toy policy becomes its
weights in safetensors with ``tokenmdp_policy.json`` (its ``[policy]`` table and sizes),
read back by :func:`load_exported`. Nothing is pickled.

Export scores nothing: it resolves no reward (imports no reward module) and reads no
prompt file, only the run directory, the policy's weights and the tokenizer (and, for an
HF run, the model folder ``policy.path`` names: the architecture, and a LoRA run's base).
The run records those paths absolute, so export works from any folder; a LoRA adapter's
``adapter_config.json`` names its base by that absolute path.

Export deletes only what an earlier export wrote (``overwrite`` replaces only an earlier
export), and writes the folder whole beside ``OUT`` before renaming it into place
(:mod:`.export_folder`). The folder's ``README.md`` is a model card (:mod:`.model_card`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from ..config import load_config
from ..errors import CheckpointError, ConfigError, TokenMDPError
from ..policies import TOY_POLICIES
from .export_folder import check_contents, checked_destination, make_hidden, recover, swap_in, write_marker
from .model_card import load_snippet, model_card
from .models import load_policy
from .paths import PYTHON_OBJECT, check_recorded_paths
from .rundir import RunDir

TOY_FORMAT = "tokenmdp-toy-policy"
TOY_CONFIG = "tokenmdp_policy.json"
TOY_WEIGHTS = "model.safetensors"


def export_run(
    run_dir: str | Path, out: str | Path, step: int | None = None, merge_lora: bool = False, overwrite: bool = False
) -> Path:
    """Write the policy of ``run_dir`` (its checkpoint at ``step``, default the newest) to
    ``out``; returns ``out``. A non-empty ``out`` needs ``overwrite``, and then it must be an
    earlier export (see the module's docstring)."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"export: {str(run_dir)!r} is not a run directory (no config.toml)")
    rundir = RunDir(run_dir)
    steps = rundir.checkpoint_steps()
    if not steps:
        raise ConfigError(
            f"export: {str(run_dir)!r} has no checkpoint (the run stopped before its first one); "
            "train it again, or with run.checkpoint_every = N"
        )
    if step is not None and step not in steps:
        raise ConfigError(f"export --step {step}: {str(run_dir)!r} has checkpoints at steps {steps}")
    target = checked_destination(run_dir, out)
    config = load_config(run_dir / "config.toml")
    hf = config.policy.get("kind") == "hf"
    if merge_lora and not hf:
        raise ConfigError("export --merge-lora: this run's policy is a toy network, with no LoRA adapter")
    if hf:
        _check_inputs(config, run_dir)
    recover(target)
    check_contents(out, target, overwrite)
    tmp, created = make_hidden(out, target)
    try:
        task = _task_for_export(config, run_dir)
        chosen = steps[-1] if step is None else step
        policy = _load_checked(run_dir, task, chosen, rundir.checkpoint_path(chosen)).eval()
        try:
            what = _write_hf(policy, task, config, tmp, merge_lora) if hf else _write_toy(policy, task, config, tmp)
            card = model_card(run_dir, config, chosen, what, target, load_snippet(config, tmp, target.name))
            (tmp / "README.md").write_text(card, encoding="utf-8")
            write_marker(tmp)
            swap_in(tmp, target)
        except OSError as exc:  # a full disk, a read-only file system, a folder made unwritable meanwhile
            where = exc.filename or target
            raise ConfigError(
                f"export: could not write {str(out)!r} ({where}: {exc.strerror or exc}); the folder is unchanged"
            ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # the parent folders this export made, innermost first, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return out


def _check_inputs(config, run_dir: Path) -> None:
    """What an HF export reads besides the checkpoint: the model folder (``policy.path``: the
    architecture, and a LoRA run's base weights) and the tokenizer. Each one missing is a
    one-line error saying what is lacking, before anything is written."""
    where = run_dir / "config.toml"
    if config.policy.get("path") == PYTHON_OBJECT:
        raise ConfigError(
            f"export: {str(run_dir)!r} holds no base model: its model was given to tokenmdp.train as an object "
            "that was not saved with the run (a peft model, or a run from before runs saved it in RUN/base_model), "
            "and export needs the model's folder for its architecture; save the trained model from Python "
            "instead: result.model.save_pretrained(OUT)"
        )
    if config.env.get("tokenizer") == PYTHON_OBJECT:
        raise ConfigError(
            f"export: {str(run_dir)!r} holds no tokenizer: it was given to tokenmdp.train as an object without "
            "save_pretrained (or before runs saved it in RUN/tokenizer), and an export carries its tokenizer; "
            "save the trained model from Python instead: result.model.save_pretrained(OUT)"
        )
    check_recorded_paths(config, f"export {str(run_dir)!r}", only={"policy.path", "env.tokenizer"})
    for key, value in (("policy.path", config.policy.get("path")), ("env.tokenizer", config.env.get("tokenizer"))):
        if isinstance(value, str) and not os.path.isabs(value) and not os.path.exists(value):
            raise ConfigError(
                f"export: {key} = {value!r} in {where} is relative to the folder the run was started in (it was "
                f"recorded before runs recorded absolute paths) and does not exist from {os.getcwd()}; run export "
                "from that folder, or write the absolute path into config.toml"
            )


def _task_for_export(config, run_dir: Path):
    """The task the policy is built for (its vocabulary sizes and special tokens). A text
    task is built from its tokenizer alone: no reward resolved, no prompt file read.
    Another env is built as ``load_task`` builds it, without rewards and with the run
    directory barred from imports (it is data)."""
    from ..plugin.registry import Registry, plugin_manager
    from ..text.callables import code_barrier
    from ..text.task import TextTask
    from .envs import load_task

    registry = Registry(plugin_manager())
    registry.register_envs()
    spec = registry.env(config.env["id"])
    task_cls = getattr(spec.vector_entry_point, "task_cls", None)
    if not (isinstance(task_cls, type) and issubclass(task_cls, TextTask)):
        with code_barrier(run_dir):
            return load_task(config, compute_rewards=False, registry=registry)[1]
    kwargs = {**spec.kwargs, **config.env_kwargs}
    missing = sorted(k for k, v in kwargs.items() if v == PYTHON_OBJECT and k not in TextTask.SCORING_OPTIONS)
    if missing:
        raise ConfigError(
            f"export: {str(run_dir)!r} lacks env.{missing[0]}: it was given to tokenmdp.train as a Python object "
            "the run could not save; save the trained model from Python instead: result.model.save_pretrained(OUT)"
        )
    try:
        return task_cls.unscored(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"[env] ({spec.id}): {exc}") from None
    except (ValueError, OverflowError, RuntimeError) as exc:
        raise ConfigError(f"[env] ({spec.id}): {exc}") from None


def _load_checked(run_dir: Path, task, step: int, checkpoint: Path):
    """The policy at ``step``; a checkpoint that does not fit the policy ``config.toml``
    describes (``policy.hidden`` edited, another model) is one line naming both files."""
    try:
        return load_policy(run_dir, task, step=step)
    except (ConfigError, CheckpointError):
        raise
    except (RuntimeError, TokenMDPError) as exc:
        text = str(exc)
        if isinstance(exc, RuntimeError) and "loading state_dict" not in text:
            raise
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and "loading state_dict" in lines[0] else lines[0] if lines else text
        detail = detail.rstrip(".") if len(detail) <= 200 else detail[:197] + "..."
        raise ConfigError(
            f"export: {checkpoint} does not fit the [policy] of {run_dir / 'config.toml'} ({detail}); "
            "restore the config.toml the run was trained with"
        ) from None


def _write_hf(policy, task, config, folder: Path, merge_lora: bool) -> str:
    from transformers import GenerationConfig

    model = policy.model
    adapter = policy.has_adapter and not merge_lora
    # the adapter's base, by a path that resolves from any folder (the run records it absolute;
    # an older run's relative one resolved here, where _check_inputs found it)
    base = os.path.abspath(config.policy["path"]) if adapter else None
    if policy.has_adapter and merge_lora:
        model = model.merge_and_unload()
        what = "the merged model (base + LoRA adapter)"
    elif adapter:
        what = f"the LoRA adapter (peft); its base model is {base!r}"
    else:
        what = "the whole model"
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the command prints one line, not a progress bar
    try:
        model.save_pretrained(folder)  # safetensors
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if adapter:  # peft writes the base's name_or_path as it was loaded (possibly relative)
        adapter_config = folder / "adapter_config.json"
        fields = json.loads(adapter_config.read_text(encoding="utf-8"))
        fields["base_model_name_or_path"] = base
        adapter_config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    t = config.train
    sampling = {"top_k": t.top_k, "top_p": t.top_p}  # the run's sampling settings, where set
    GenerationConfig(
        bos_token_id=task.bos_token,
        eos_token_id=task.eos_token,
        pad_token_id=getattr(task, "pad_token", None),
        do_sample=True,
        temperature=t.temperature,
        max_new_tokens=task.horizon,
        **{k: v for k, v in sampling.items() if v is not None},
    ).save_pretrained(folder)
    tokenizer = config.env.get("tokenizer")
    if tokenizer is not None and Path(tokenizer).is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    elif tokenizer is not None and Path(tokenizer).is_file():  # a sentencepiece model
        shutil.copyfile(tokenizer, folder / "tokenizer.model")
    return what


def _write_toy(policy, task, config, folder: Path) -> str:
    from safetensors.torch import save_file

    spec = dict(config.policy)
    meta = {
        "format": TOY_FORMAT,
        "policy": spec,
        "input_vocab_size": task.input_vocab_size,
        "vocab_size": task.vocab_size,
        "env": dict(config.env),
    }
    save_file({k: v.detach().contiguous() for k, v in policy.state_dict().items()}, str(folder / TOY_WEIGHTS))
    (folder / TOY_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return f"a {spec.get('kind', 'gru')} toy policy"


def load_exported(folder: str | Path):
    """The toy policy an export wrote to ``folder`` (weights from safetensors, never unpickled)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / TOY_CONFIG).is_file():
        raise ConfigError(f"{str(folder)!r} holds no exported toy policy (no {TOY_CONFIG})")
    meta = json.loads((folder / TOY_CONFIG).read_text(encoding="utf-8"))
    if meta.get("format") != TOY_FORMAT:
        raise ConfigError(f"{str(folder / TOY_CONFIG)!r} is not a tokenmdp export (format {meta.get('format')!r})")
    spec = dict(meta["policy"])
    kind = spec.pop("kind", "gru")
    policy = TOY_POLICIES[kind](meta["input_vocab_size"], meta["vocab_size"], **spec)
    policy.load_state_dict(load_file(str(folder / TOY_WEIGHTS)))
    return policy.eval()
