"""``tokenmdp export``: a run's trained policy as a folder that loads without tokenmdp.

An HF policy becomes a transformers folder (``config.json``, safetensors weights, the
tokenizer, ``generation_config.json`` and a ``README.md`` model card); a LoRA policy its
peft adapter folder, or with ``merge_lora`` the merged model. A toy policy becomes its
weights in safetensors with ``tokenmdp_policy.json`` (its ``[policy]`` table and sizes),
read back by :func:`load_exported`. Nothing is pickled, and the folder appears whole or
not at all (it is written beside ``out`` and renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError
from ..policies import TOY_POLICIES
from .models import load_policy
from .rundir import RunDir

TOY_FORMAT = "tokenmdp-toy-policy"
TOY_CONFIG = "tokenmdp_policy.json"
TOY_WEIGHTS = "model.safetensors"


def export_run(
    run_dir: str | Path, out: str | Path, step: int | None = None, merge_lora: bool = False, overwrite: bool = False
) -> Path:
    """Write the policy of ``run_dir`` (its checkpoint at ``step``, default the newest) to
    ``out``; returns ``out``. A non-empty ``out`` needs ``overwrite``."""
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
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"export: {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ConfigError(f"export: {str(out)!r} is inside the run directory; choose a folder outside it")
    config = load_config(run_dir / "config.toml")
    from .trainer import load_task

    _, task = load_task(config, compute_rewards=False)
    chosen = steps[-1] if step is None else step
    policy = load_policy(run_dir, task, step=chosen).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if config.policy.get("kind") == "hf":
            what = _write_hf(policy, task, config, tmp, merge_lora)
        else:
            if merge_lora:
                raise ConfigError("export --merge-lora: this run's policy is a toy network, with no LoRA adapter")
            what = _write_toy(policy, task, config, tmp)
        (tmp / "README.md").write_text(_model_card(run_dir, config, chosen, what, out), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_hf(policy, task, config, folder: Path, merge_lora: bool) -> str:
    from transformers import GenerationConfig

    model = policy.model
    if policy.has_adapter and merge_lora:
        model = model.merge_and_unload()
        what = "the merged model (base + LoRA adapter)"
    elif policy.has_adapter:
        what = "the LoRA adapter (peft); the base model is " + repr(config.policy.get("path"))
    else:
        what = "the whole model"
    model.save_pretrained(folder)  # safetensors
    if not policy.has_adapter or merge_lora:
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


def _model_card(run_dir: Path, config, step: int, what: str, folder: Path) -> str:
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
    load = (
        f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{folder.name}")'
        if config.policy.get("kind") == "hf"
        else f'from tokenmdp import load_exported\npolicy = load_exported("{folder.name}")'
    )
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
