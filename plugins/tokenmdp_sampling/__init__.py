"""The built-in sampling backend: the policy decodes itself, token by token, KV-cached
(tokenmdp's own preallocated cache for GPT-2, the transformers cache otherwise)."""

from __future__ import annotations

from tokenmdp import SamplingBackend, generate_samples, hookimpl


class TorchSampling(SamplingBackend):
    """``tokenmdp.generate``: batched incremental decoding with the policy's ``start`` and
    ``advance``, on whatever device the policy is."""

    name = "torch"

    def sample(self, policy, prompt_ids, prompt_mask, horizon, eos_token, generator, params, return_logprobs=False):
        return generate_samples(policy, prompt_ids, prompt_mask, horizon, eos_token, generator, params, return_logprobs)


@hookimpl
def tokenmdp_sampling_backends():
    return [TorchSampling]
