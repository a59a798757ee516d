"""Prompts for the text task: read from a file or a local dataset, or given from Python.

Every prompt is a string or a conversation (TRL's list of ``{"role", "content"}``
messages), checked row by row: a malformed one is a ``ConfigError`` naming the key, the
file and the line or row, so nothing is ever trained (or scored) on bad data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..datafiles import json_line, numbered_lines
from ..errors import ConfigError

#: Files read with ``datasets.load_dataset`` (by suffix), beside ``.txt``/``.jsonl`` read by line.
DATASET_FILES = {".parquet": "parquet", ".csv": "csv"}


def load_prompts(
    source: Any, key: str, prompt_key: str = "prompt", split: str | None = None
) -> tuple[list[str | list[dict]], dict[str, list]]:
    """The prompts of ``source`` (``key`` names it in errors) and their other columns:
    ``source`` is a path (:func:`read_prompt_table`), a list of prompts or a
    ``datasets.Dataset`` (whose other columns come along)."""
    _check_prompt_source(source, key)
    if _is_dataset(source):
        columns = _columns_of(source, prompt_key, key, "(a Dataset)")
        given = [_checked_prompt(p, f"{key}: row {i}") for i, p in enumerate(columns.pop(prompt_key), 1)]
    elif isinstance(source, list):
        given, columns = [_checked_prompt(p, f"{key}: prompt {i}") for i, p in enumerate(source, 1)], {}
    else:
        given, columns = read_prompt_table(source, key, prompt_key, split)
    if not given:
        raise ConfigError(f"{key}: no prompts")
    return given, columns


def _is_dataset(value: Any) -> bool:
    """Whether ``value`` is a ``datasets.Dataset`` (by its shape: datasets is not imported here)."""
    return hasattr(value, "column_names") and hasattr(value, "__getitem__")


def _check_prompt_source(value: Any, key: str) -> None:
    """A prompt file or dataset folder (a path string), or, from Python, a list of prompts
    or a ``datasets.Dataset``."""
    if value is None:
        raise ConfigError(f"{key} is required: a .jsonl, .txt, .parquet or .csv file of prompts, or a dataset folder")
    if not (isinstance(value, (str, Path, list)) or _is_dataset(value)) or isinstance(value, str) and not value.strip():
        raise ConfigError(
            f"{key} must be a path string: a .jsonl, .txt, .parquet or .csv file of prompts, or a dataset "
            f"folder (got {value!r})"
        )


def read_prompts(
    path: str | Path, key: str = "env.prompts", prompt_key: str = "prompt", split: str | None = None
) -> list[str | list[dict]]:
    """The prompts of :func:`read_prompt_table` (without the other columns)."""
    return read_prompt_table(path, key, prompt_key, split)[0]


def read_prompt_table(
    path: str | Path, key: str = "env.prompts", prompt_key: str = "prompt", split: str | None = None
) -> tuple[list[str | list[dict]], dict[str, list]]:
    """Prompts from a ``.jsonl``/``.json`` file (each line a JSON string or an object whose
    ``prompt_key`` is a string or a conversation), a text file (one prompt per line; a
    literal ``\\n`` in a line is a newline), a parquet or CSV file (``datasets.load_dataset``)
    or a folder written by ``datasets.save_to_disk`` (its ``split`` of a ``DatasetDict``;
    default ``train``, or the only one). A conversation is TRL's format: a list of
    ``{"role", "content"}`` messages. Blank text lines are skipped. Any malformed row is a
    ``ConfigError`` that quotes ``key``, the file and the line or row, so nothing is ever
    trained (or scored) on bad data. Also returns the other columns (a JSON object's other
    keys, a dataset's other columns; None where a row lacks one), which batch rewards
    receive as keyword arguments, as TRL passes them."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"{key} is required: a .jsonl, .txt, .parquet or .csv file of prompts, or a dataset folder")
    suffix = Path(path).suffix.lower()
    if Path(path).is_dir() or suffix in DATASET_FILES:
        columns = _dataset_columns(Path(path), key, prompt_key, split)
        rows = columns.pop(prompt_key)
        prompts = [_checked_prompt(row, f"{key}: {str(path)!r} row {i}") for i, row in enumerate(rows, 1)]
        return prompts, columns
    if split is not None:
        raise ConfigError(f"env.split = {split!r}, but {key} {str(path)!r} is a single file without splits")
    jsonl = suffix in (".jsonl", ".json")
    prompts, others = [], []
    for where, line in numbered_lines(path, f"{key}: file"):
        if jsonl:
            row = json_line(line, where)
            others.append({k: v for k, v in row.items() if k != prompt_key} if isinstance(row, dict) else {})
            if isinstance(row, dict):
                if prompt_key not in row:
                    raise ConfigError(
                        f'{where}: the object has no "{prompt_key}" key (keys: {", ".join(map(str, row))}); '
                        "env.prompt_key names the field"
                    )
                row = row[prompt_key]
            prompts.append(_checked_prompt(row, where))
        else:
            if "\x00" in line:
                raise ConfigError(f"{where}: holds a NUL character (binary data?)")
            prompts.append(_checked_prompt(line.replace("\\n", "\n"), where))
    if not prompts:
        raise ConfigError(f"{key}: file {str(path)!r} holds no prompts")
    names = sorted({k for row in others for k in row})
    return prompts, {name: [row.get(name) for row in others] for name in names}


def _checked_prompt(row: Any, where: str) -> str | list[dict]:
    """A prompt string or a conversation (TRL's list of ``{role, content}`` messages)."""
    if isinstance(row, str):
        if not row.strip():
            raise ConfigError(f"{where}: the prompt is empty")
        _check_unicode(row, where)
        return row
    if isinstance(row, list) and row and all(isinstance(m, dict) for m in row):
        for m in row:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ConfigError(
                    f'{where}: every message of a conversation needs a "role" and a "content" string (got {m!r})'
                )
            _check_unicode(m["content"], where)
        return [{"role": m["role"], "content": m["content"]} for m in row]
    raise ConfigError(
        f"{where}: a prompt must be a string or a conversation (a list of {{role, content}} messages); "
        f"got {type(row).__name__}"
    )


def _check_unicode(text: str, where: str) -> None:
    """A lone surrogate (JSON's ``"\\ud800"``) is not text: no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{where}: holds a lone surrogate ({text[exc.start]!r} at character {exc.start + 1}), which is not "
            "valid Unicode text"
        ) from None


def as_messages(row: str | list[dict]) -> list[dict]:
    """A prompt as a conversation: a string is one user message."""
    return [{"role": "user", "content": row}] if isinstance(row, str) else row


def _empty_table(path: Path) -> bool:
    """Whether ``path`` is a parquet file without rows or a CSV file without data lines."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows == 0
        if path.suffix.lower() == ".csv":
            return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) <= 1
    except Exception:
        return False
    return False


