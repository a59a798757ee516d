"""Data-parallel training across processes: ``torch.distributed`` under ``torchrun``.

``torchrun --nproc_per_node=N -m tokenmdp train CONFIG.toml`` starts N copies of the
trainer. :func:`init` finds the torchrun variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group: ``gloo``
on CPU, ``cpu:gloo,cuda:nccl`` when CUDA is available (CPU tensors go through gloo,
CUDA tensors through NCCL). With ``WORLD_SIZE`` unset or 1 nothing here does anything,
so a single process runs exactly the code it always ran.

What every rank does (docs/distributed.md has the whole picture):

- samples its own ``train.batch_size`` responses with its own seed;
- computes the batch statistics of :mod:`tokenmdp.plugin.ops` (``masked_mean``,
  ``masked_whiten``, ``masked_sum``, ``masked_correlation``) over the union of all ranks'
  batches while the trainer holds :func:`global_batch` (estimate, construct, credit);
- averages its gradients with the other ranks' before clipping
  (:func:`average_gradients`, called by ``GradientUpdater.apply_gradients``); an
  optimizer stepped some other way is averaged just before ``step()``
  (:func:`synchronised_optimizer_steps`), so the ranks never drift apart;
- agrees with the others on failures (:func:`agreement`): an error on one rank stops
  every rank at the same point, with the failing rank's message.

Only rank 0 writes files and calls the lifecycle hooks.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import numbers
import os
import re
import warnings
import weakref
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import errors
from .errors import ConfigError, RankFailure, RankLost, TokenMDPError

#: What torchrun sets for every worker.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Seconds a collective may wait for the other ranks before it fails (torch's default is 30 min).
TIMEOUT_ENV_VAR = "TOKENMDP_DIST_TIMEOUT"


@attrs.frozen
class RankInfo:
    """This process's place in the torch.distributed process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    #: True when tokenmdp initialised torch.distributed (and so also tears it down).
    owned: bool


_group: RankInfo | None = None
_global_depth = 0
_synced: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
_warned: set[str] = set()


# --- joining and leaving ---------------------------------------------------------------------


def requested_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not an integer") from None


def init() -> RankInfo | None:
    """Join the process group if this is one of several ranks; None for a single process.

    Idempotent. A process group that the caller already initialised (e.g. under
    ``torch.multiprocessing.spawn``) is used as it is and not destroyed by :func:`shutdown`."""
    global _group
    if _group is not None:
        return _group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() <= 1:
            return None
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        _group = RankInfo(dist.get_rank(), dist.get_world_size(), local_rank, str(dist.get_backend()), False)
        return _group
    if requested_world_size() <= 1:
        return None
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset; "
            "start distributed runs with torchrun (docs/distributed.md)"
        )
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    try:
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV_VAR, 1800)))
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV_VAR}={os.environ[TIMEOUT_ENV_VAR]!r} is not a number of seconds") from None
    dist.init_process_group(backend=backend, timeout=timeout)
    _group = RankInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, True)
    return _group


def shutdown() -> None:
    """Leave the process group (destroying it only if :func:`init` created it)."""
    global _group
    group, _group = _group, None
    _synced.clear()
    if group is not None and group.owned:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def active() -> bool:
    """True when this process is one of several ranks."""
    return _group is not None and _group.world_size > 1


def world_size() -> int:
    return _group.world_size if _group is not None else 1


def rank() -> int:
    return _group.rank if _group is not None else 0


def is_main() -> bool:
    """Rank 0: the one that writes files and calls lifecycle hooks."""
    return rank() == 0


# --- talking to the other ranks ----------------------------------------------------------------


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """Around every collective: a peer that died (SIGKILL, out of memory) or stopped
    answering makes torch raise a gloo/NCCL error here, on every survivor, whatever the
    survivor was doing. That is no plugin's fault, so it becomes one :class:`RankLost` line
    naming the rank, which components and hooks pass through unchanged."""
    try:
        yield
    except RuntimeError as exc:  # torch's DistError family, and gloo's plain RuntimeErrors
        raise RankLost(_lost_message(exc)) from None


def _lost_message(exc: BaseException) -> str:
    detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    others = [r for r in range(world_size()) if r != rank()]
    # with two ranks the peer is known; with more, gloo's message does not say which one
    who = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"
    if "timed out" in detail.lower() or "timeout" in detail.lower():
        seconds = os.environ.get(TIMEOUT_ENV_VAR, "1800")
        what = f"did not answer within {seconds} s ({TIMEOUT_ENV_VAR})"
    else:
        what = "is gone"
    # gloo's "[.../pair.cc:537]" source location off, and its first sentence only
    detail = re.sub(r"^\[[^\]]*\]\s*", "", detail).split(". ")[0][:120]
    return f"{who} (of {world_size()}) {what}, so rank {rank()} stops too ({detail}); the newest checkpoint is kept"


