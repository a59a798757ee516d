"""FSDP2 sharding of HF policies across the ranks of a torchrun launch (``train.sharding``).

With ``train.sharding = "fsdp"`` every transformer block of the policy (the classes its
model lists in ``_no_split_modules``) is wrapped by ``torch.distributed.fsdp.fully_shard``,
then the whole model, so each rank holds ``1 / world_size`` of every parameter, of its
gradient and of the optimizer's state (Adam's two moments). The reference of a full
fine-tune (a frozen copy) is sharded the same way; a LoRA policy's reference is its own
module with the adapter off, so it is sharded with it.

When the models are sharded and when they are whole (docs/distributed.md, "Sharding"):

- **Scoring and the update** run on the sharded models: each block's parameters are
  all-gathered for its forward (and again for its backward), and its gradients are
  reduce-scattered (a mean over ranks, in float32 under ``train.precision = "bf16"``,
  which maps to FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16,
  reduce_dtype=float32)``). Every rank runs the same forwards (the same batch size), so
  the collectives pair up.
- **Sampling** (``tokenmdp.generate``, :func:`whole_policy`) and rank 0's **evaluation**
  run inside :func:`gathered`: the model's parameters are gathered once and freed after.
  Decoding a response is one forward per token; without the gather each of them would
  all-gather every layer again, and ranks whose responses end at different lengths would
  run different numbers of forwards, so their collectives would not pair up. The cost is
  the whole policy on every rank while it samples (as TRL's ZeRO-3 generation gathers
  it); the gradients and the optimizer state, 3/4 of an fp32 Adam fine-tune's state, stay
  sharded throughout.

Checkpoints: every rank writes its shards (:func:`split_sharded`, :func:`write_shards`:
``torch.distributed.checkpoint`` into safetensors files, nothing pickled) and rank 0 the
rest; any process reads them whole (:func:`read_whole_shards`), so a run resumes under
any world size, sharded or not (a sharded model's load hook and :func:`shard_optimizer_state`
cut a whole state back into this rank's shards).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .errors import ConfigError


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (a parameter, gradient or optimizer state FSDP2 shards)."""
    return isinstance(tensor, _dtensor())


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor; any other tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def check_sharding(config) -> None:
    """``train.sharding = "fsdp"`` needs an HF policy and a launch of several ranks: a one-line
    error naming the key otherwise (the value itself is checked by the config)."""
    if config.train.sharding == "none":
        return
    kind = config.policy.get("kind", "gru")
    if kind != "hf":
        raise ConfigError(
            f'train.sharding = "fsdp" shards HF models (policy.kind = "hf"); policy.kind = {kind!r} '
            'is small enough to hold whole: set train.sharding = "none"'
        )
    if distributed.requested_world_size() <= 1:
        raise ConfigError(
            'train.sharding = "fsdp" shards across the ranks of a torchrun launch, and this is a single '
            "process: launch with torchrun --nproc_per_node=N (docs/distributed.md), or set "
            'train.sharding = "none" (a resume in one process: --set train.sharding=none)'
        )


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block every parameter a module registers goes to the meta device (no
    memory), while buffers stay real, as accelerate's ``init_empty_weights(include_buffers=False)``:
    a model's non-persistent buffers (Gemma's rotary ``inv_freq``, ``embed_scale``) are
    computed at construction and are in no weights file."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # (one already there is kept: tied weights stay tied)
            p = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: torch.nn.Module, autocast_dtype: torch.dtype | None) -> None:
    """``fully_shard`` every transformer block of ``model`` (an HF causal LM, or peft's
    wrapper of one), then ``model`` itself, in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = _blocks(model)
    if not blocks:
        raise ConfigError(
            f'train.sharding = "fsdp": {type(model).__name__} lists no transformer block classes '
            "(_no_split_modules) to shard by"
        )
    precision = (
        MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)
        if autocast_dtype is not None
        else MixedPrecisionPolicy()
    )
    with distributed.collective():
        for block in blocks:
            fully_shard(block, mp_policy=precision)
        fully_shard(model, mp_policy=precision)


def shard_policy(policy, autocast_dtype: torch.dtype | None) -> None:
    """Shard an :class:`~tokenmdp.policies.hf.HFCausalLMPolicy` in place. Its fast GPT-2
    path reads the weights directly, bypassing FSDP's gathers, so it is switched off. The
    policy is marked ``sharded``, which also keeps it from reading a group's shared prompt
    once (``HFCausalLMPolicy._may_share``): that makes a forward's number of model calls
    depend on the rank's own rows, where FSDP's gathers must match on every rank. It then
    loads whole tensors (a checkpoint's) as well as shards: each is cut into this rank's
    shard on the way in."""
    policy.fast_path = False
    policy.sharded = True
    shard_model(policy.model, autocast_dtype)
    policy.model.register_load_state_dict_pre_hook(_whole_to_shards)


def _whole_to_shards(module, state_dict, prefix, *args) -> None:
    """``load_state_dict``'s pre-hook on a sharded model: every whole tensor given for one of
    its sharded entries becomes this rank's shard (FSDP2 copies shards only)."""
    for key, current in module.state_dict().items():
        given = state_dict.get(prefix + key)
        if given is not None and is_sharded(current) and not is_sharded(given):
            state_dict[prefix + key] = _shard_like(given, current)


def _fsdp_modules(modules: Iterable[torch.nn.Module]) -> list:
    from torch.distributed.fsdp import FSDPModule

    seen, found = set(), []
    for module in modules:
        # a view that runs another module's parameters (a LoRA policy's reference) gathers those
        module = getattr(module, "parameters_of", module)
        for m in module.modules():
            if isinstance(m, FSDPModule) and id(m) not in seen:
                seen.add(id(m))
                found.append(m)
    return found


@contextlib.contextmanager
def gathered(*modules: torch.nn.Module) -> Iterator[None]:
    """Inside the block the sharded modules among ``modules`` hold their full parameters
    and run forwards without any collective (one all-gather per module on entry; the
    gathered parameters are freed on exit). Every rank must enter it (the gather is a
    collective); inside, a rank may run forwards alone (rank 0's evaluation). Nested
    blocks gather nothing again. Without sharded modules it does nothing."""
    fsdp = [m for m in _fsdp_modules(modules) if not getattr(m, "_tokenmdp_gathered", False)]
    if not fsdp:
        yield
        return
    with distributed.collective():
        for m in fsdp:
            m.unshard()
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m._tokenmdp_gathered = True
    try:
        yield
    finally:
        for m in fsdp:
            m._tokenmdp_gathered = False
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def whole_policy(sample):
    """Decorate a sampling function whose first argument is the policy: it runs inside
    :func:`gathered` (a response of ``n`` tokens is ``n`` forwards, and ranks whose responses
    end at different lengths run different numbers of them)."""

    @functools.wraps(sample)
    def on_whole_policy(policy, *args, **kwargs):
        with gathered(policy):
            return sample(policy, *args, **kwargs)

    return on_whole_policy


def full_tensors(tree: Any, keep: bool = True) -> Any:
    """``tree`` (nested dicts and lists) with every sharded tensor replaced by the whole
    tensor (an all-gather each, in the tree's order: every rank must call it on trees of
    the same shape); anything else as it is. With ``keep`` false (the ranks that write
    nothing) each gathered tensor is dropped at once, so only one is ever held whole."""
    if is_sharded(tree):
        with distributed.collective():
            whole = tree.full_tensor()
        return whole if keep else None
    if isinstance(tree, dict):
        return {k: full_tensors(v, keep) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(full_tensors(v, keep) for v in tree)
    return tree


#: In a sharded checkpoint's ``.pt`` file: where a tensor saved by shards was.
SHARDED = "<saved by shards>"


def split_sharded(tree: Any) -> tuple[Any, dict[str, Tensor]]:
    """``(skeleton, shards)``: ``tree`` with each sharded tensor replaced by :data:`SHARDED`,
    and those tensors by path (``"policy/model.lm_head.weight"``, keys joined by ``/``). A
    tensor met again under another path (tied weights: an LM's output layer and its
    embeddings) is saved once; its other places say ``"<saved by shards> as PATH"``."""
    shards: dict[str, Tensor] = {}
    first: dict[Any, str] = {}

    def split(node: Any, path: str) -> Any:
        if is_sharded(node):
            # a state dict hands out a new DTensor per name; tied names share the local memory
            # (a shard of an output layer or embedding is never empty: more rows than ranks)
            part = node.to_local()
            same = (part.untyped_storage().data_ptr(), part.storage_offset(), tuple(part.shape))
            key = same if part.numel() else id(node)
            if key in first:
                return f"{SHARDED} as {first[key]}"
            first[key] = path
            shards[path] = node
            return SHARDED
        if isinstance(node, dict):
            return {k: split(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
        return node

    return split(tree, ""), shards


def fill_sharded(skeleton: Any, tensors: dict[str, Tensor], path: str = "") -> Any:
    """:func:`split_sharded` undone: each :data:`SHARDED` leaf replaced by its tensor."""
    if isinstance(skeleton, str) and skeleton.startswith(SHARDED):
        return tensors[skeleton.removeprefix(f"{SHARDED} as ") if skeleton != SHARDED else path]
    if isinstance(skeleton, dict):
        return {k: fill_sharded(v, tensors, f"{path}/{k}" if path else str(k)) for k, v in skeleton.items()}
    return skeleton


def write_shards(tensors: dict[str, Tensor], folder: str | os.PathLike) -> None:
    """Every rank writes its shards of ``tensors`` into ``folder`` with
    ``torch.distributed.checkpoint``, as safetensors files (one a rank, the shards' offsets
    in each file's JSON header: nothing is pickled). A collective: every rank calls it with
    the same paths."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    with distributed.collective():
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def read_whole_shards(folder: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor :func:`write_shards` wrote into ``folder``, whole, in this process alone
    (whatever the world size that wrote it, and with no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    metadata = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    return tensors


def read_own_shards(folder: str | os.PathLike, model: torch.nn.Module) -> dict[str, Tensor]:
    """Every tensor :func:`write_shards` wrote into ``folder``, as this rank's shard only
    (laid out as ``model``'s sharded parameters are: dim 0 cut in ``world_size`` chunks),
    whatever the world size that wrote it; no rank reads or holds a whole tensor. A
    collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.tensor import DTensor

    like = next(p for p in model.parameters() if is_sharded(p))
    mesh, placements = like.device_mesh, like.placements
    ranks, me = mesh.size(), mesh.get_local_rank()
    metadata = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    targets = {}
    for key, m in metadata.items():
        size = tuple(m.size)
        rows = -(-size[0] // ranks)  # torch.chunk's: the first ranks take ceil(n / ranks) rows
        start = min(me * rows, size[0])
        local = torch.empty(
            (min(start + rows, size[0]) - start, *size[1:]), dtype=m.properties.dtype, device=like.device
        )
        stride = torch.empty(size, device="meta").stride()
        targets[key] = DTensor.from_local(local, mesh, placements, run_check=False, shape=size, stride=stride)
    with distributed.collective():
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder)))
    return targets


def _shard_like(value: Tensor, like) -> Tensor:
    """The whole tensor ``value`` cut into this rank's shard of ``like``'s layout (no
    collective: every rank holds ``value``)."""
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of whole tensors: each state tensor of a sharded
    parameter (Adam's moments, the parameter's shape) cut into this rank's shard."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p) or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            for key, value in state.items():
                if isinstance(value, Tensor) and not is_sharded(value) and value.shape == p.shape:
                    state[key] = _shard_like(value, p)


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over parameters of which some are sharded: the
    global norm of all their gradients (each sharded one counted once over the ranks), and
    every gradient scaled by ``min(1, max_norm / (norm + 1e-6))`` as torch scales them.
    Without sharded gradients it is torch's own call."""
    params = [p for p in parameters if p.grad is not None]
    sharded = [p for p in params if is_sharded(p.grad)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in params if not is_sharded(p.grad)]
    with distributed.collective():
        norms = [torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor().float()]
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain]).float().to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms))
    coefficient = max_norm / (float(total) + 1e-6)
    if coefficient < 1 and math.isfinite(coefficient):
        for p in params:
            p.grad.mul_(coefficient)
    return total