def _dataset_columns(path: Path, key: str, prompt_key: str, split: str | None) -> dict[str, list]:
    """Every column of the local dataset at ``path`` (a ``save_to_disk`` folder, or a
    parquet/CSV file), of its ``split``; it must have ``prompt_key`` and a row."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f'{key}: reading {str(path)!r} needs the datasets package: pip install "datasets"') from None
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one line per error on stderr, not a progress bar first
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(DATASET_FILES[path.suffix.lower()], data_files=str(path))
    except Exception as exc:
        if _empty_table(path):  # datasets refuses an empty file with an obscure message
            raise ConfigError(f"{key}: the dataset {str(path)!r} holds no rows") from None
        raise ConfigError(f"{key}: could not read a dataset from {str(path)!r}: {type(exc).__name__}: {exc}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        chosen = split or ("train" if "train" in data else names[0] if len(names) == 1 else None)
        if chosen not in data:
            raise ConfigError(
                f"env.split: {key} {str(path)!r} has the splits {', '.join(names)}"
                + (f", not {split!r}" if split else "; name one")
            )
        data = data[chosen]
    elif split is not None:
        raise ConfigError(f"env.split = {split!r}, but {key} {str(path)!r} is one dataset without splits")
    return _columns_of(data, prompt_key, key, repr(str(path)))


def _columns_of(data, prompt_key: str, key: str, name: str) -> dict[str, list]:
    """Every column of a ``datasets.Dataset``, which must have ``prompt_key`` and a row
    (``key`` and ``name`` say which dataset in errors)."""
    if prompt_key not in data.column_names:
        raise ConfigError(
            f"env.prompt_key: {key} {name} has no column {prompt_key!r}; its columns: {', '.join(data.column_names)}"
        )
    if len(data) == 0:
        raise ConfigError(f"{key}: the dataset {name} holds no rows")
    return {column: list(data[column]) for column in data.column_names}