# --- batch statistics over the global batch -------------------------------------------------


@contextlib.contextmanager
def global_batch() -> Iterator[None]:
    """While held, the batch statistics of :mod:`tokenmdp.plugin.ops` are taken over the union of
    every rank's batch. The trainer holds it around ``estimate``, ``construct`` and the
    credit metrics (not around ``update``: a loss is a per-rank quantity whose gradients
    are averaged)."""
    global _global_depth
    _global_depth += 1
    try:
        yield
    finally:
        _global_depth -= 1


def reducing() -> bool:
    """True inside :func:`global_batch` on one of several ranks: ops must all-reduce."""
    return _global_depth > 0 and active()


def all_sum(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor summed over all ranks (same shape, dtype and device; one collective).

    The sum travels as float64. A tensor that requires grad keeps its autograd link to the
    local part (the other ranks' share is a constant)."""
    if not active():
        return tensors
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for t in tensors])
    with collective():
        dist.all_reduce(flat)
    out, offset = [], 0
    for t in tensors:
        total = flat[offset : offset + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype)
        offset += t.numel()
        out.append(t + (total - t).detach() if t.requires_grad else total)
    return tuple(out)


def all_mean(value: float | Tensor) -> float | Tensor:
    """Mean over ranks of a number or tensor (for a decision every rank must share, e.g.
    an early stop on approximate KL inside ``update``)."""
    if not active():
        return value
    if isinstance(value, Tensor):
        return all_sum(value)[0] / world_size()
    return float(all_sum(torch.tensor([float(value)], dtype=torch.float64))[0]) / world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not active():
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    with collective():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; for small things)."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    with collective():
        dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite ``module``'s parameters and buffers with rank ``src``'s (in place)."""
    if not active():
        return
    import torch.distributed as dist

    with collective():
        for tensor in module.state_dict().values():
            if isinstance(tensor, Tensor):
                dist.broadcast(tensor.data, src=src)


@torch.no_grad()
def check_same_parameters(module: torch.nn.Module, where: str) -> None:
    """Raise on every rank if ``module``'s parameters differ between ranks (they must not:
    every rank applies the same averaged gradients). The ranks compare three float64
    checksums per parameter (the sum, the sum of squares and a position-weighted sum, read
    in chunks), not the parameters: a float64 copy of every weight, twice, was 6.4 GB a
    rank for Gemma-3 270M (bench/sharding_memory.py ran out of memory there)."""
    if not active():
        return
    import torch.distributed as dist

    params = _replicated(module.parameters())
    if not params:
        return
    sums = torch.stack([_checksums(p.detach()) for p in params]).reshape(-1)
    both = torch.cat([sums, -sums])
    with collective():
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[: sums.numel()], -both[sums.numel() :]
    spread = float((high - low).max())
    if not spread == 0.0:  # (NaN weights are caught after every update, before this)
        raise TokenMDPError(
            f"the policy's parameters differ across ranks {where} (their checksums by up to {spread:.3g}): "
            "some optimizer step did not use averaged gradients; see docs/distributed.md"
        )


def _checksums(tensor: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``[3]`` float64: the sum, the sum of squares and a position-weighted sum (weights
    1..7 cycling) of ``tensor``'s elements, in chunks of ``chunk`` (equal tensors give equal
    checksums bit for bit: the same values summed in the same order)."""
    flat = tensor.reshape(-1)
    out = torch.zeros(3, dtype=torch.float64)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk].to("cpu", torch.float64)
        weights = (torch.arange(start, start + part.numel(), dtype=torch.float64) % 7) + 1
        out += torch.stack([part.sum(), part.square().sum(), (part * weights).sum()])
    return out


# --- gradients ------------------------------------------------------------------------------


def _params_of(optimizer_or_params) -> list[Tensor]:
    if isinstance(optimizer_or_params, torch.optim.Optimizer):
        return [p for group in optimizer_or_params.param_groups for p in group["params"]]
    return list(optimizer_or_params)


