"""The grid's cache of fine-tuned references (``<out>/references``, one entry per env, seed,
policy and reference, as ``training/models.py`` writes them), kept whole or absent: an
entry is checked before a cell reads it, and a damaged one is removed to be fine-tuned again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch

from ...errors import ConfigError
from ...plugin.registry import Registry
from ...policies import build_policy
from ...training.checkpoints import checksum_path
from ...training.envs import load_task
from ...training.files import atomic_write_text
from ...training.models import reference_key
from .grid import Cell


def reference_cache(cell: Cell) -> Path:
    """The grid's folder of fine-tuned references (one per env, seed, policy and reference)."""
    return cell.dir.parent.parent / "references"


def _reference_files(cell: Cell) -> tuple[Path, Path] | None:
    """``(KEY.safetensors, KEY.json)`` of the cell's entry in the reference cache (as
    ``training/models.py`` writes them), or None when its reference is not fine-tuned."""
    if cell.config.reference.init != "sft":
        return None
    key = reference_key(cell.config)
    return reference_cache(cell) / f"{key}.safetensors", reference_cache(cell) / f"{key}.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_problem(data: bytes) -> str | None:
    """What is wrong with a ``KEY.json`` (the SFT losses and the tagged-SFT tokens), or None."""
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        return "is not JSON"
    if not isinstance(meta, dict) or set(meta) != {"losses", "tagged_sft_tokens"}:
        return "does not hold exactly losses and tagged_sft_tokens"
    losses, tagged = meta["losses"], meta["tagged_sft_tokens"]
    if not isinstance(losses, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in losses
    ):
        return "has losses that are not a list of finite numbers"
    if isinstance(tagged, bool) or not isinstance(tagged, int) or tagged < 0:
        return "has a tagged_sft_tokens that is not a count"
    return None


def _policy_shapes(cell: Cell, registry: Registry) -> dict[str, tuple[int, ...]]:
    """The shape of every weight of the cell's initial policy, which a cached reference
    must have: the policy built on the meta device (no memory, no init), the RNG kept."""
    _, task = load_task(cell.config, compute_rewards=False, registry=registry)
    with torch.random.fork_rng(devices=[]):  # build_policy seeds the global generator
        try:
            with torch.device("meta"):
                base = build_policy(cell.config.policy, task, seed=cell.config.train.seed)
        except Exception:  # a model that cannot be built on the meta device: built for real
            base = build_policy(cell.config.policy, task, seed=cell.config.train.seed)
    return {name: tuple(t.shape) for name, t in base.state_dict().items()}


def _reference_problem(cell: Cell, weights: Path, meta: Path, registry: Registry) -> str | None:
    """Why the cached reference cannot be used, or None when it is whole. Whole means: both
    files regular, their ``.sha256`` files match (when they exist), the metadata well-formed,
    and the weights load (from the bytes just hashed), are finite, and have the shapes of
    the cell's policy, plus the RNG state after the fine-tune. An entry without checksums
    (just written by a fine-tune, or by an older tokenmdp) that is whole gets them here."""
    import safetensors.torch

    data = {}
    for path in (weights, meta):
        if path.is_symlink() or not path.is_file():
            return f"is incomplete ({path.name} is missing or not a regular file)"
        try:
            data[path] = path.read_bytes()
        except OSError as exc:
            return f"cannot be read ({path.name}: {exc.strerror or exc})"
    checksums = {path: checksum_path(path) for path in data}
    sealed = all(c.is_file() for c in checksums.values())
    if sealed:
        for path, checksum in checksums.items():
            try:
                expected = checksum.read_text().strip()
            except (OSError, ValueError):
                expected = None
            if expected != _sha256(data[path]):
                return f"is corrupt ({path.name} does not match {checksum.name})"
    problem = _meta_problem(data[meta])
    if problem is not None:
        return f"has damaged metadata ({meta.name} {problem})"
    try:
        stored = safetensors.torch.load(data[weights])
    except Exception as exc:  # truncated, empty, not safetensors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"cannot be loaded ({weights.name}: {type(exc).__name__}: {first})"
    rng = stored.pop("__rng_state__", None)
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        return f"is not a fine-tuned reference ({weights.name} lacks the RNG state after the fine-tune)"
    bad = [name for name, t in stored.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        return f"holds non-finite weights ({bad[0]}, ...)"
    found, expected_shapes = {k: tuple(t.shape) for k, t in stored.items()}, _policy_shapes(cell, registry)
    if found != expected_shapes:
        name = next((k for k in expected_shapes if found.get(k) != expected_shapes[k]), None)
        name = name if name is not None else next(k for k in found if k not in expected_shapes)
        return (
            f"does not fit the cell's policy ({name}: {found.get(name, 'missing')} where the policy has "
            f"{expected_shapes.get(name, 'no such weight')})"
        )
    if not sealed:  # whole: from now on any change to it is detected
        for path, checksum in checksums.items():
            atomic_write_text(checksum, _sha256(data[path]) + "\n")
    return None


def check_cached_reference(cell: Cell, pm) -> None:
    """Make the cell's entry in the reference cache whole or absent: a damaged, truncated,
    empty, non-finite, wrong-shaped or corrupt-metadata one is removed with a one-line note,
    so that the cell's trainer fine-tunes it again (and a whole one gets its checksums).
    Under the cache's lock per key, so a fine-tune of the same key in another worker is
    waited for, never read half-written."""
    import fcntl

    files = _reference_files(cell)
    if files is None:
        return
    weights, meta = files
    related = [weights, meta, *(checksum_path(p) for p in files)]
    if not any(os.path.lexists(p) for p in related):
        return
    with open(weights.parent / f"{weights.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.lexists(weights) and not os.path.lexists(meta):
            problem = "is incomplete (only checksums left)"
        else:
            problem = _reference_problem(cell, weights, meta, Registry(pm))
        if problem is None:
            return
        print(f"tokenmdp: cached reference {weights} {problem}; fine-tuning it again", file=sys.stderr)
        for path in related:
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)  # an empty folder in a file's place; one with files in it is an error
                elif os.path.lexists(path):
                    os.unlink(path)
            except OSError as exc:  # a folder in its place, no permission: the fine-tune could not replace it
                raise ConfigError(f"cached reference {path} cannot be removed: {exc.strerror or exc}") from None


def cached_tagged_sft_tokens(cell: Cell) -> int | None:
    """The tagged-SFT tokens the cell's cached fine-tune recorded, when its metadata is
    whole (checksum and form); None otherwise (they are then recounted, exactly)."""
    files = _reference_files(cell)
    if files is None:
        return None
    meta = files[1]
    try:
        data = meta.read_bytes() if meta.is_file() and not meta.is_symlink() else None
        checksum = checksum_path(meta).read_text().strip()
    except (OSError, ValueError):
        return None
    if data is None or checksum != _sha256(data) or _meta_problem(data) is not None:
        return None
    return json.loads(data)["tagged_sft_tokens"]
