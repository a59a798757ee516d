"""The policy and its frozen reference: built once, in one place, for training and for
every reader of a run directory (compare, explain, a teacher)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .. import distributed, sharding
from ..config import Config, load_config
from ..errors import ConfigError
from ..policies import TokenPolicy, build_policy
from .checkpoints import read_checkpoint, read_weights
from .layout import REFERENCE
from .rundir import RunDir
from .sft import fine_tune_reference, tilt_beta


def frozen_reference(base: TokenPolicy) -> TokenPolicy:
    """The reference of a run whose initial policy is ``base``: with LoRA, the same module
    with its adapter off (no second copy of the weights); otherwise ``base`` itself, frozen."""
    view = base.reference_view()
    return view.eval() if view is not None else base.requires_grad_(False).eval()


def split_reference(base: TokenPolicy) -> tuple[TokenPolicy, TokenPolicy]:
    """``(policy, reference)`` from the initial policy. Full fine-tuning changes every
    weight, so the policy is a copy (made before ``base`` is frozen); a LoRA policy is
    ``base`` itself, trained through its adapter."""
    if base.reference_view() is not None:
        return base, frozen_reference(base)
    # every weight trains, also when base arrived frozen (a model object that was the
    # reference of an earlier tokenmdp.train call in this process)
    policy = copy.deepcopy(base).requires_grad_(True)
    return policy, frozen_reference(base)


def reference_key(config: Config) -> str:
    """What a fine-tuned reference depends on, as a short hash: the env, the policy, the
    ``[reference]`` table, the seed and (for tagged samples' tilt) beta. Runs with the same
    key fine-tune the same reference."""
    import hashlib
    import json

    from ..options import to_dict

    ref = config.reference
    tilt = tilt_beta(config) if ref.tagged_samples else None
    what = {"env": config.env, "policy": config.policy, "reference": to_dict(ref), "seed": config.train.seed}
    what["tilt"] = tilt
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cached_sft(base: TokenPolicy, config: Config, task, cache_dir: Path) -> list[float]:
    """Fine-tune ``base`` as :func:`initial_policy` does, or load the result of the same
    fine-tune from ``cache_dir`` (safetensors weights, the SFT losses, the tagged tokens
    and the global RNG state after it, so that what follows is as if it had run here). A
    lock per key makes a second process wait for the first's fine-tune, then load it."""
    import fcntl
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from .checkpoints import checksum_path
    from .files import atomic_write_text

    cache_dir.mkdir(parents=True, exist_ok=True)
    key = reference_key(config)
    weights, meta = cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if weights.is_file() and meta.is_file():
            stored = load_file(str(weights))
            torch.set_rng_state(stored.pop("__rng_state__"))
            base.load_state_dict(stored)
            return json.loads(meta.read_text())["losses"]
        losses, tagged = fine_tune_reference(base, task, config)
        state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
        tmp = weights.with_name(f".{weights.name}.tmp-{os.getpid()}")
        save_file({**state, "__rng_state__": torch.get_rng_state()}, str(tmp))
        # each file's checksum before the file takes its name, as for checkpoints: a cached
        # reference never lacks one (compare verifies them before a cell reads the cache)
        atomic_write_text(checksum_path(weights), hashlib.sha256(tmp.read_bytes()).hexdigest() + "\n")
        os.replace(tmp, weights)
        text = json.dumps({"losses": losses, "tagged_sft_tokens": tagged})
        atomic_write_text(checksum_path(meta), hashlib.sha256(text.encode()).hexdigest() + "\n")
        atomic_write_text(meta, text)
        return losses


def initial_policy(
    config: Config, task, reference_file: Path | None = None, model=None, cache_dir: Path | None = None
) -> tuple[TokenPolicy, list[float]]:
    """The network the run starts from, and its SFT losses: built from ``[policy]`` (or
    around ``model``, a transformers causal LM given to ``tokenmdp.train``), then loaded
    from ``reference_file`` (a resumed run's reference.pt), or fine-tuned on the task's
    base distribution (``reference.init = "sft"``), or left as initialised."""
    if model is not None:
        from ..policies.hf import HFCausalLMPolicy

        spec = config.policy
        base = HFCausalLMPolicy(
            model,
            task.vocab_size,
            lora=spec.get("lora"),
            source="a Python object",
            fast_path=spec.get("fast_path", True),
        )
    else:
        base = build_policy(config.policy, task, seed=config.train.seed)
    shared = base.reference_view() is not None
    if shared and config.reference.init == "sft":
        raise ConfigError(
            'policy.lora trains an adapter on a fixed base, and the base is the reference; set reference.init = "init"'
        )
    losses: list[float] = []
    if reference_file is not None and reference_file.exists() and not shared:
        base.load_state_dict(read_weights(reference_file))
    elif config.reference.init == "sft" and cache_dir is not None:
        losses = _cached_sft(base, config, task, Path(cache_dir))
    elif config.reference.init == "sft":
        losses = fine_tune_reference(base, task, config)[0]
    distributed.broadcast_module(base)  # every rank starts from rank 0's weights
    return base, losses


def load_reference(run_dir: str | Path, config: Config, task) -> TokenPolicy:
    """The frozen reference model a run was trained and scored against (its reference.pt)."""
    base = build_policy(config.policy, task, seed=config.train.seed)
    if base.reference_view() is None:  # LoRA runs' reference.pt holds no weights
        base.load_state_dict(read_weights(Path(run_dir) / REFERENCE))
    return frozen_reference(base)


def load_policy(path: str | Path, task, step: int | None = None) -> TokenPolicy:
    """A trained policy from a run directory (its checkpoint at ``step``, default the last)
    or an HF model directory."""
    path = Path(path)
    if (path / "config.toml").is_file():
        config = load_config(path / "config.toml")
        policy = build_policy(config.policy, task, seed=config.train.seed)
        run = RunDir(path)
        checkpoint = run.latest_checkpoint() if step is None else run.checkpoint_path(step)
        if checkpoint is None:
            raise ConfigError(f"{str(path)!r} is a run directory without checkpoints")
        policy.load_checkpoint_state(read_checkpoint(checkpoint)["policy"])
        return policy
    from ..policies.hf import HFCausalLMPolicy

    return HFCausalLMPolicy.from_pretrained(path, vocab_size=task.vocab_size)


def pretrained_sharded(
    path: str | os.PathLike, vocab_size: int | None, autocast_dtype: torch.dtype | None, device: torch.device
):
    """An :class:`~tokenmdp.policies.hf.HFCausalLMPolicy` of the model in ``path`` (no LoRA),
    sharded, without any rank holding the whole model: built with its parameters on the
    meta device, sharded, materialised as empty shards on ``device``, then each rank reads
    only its slices of the pretrained safetensors (``torch.distributed.checkpoint`` with
    ``HuggingFaceStorageReader``). The same weights as ``from_pretrained`` (tested: the
    same metrics as one process). A LoRA policy is built whole and then sharded: peft moves
    a new adapter to its base layer's (meta) device, and an adapter initialised anywhere
    else would not draw the RNG as one process does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..policies.hf import HFCausalLMPolicy

    with sharding.parameters_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    policy = HFCausalLMPolicy(model, vocab_size, source=str(path), fast_path=False)
    buffers = {n: b.clone() for n, b in policy.named_buffers()}
    sharding.shard_policy(policy, autocast_dtype)
    policy.to_empty(device=device)
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        policy.get_submodule(owner)._buffers[attr] = value.to(device)
    reader = HuggingFaceStorageReader(str(path))
    in_file = set(reader.read_metadata().state_dict_metadata)
    targets = {}
    for key, value in policy.model.state_dict().items():
        if key in in_file:  # (a tied output layer is not: it is the embeddings)
            targets[key] = value
    with distributed.collective():
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path)))
    return policy
