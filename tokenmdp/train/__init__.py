"""Training: the loop (``trainer``), sampling (``rollout``), evaluation, the reference's SFT,
preference pairs."""

import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    """``tokenmdp.train`` is this package and also the function :func:`.api.train`, so that
    ``tokenmdp.train(config, model=..., reward=..., prompts=...)`` reads as TRL's does."""

    def __call__(self, *args, **kwargs):
        from .api import train

        return train(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
