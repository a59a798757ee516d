"""The ``README.md`` model card of an export: what the folder holds, the Python that loads
it, the run's final metrics and its config."""

from __future__ import annotations

import json
from pathlib import Path


def load_snippet(config, folder: Path, name: str) -> str:
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


def model_card(run_dir: Path, config, step: int, what: str, folder: Path, load: str) -> str:
    """The card of the export of ``run_dir``'s checkpoint at ``step`` into ``folder``, which
    holds ``what``; ``load`` is the Python that loads it (:func:`load_snippet`)."""
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
