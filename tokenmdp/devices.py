"""Where a run's tensors live, in which precision its model forwards run, and dropout.

``[train] device`` picks the device of everything a training step touches (policy,
reference, rollouts, signals, advantages, optimiser state, critics); the environment, the
task's tables and the exact solver stay on the CPU (the solver in float64) and copy what
they need. ``[train] precision = "bf16"`` runs HF model forwards under bf16 autocast: the
weights (and so the optimiser's master copy) stay float32, and every log-softmax, loss,
advantage and KL is computed in float32 from logits cast up first.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch
from torch import nn

from .errors import ConfigError

#: The values ``train.device`` accepts (``cuda:N``: the N-th CUDA device).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")

#: ``train.precision`` -> the autocast dtype of model forwards (None: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def check_device_spec(instance, attribute, value) -> None:
    """attrs validator: a device name of :data:`DEVICE_CHOICES` (availability is checked
    when the run starts, by :func:`resolve_device`)."""
    if not isinstance(value, str) or not _DEVICE_PATTERN.fullmatch(value):
        raise ValueError(f"{attribute.name} must be one of {', '.join(map(repr, DEVICE_CHOICES))} (got {value!r})")


def _local_rank() -> int | None:
    """``LOCAL_RANK`` of a torchrun worker of a run with several ranks, else None."""
    try:
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        several = False
    return int(os.environ.get("LOCAL_RANK", "0")) if several else None


def resolve_device(spec: str) -> torch.device:
    """The device ``train.device = spec`` names on this machine; one that is not here is a
    ConfigError naming ``train.device``. Under torchrun, ``auto`` and ``cuda`` give each
    rank ``cuda:LOCAL_RANK``."""
    local_rank = _local_rank()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(
                "train.device = 'mps', but this machine has no MPS device; "
                f"valid here: {', '.join(available_devices())}"
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"train.device = {spec!r}, but this machine has no CUDA device "
            f"(torch {torch.__version__}); valid here: {', '.join(available_devices())}"
        )
    count = torch.cuda.device_count()
    if spec == "cuda":
        return torch.device("cuda", (local_rank or 0) % count)
    index = int(spec.split(":")[1])
    if local_rank is not None:
        raise ConfigError(
            f"train.device = {spec!r} names one GPU, but under torchrun each rank takes "
            'cuda:LOCAL_RANK; set train.device = "cuda" (or "auto")'
        )
    if index >= count:
        raise ConfigError(
            f"train.device = {spec!r}, but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def available_devices() -> list[str]:
    """The ``train.device`` values this machine can run."""
    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        found.append("mps")
    return found


def module_device(module) -> torch.device:
    """Where ``module``'s weights live (the CPU for a module without parameters)."""
    first = next(iter(module.parameters()), None) if isinstance(module, nn.Module) else None
    return first.device if first is not None else torch.device("cpu")


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type, or nothing for float32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def disable_dropout(module: nn.Module) -> nn.Module:
    """Set every dropout probability in ``module`` to 0, so that train and eval mode
    compute the same function; returns ``module``. As TRL's ``disable_dropout``, every
    ``nn.Dropout`` (LoRA's too), and also the float rates some attention layers read in
    train mode only (Gemma-3's ``attention_dropout``)."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            sub.p = 0.0
        for name, value in vars(sub).items():
            if "dropout" in name and isinstance(value, float):
                setattr(sub, name, 0.0)
    return module
