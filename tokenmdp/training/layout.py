"""What a run directory holds: the names of the files and folders tokenmdp writes there,
and which leftover temporary files are its own.

    config.toml          the resolved config; the paths it names are absolute (``paths``)
    reference.pt         the reference model's state_dict (empty for LoRA runs)
    base_model/          a run of ``tokenmdp.train(model=...)``: the model as given (save_pretrained)
    tokenizer/           ... and ``tokenizer=...``: the tokenizer as given (save_pretrained)
    metrics.jsonl        one JSON object per step, written by the core (loggers only add outputs)
    checkpoints/         step_XXXXXXXX.pt, the newest ``run.keep_checkpoints``
    summary.json         at the end
    eval_completions.jsonl.gz   text runs, at the end: the last held-out evaluation's responses
                         (and the reference's), to judge again without training
    tensorboard/         the loggers plugin's event files
"""

from __future__ import annotations

import re
from pathlib import Path

from .files import TEMP

CHECKPOINT_DIR = "checkpoints"
METRICS = "metrics.jsonl"
COMPLETIONS = "completions.jsonl"
SUMMARY = "summary.json"
EVAL_COMPLETIONS = "eval_completions.jsonl.gz"
CONFIG = "config.toml"
REFERENCE = "reference.pt"
#: Written into every run directory tokenmdp starts: the folder is tokenmdp's.
MARKER = ".tokenmdp-run"
LOCK = ".tokenmdp.lock"
#: Files and folders of a run directory that tokenmdp writes (``compare.json``: compare's
#: cache of a cell; ``explain/``: ``tokenmdp explain``'s default output).
OWN_FILES = (
    CONFIG,
    REFERENCE,
    METRICS,
    COMPLETIONS,
    SUMMARY,
    EVAL_COMPLETIONS,
    MARKER,
    LOCK,
    "compare.json",
    "wandb_id.txt",
)
OWN_FOLDERS = {
    CHECKPOINT_DIR: r"step_\d{8}\.pt(\.sha256)?",
    "tensorboard": r"events\.out\.tfevents\..*",
    "explain": r"(response_\d+\.png|index\.html)",
}
#: Folders a run of ``tokenmdp.train`` writes for the objects it was given (the model, the
#: tokenizer), so that the run can be resumed and exported without them: the files
#: ``save_pretrained`` writes there. In a marked folder they are tokenmdp's, as OWN_FOLDERS'
#: are; in a folder without the marker an existing one refuses a run that would save there
#: (``RunDir.saves``).
SAVED_FOLDERS = {
    "base_model": r"(config|generation_config)\.json|model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?",
    "tokenizer": r"[\w.-]+\.(json|txt|model|jinja)",
}
BASE_MODEL, TOKENIZER = SAVED_FOLDERS


#: A sharded checkpoint's folder beside its ``step_X.pt`` (``train.sharding = "fsdp"``):
#: each rank's shards as safetensors (tokenmdp.sharding.write_shards).
SHARDS = r"step_\d{8}\.shards"


def shards_of(checkpoint: Path) -> Path:
    """The shards folder of checkpoint ``step_X.pt`` (there only for a sharded run's)."""
    return checkpoint.with_suffix(".shards")


def is_own_shards(path: Path) -> bool:
    """A checkpoint's shards folder, or one being written (a temporary name)."""
    found = TEMP.fullmatch(path.name)
    name = found.group(1) if found else path.name
    return path.is_dir() and not path.is_symlink() and re.fullmatch(SHARDS, name) is not None


def is_temp_of(path: Path, names: tuple[str, ...]) -> bool:
    """A temporary file of an atomic write of one of ``names``."""
    found = TEMP.fullmatch(path.name)
    return bool(found) and found.group(1) in names and path.is_file()


def is_saved_temp(path: Path) -> bool:
    """A folder :meth:`RunDir.stage` was writing."""
    found = TEMP.fullmatch(path.name)
    return bool(found) and found.group(1) in SAVED_FOLDERS and path.is_dir() and not path.is_symlink()


def is_own_temp(path: Path) -> bool:
    """A temporary file of an atomic write of a file tokenmdp writes (a checkpoint included)."""
    found = TEMP.fullmatch(path.name)
    return (
        bool(found)
        and path.is_file()
        and (found.group(1) in OWN_FILES or re.fullmatch(OWN_FOLDERS[CHECKPOINT_DIR], found.group(1)) is not None)
    )
