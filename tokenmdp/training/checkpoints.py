"""Checkpoint files: written with their sha256 beside them, read back without unpickling
(``torch.load(weights_only=True)``) and checked (checksum, keys, finite weights)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .files import atomic_save, atomic_write_text


def write_checkpoint(path: Path, state: dict) -> None:
    """The checkpoint, then its checksum (``step_X.pt.sha256``): a checkpoint is whole only
    when its checksum file exists and matches."""

    def write_checksum(written: Path) -> None:  # before the rename: a checkpoint never lacks one
        atomic_write_text(checksum_path(path), hashlib.sha256(written.read_bytes()).hexdigest() + "\n")

    atomic_save(state, path, before_rename=write_checksum)


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_checkpoint(path: str | Path, whole: bool = True) -> dict:
    """A checkpoint written by :func:`write_checkpoint`, onto the CPU, **never
    unpickled**: ``torch.load(weights_only=True)`` accepts tensors and plain containers
    only, so a file that smuggles in code fails to load instead of running it. Its
    checksum must match (when it has one: older runs' do not), and every weight must be
    finite. Any problem is a one-line ``CheckpointError`` naming the file.

    A sharded run's checkpoint has its shard files checked too, then its tensors read whole;
    with ``whole`` false they are left in the shards (markers where they go, and the
    ``"shards"`` entry: for a sharded resume, whose ranks read their own shards)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} could not be read: {exc}") from None
    checksum = checksum_path(path)
    if checksum.is_file() and checksum.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} is corrupt: its sha256 does not match {checksum.name}")
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated, empty, not a checkpoint, or a forbidden (code-carrying) object
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {type(exc).__name__}: {first}") from None
    if not isinstance(state, dict) or not {"step", "env_tokens", "policy", "components"} <= set(state):
        raise CheckpointError(
            f"checkpoint {path} is not a tokenmdp checkpoint (keys step, env_tokens, policy, components)"
        )
    if "shards" in state:  # a sharded run's: its sharded tensors are in the folder beside it
        _check_shards(path, state["shards"])
        if not whole:
            return state
        state = _with_shards(path, state)
    bad = [name for name, t in _tensors(state["policy"]) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({bad[0]}, ...)")
    return state


def shard_checksums(folder: Path) -> dict[str, str]:
    """The sha256 of every safetensors file in a checkpoint's shards folder."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def _with_shards(path: Path, state: dict) -> dict:
    """A sharded checkpoint's state (its shard files checked) with its tensors read whole."""
    from .. import sharding

    folder = path.parent / state.pop("shards")["dir"]
    try:
        tensors = sharding.read_whole_shards(folder)
        return sharding.fill_sharded(state, tensors)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: its shards cannot be read: {type(exc).__name__}: {first}") from None


def _check_shards(path: Path, shards: dict) -> None:
    """Every shard file the checkpoint recorded is there, with its sha256, and no other."""
    folder = path.parent / shards["dir"]
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {path} is incomplete: its shards folder {shards['dir']} is missing")
    found = shard_checksums(folder)
    if found.keys() != shards["files"].keys():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {shards['dir']} holds {sorted(found)}, not {sorted(shards['files'])}"
        )
    bad = [name for name, digest in found.items() if shards["files"][name] != digest]
    if bad:
        raise CheckpointError(f"checkpoint {path} is corrupt: {shards['dir']}/{bad[0]} does not match its sha256")


def read_weights(path: str | Path) -> dict:
    """A ``state_dict`` file (reference.pt), loaded with ``weights_only=True``."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be loaded safely: {type(exc).__name__}: {first}") from None


def _tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [pair for k, v in tree.items() for pair in _tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    return []
