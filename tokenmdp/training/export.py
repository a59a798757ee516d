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

Export deletes only what an earlier export wrote. Every export folder holds a
``.tokenmdp-export`` marker listing its files; ``overwrite`` replaces a folder only when it
is empty or holds that marker and nothing else, and never a folder that is or contains the
run directory or the current folder. The folder is written whole in a hidden sibling
(``.NAME.export-PID``), the old one renamed aside (``.NAME.old-PID``), the new one renamed
into place, then the old deleted. What a killed export leaves there is tidied up by the
next export to the same folder (:func:`_recover`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from ..config import load_config
from ..errors import CheckpointError, ConfigError, TokenMDPError
from ..policies import TOY_POLICIES
from .models import load_policy
from .rundir import PYTHON_OBJECT, RunDir, check_recorded_paths

TOY_FORMAT = "tokenmdp-toy-policy"
TOY_CONFIG = "tokenmdp_policy.json"
TOY_WEIGHTS = "model.safetensors"
#: Written into every export folder (last: a hidden folder holding it is complete).
MARKER = ".tokenmdp-export"
#: The ``[env]`` keys that only scoring reads; export builds a text task without them.
_SCORING_KEYS = ("prompts", "eval_prompts", "reward", "reward_weights")


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
    target = _checked_destination(run_dir, out)
    config = load_config(run_dir / "config.toml")
    hf = config.policy.get("kind") == "hf"
    if merge_lora and not hf:
        raise ConfigError("export --merge-lora: this run's policy is a toy network, with no LoRA adapter")
    if hf:
        _check_inputs(config, run_dir)
    _recover(target)
    _check_contents(out, target, overwrite)
    tmp, created = _make_hidden(out, target)
    try:
        task = _task_for_export(config, run_dir)
        chosen = steps[-1] if step is None else step
        policy = _load_checked(run_dir, task, chosen, rundir.checkpoint_path(chosen)).eval()
        try:
            what = _write_hf(policy, task, config, tmp, merge_lora) if hf else _write_toy(policy, task, config, tmp)
            card = _model_card(run_dir, config, chosen, what, target, _load_snippet(config, tmp, target.name))
            (tmp / "README.md").write_text(card, encoding="utf-8")
            files = sorted(p.name for p in tmp.iterdir())
            (tmp / MARKER).write_text(json.dumps({"tokenmdp": "export", "version": 1, "files": files}) + "\n")
            _swap_in(tmp, target)
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


def _checked_destination(run_dir: Path, out: Path) -> Path:
    """``out`` made absolute, refused (before anything is written) where an export could
    delete or hide something that is not an export: a link, a file, the run directory or a
    folder around it, the current folder or a folder around it."""
    if out.is_symlink():
        raise ConfigError(
            f"export: {str(out)!r} is a symbolic link (to {os.readlink(out)!r}); export replaces the folder "
            "it is given, so name a real folder"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {str(out)!r} is a file, not a folder")
    target, run, cwd = out.resolve(), run_dir.resolve(), Path.cwd().resolve()
    if target == run or target in run.parents:
        raise ConfigError(
            f"export: {str(out)!r} is or contains the run directory {str(run_dir)!r}; export into a new folder"
        )
    if run in target.parents:
        raise ConfigError(f"export: {str(out)!r} is inside the run directory; choose a folder outside it")
    if target == cwd or target in cwd.parents:
        raise ConfigError(
            f"export: {str(out)!r} is or contains the current folder {str(cwd)!r}; export into a new folder "
            "(e.g. ./model)"
        )
    return target


def _check_contents(out: Path, target: Path, overwrite: bool) -> None:
    """A non-empty ``out`` is replaced only with ``overwrite`` and only when it is an earlier
    export: its marker lists every file in it."""
    if not target.is_dir():
        return
    names = sorted(p.name for p in target.iterdir())
    if not names:
        return
    foreign = [n for n in names if n != MARKER and n not in _exported_files(target)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(
            f"export: {str(out)!r} holds files an export did not write ({shown}); export into an empty or new "
            "folder (--overwrite replaces only an earlier export)"
        )
    if not overwrite:
        raise ConfigError(f"export: {str(out)!r} exists and is not empty; pass --overwrite to replace it")


def _exported_files(folder: Path) -> set[str]:
    """The files the export in ``folder`` wrote, from its marker (none without one)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    files = marker.get("files") if isinstance(marker, dict) and marker.get("tokenmdp") == "export" else None
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def _hidden(target: Path, kind: str, pid: int | None = None) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process exports one folder at a time: its own leftovers are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False
    return True


def _recover(target: Path) -> None:
    """Tidy what a killed export to ``target`` left beside it: only hidden folders of this
    module's naming whose process is gone. A kill between the two renames leaves no
    ``target`` but the previous export renamed aside: it is put back (the interrupted
    export never finished, so the folder is as it was before it); the rest is deleted."""
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(export|old)-(\d+)")
    stale = {"export": [], "old": []}
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match[2])):
            stale[match[1]].append(entry)
    old = sorted(stale["old"], key=lambda p: p.stat().st_mtime)
    if old and not os.path.lexists(target):
        try:
            os.rename(old[-1], target)
            old.pop()
        except OSError:
            pass  # left for the next export; this one reports what it cannot write
    for entry in [*stale["export"], *old]:
        shutil.rmtree(entry, ignore_errors=True)


def _make_hidden(out: Path, target: Path) -> tuple[Path, list[Path]]:
    """The hidden sibling the export is written in, made before any model is loaded, so an
    unwritable destination is reported at once; and the parent folders it had to make."""
    existing = next((p for p in [target.parent, *target.parent.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"export: {str(out)!r}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"export: {str(out)!r}: {existing} is not writable; choose a folder you can write to")
    tmp = _hidden(target, "export")
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise ConfigError(f"export: cannot create {str(out)!r}: {exc.strerror or exc} ({exc.filename})") from None
    return tmp, created


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the complete folder ``tmp``: at every moment either the old
    export or the new one is there under ``target`` (or, between the two renames, the old
    one beside it, which :func:`_recover` puts back)."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = _hidden(target, "old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    # a failure here leaves only tokenmdp's hidden .NAME.old-PID, which the next export removes
    shutil.rmtree(old, ignore_errors=True)


def _task_for_export(config, run_dir: Path):
    """The task the policy is built for (its vocabulary sizes and special tokens). A text
    task is built from its tokenizer alone: no reward resolved, no prompt file read.
    Another env is built as ``load_task`` builds it, without rewards and with the run
    directory barred from imports (it is data)."""
    from ..plugin.registry import Registry, plugin_manager
    from ..text.callables import code_barrier
    from ..text.task import TextTask
    from .trainer import PYTHON_OBJECT, load_task

    registry = Registry(plugin_manager())
    registry.register_envs()
    spec = registry.env(config.env["id"])
    task_cls = getattr(spec.vector_entry_point, "task_cls", None)
    if not (isinstance(task_cls, type) and issubclass(task_cls, TextTask)):
        with code_barrier(run_dir):
            return load_task(config, compute_rewards=False, registry=registry)[1]
    kwargs = {k: v for k, v in {**spec.kwargs, **config.env_kwargs}.items() if k not in _SCORING_KEYS}
    missing = sorted(k for k, v in kwargs.items() if v == PYTHON_OBJECT)
    if missing:
        raise ConfigError(
            f"export: {str(run_dir)!r} lacks env.{missing[0]}: it was given to tokenmdp.train as a Python object "
            "the run could not save; save the trained model from Python instead: result.model.save_pretrained(OUT)"
        )

    class Unprompted(task_cls):
        def _set_prompts(self, prompts, key):  # export lays out no prompts
            self.prompts_path = None

    try:
        return Unprompted(**kwargs)
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


def _load_snippet(config, folder: Path, name: str) -> str:
    """The model card's Python that loads the export ``folder`` (named ``name``): the model
    (a LoRA adapter on its base, named by its absolute path) and its tokenizer."""
    quoted = json.dumps(name)
    if config.policy.get("kind") != "hf":
        return f"from tokenmdp import load_exported\n\npolicy = load_exported({quoted})"
    imports, lines = ["from transformers import AutoModelForCausalLM"], []
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        imports.insert(0, "from peft import PeftModel")
        lines += [
            f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})  # the run's base model",
            f"model = PeftModel.from_pretrained(base, {quoted})",
        ]
    else:
        lines.append(f"model = AutoModelForCausalLM.from_pretrained({quoted})")
    if (folder / "tokenizer_config.json").is_file():
        imports.append("from transformers import AutoTokenizer")
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({quoted})")
    elif (folder / "tokenizer.model").is_file():
        imports.insert(0, "import sentencepiece")
        lines.append(
            f"tokenizer = sentencepiece.SentencePieceProcessor(model_file={json.dumps(name + '/tokenizer.model')})"
        )
    return "\n".join([*imports, "", *lines])


def _model_card(run_dir: Path, config, step: int, what: str, folder: Path, load: str) -> str:
    from importlib import metadata

    try:
        version = metadata.version("tokenmdp")
    except metadata.PackageNotFoundError:
        version = "unknown"
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    algo = config.algorithm
    recipe = summary.get("recipe") or algo.name or "custom"
    parts = [summary.get(k) for k in ("estimator", "advantage", "updater")]
    composition = " + ".join(p for p in parts if p) or ", ".join(
        f"{k} {getattr(algo, k)}" for k in ("estimator", "advantage", "updater") if getattr(algo, k)
    )
    rows = [
        f"| {k} | {v:.6g} |"
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("steps",)
    ]
    config_text = (run_dir / "config.toml").read_text(encoding="utf-8")
    lines = [
        "---",
        "library_name: " + ("transformers" if config.policy.get("kind") == "hf" else "tokenmdp"),
        "tags: [tokenmdp, reinforcement-learning, token-level-rl]",
        "---",
        "",
        f"# {run_dir.name}",
        "",
        f"Trained with tokenmdp {version}: recipe `{recipe}` ({composition}) on `{config.env['id']}`, "
        f"exported from step {step} of the run. This folder holds {what}.",
        "",
        "## Load",
        "",
        f"From the folder that holds `{folder.name}/`:",
        "",
        "```python",
        load,
        "```",
        "",
        "## Final metrics (summary.json)",
        "",
        *(["| metric | value |", "|---|---|", *rows] if rows else ["(the run wrote no summary)"]),
        "",
        "## The run's config",
        "",
        "```toml",
        config_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