def _replicated(params: Iterable[Tensor]) -> list[Tensor]:
    """The parameters every rank holds whole: not FSDP2's DTensors, whose shards differ by
    rank and whose gradients FSDP averages itself (tokenmdp.sharding)."""
    from torch.distributed.tensor import DTensor

    return [p for p in params if not isinstance(p, DTensor)]


@torch.no_grad()
def _average(params: list[Tensor]) -> None:
    import torch.distributed as dist

    params = _replicated(params)
    if not params:  # all sharded (the same on every rank): FSDP averaged them
        return
    has = torch.tensor([0.0 if p.grad is None else 1.0 for p in params])
    with collective():
        dist.all_reduce(has)
    live = [p for p, n in zip(params, has.tolist()) if n > 0]
    for p in live:
        if p.grad is None:  # this rank's loss did not reach it, another rank's did
            p.grad = torch.zeros_like(p)
    by_kind: dict[tuple, list[Tensor]] = {}
    for p in live:
        by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_kind.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        with collective():
            dist.all_reduce(flat)
        flat /= world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def average_gradients(optimizer_or_params: torch.optim.Optimizer | Iterable[Tensor]) -> None:
    """Replace every gradient by its mean over ranks (call after ``backward``, before
    clipping). Given an optimizer, its next ``step()`` is not averaged again."""
    if not active():
        return
    _average(_params_of(optimizer_or_params))
    if isinstance(optimizer_or_params, torch.optim.Optimizer):
        _synced.add(optimizer_or_params)


@contextlib.contextmanager
def synchronised_optimizer_steps(who: str) -> Iterator[None]:
    """While held, an optimizer ``step()`` whose gradients were not averaged by
    :func:`average_gradients` averages them first (after whatever clipping the caller did
    on its own rank's gradients, which is why this is only the fallback)."""
    if not active():
        yield
        return

    def before_step(optimizer, args, kwargs):
        if optimizer in _synced:
            _synced.discard(optimizer)
            return
        if who not in _warned and is_main():
            _warned.add(who)
            warnings.warn(
                f"{who} stepped an optimizer without tokenmdp.distributed.average_gradients "
                "(GradientUpdater.apply_gradients calls it); its gradients are averaged across ranks "
                "just before step(), after any clipping it did per rank",
                stacklevel=2,
            )
        _average(_params_of(optimizer))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        yield
    finally:
        handle.remove()
        _synced.clear()


# --- agreeing on failures and metrics ---------------------------------------------------------


def _error_class(name: str) -> type[TokenMDPError]:
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, TokenMDPError) else RankFailure


@contextlib.contextmanager
def agreement(what: str) -> Iterator[None]:
    """Every rank runs the block; if it raises on any rank, it raises on every rank (the
    failing ranks re-raise their own error, the others an error of the same class that
    quotes it), so no rank is left waiting in a collective. The block should hold no
    collective that a failing rank could skip (or the ranks wait there instead)."""
    if not active():
        yield
        return
    import torch.distributed as dist

    error: Exception | None = None
    try:
        yield
    except RankLost:
        raise  # nobody is left to agree with
    except Exception as exc:
        error = exc
    if not any_rank(error is not None):
        return
    reports: list[Any] = [None] * world_size()
    with collective():
        dist.all_gather_object(reports, None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    failed, (name, message) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
    known = _error_class(name)
    text = message if known is not RankFailure else f"{name}: {message}"
    raise known(f"rank {failed} (of {world_size()}) failed in {what}: {text}")


def reduce_metrics(metrics: dict[str, Any], sums: Iterable[str] = ("rollout/tokens",)) -> dict[str, Any]:
    """Numbers averaged over ranks (those named in ``sums`` added up); anything else is this
    rank's. Every rank must log the same keys, or this raises on every rank."""
    if not active():
        return metrics
    import torch.distributed as dist

    keys = [k for k, v in metrics.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)]
    digest = float(zlib.crc32("\n".join(keys).encode()))
    check = torch.tensor([digest, -digest], dtype=torch.float64)
    with collective():
        dist.all_reduce(check, op=dist.ReduceOp.MAX)
    if check[0].item() != -check[1].item():
        found: list[Any] = [None] * world_size()
        with collective():
            dist.all_gather_object(found, keys)
        raise TokenMDPError(f"ranks logged different metric keys: {found}")
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    with collective():
        dist.all_reduce(values)
    out = dict(metrics)
    sums = set(sums)
    for key, total in zip(keys, values.tolist()):
        if key in sums:
            out[key] = int(round(total)) if isinstance(metrics[key], int) and math.isfinite(total) else total
        else:
            out[key] = total / world_size()
    return out
