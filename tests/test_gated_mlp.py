"""Gated MLPs recompute their activation in the backward (tokenmdp/policies/gated_mlp.py):
the same log-probs and gradients, bit for bit, as the library's MLP (the same operations in
the same order), in fp32 and bf16, with LoRA; one ``[positions, intermediate]`` tensor fewer
kept per layer; only MLPs whose forward is exactly the gated expression are touched."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_GPT2
from test_chunked_logits import TINY_GEMMA, _batch, saved_sizes

from tokenmdp.plugin.batch import token_logprobs
from tokenmdp.policies import gated_mlp
from tokenmdp.policies.hf import HFCausalLMPolicy

_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
#: A Llama of the tiny Gemma's sizes (its own attention and activation).
TINY_LLAMA = {"model_type": "llama", **{key: TINY_GEMMA[key] for key in _SIZES}}


def _policy(config, recompute: bool, precision: str, lora: bool, monkeypatch) -> HFCausalLMPolicy:
    monkeypatch.setattr(HFCausalLMPolicy, "recompute_gated_activations", recompute)
    policy = HFCausalLMPolicy.from_config(config, seed=0, lora={"r": 4, "alpha": 8} if lora else None)
    policy.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    return policy.eval()


def _logprobs_and_grads(policy, batch):
    logp, entropy = token_logprobs(policy, batch, return_entropy=True, chunk=4)
    (logp.sum() + 0.1 * entropy.sum()).backward()
    return logp.detach(), {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("config, lora", [(TINY_GEMMA, False), (TINY_GEMMA, True), (TINY_LLAMA, False)])
def test_recomputing_the_activation_changes_no_value_and_no_gradient(config, lora, precision, monkeypatch):
    library = _policy(config, False, precision, lora, monkeypatch)
    recomputing = _policy(config, True, precision, lora, monkeypatch)
    mlps = [m for m in recomputing.modules() if isinstance(m, gated_mlp.RecomputedGatedMLP)]
    assert len(mlps) == config["num_hidden_layers"]
    assert not any(isinstance(m, gated_mlp.RecomputedGatedMLP) for m in library.modules())
    batch = _batch(library.vocab_size)
    logp, grads = _logprobs_and_grads(library, batch)
    logp_r, grads_r = _logprobs_and_grads(recomputing, batch)
    assert torch.equal(logp_r, logp)
    assert grads and grads_r.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grads_r[name], grad), name


def test_one_intermediate_tensor_fewer_is_kept_per_layer(monkeypatch):
    batch = _batch(TINY_GEMMA["vocab_size"])
    positions = batch.prompt_ids.numel() + batch.response_ids.numel()
    kept = {}
    for recompute in (False, True):
        policy = _policy(TINY_GEMMA, recompute, "fp32", False, monkeypatch)
        with saved_sizes() as sizes:
            token_logprobs(policy, batch, chunk=4)
        kept[recompute] = sum(sizes)
    layers, width = TINY_GEMMA["num_hidden_layers"], TINY_GEMMA["intermediate_size"]
    assert kept[False] - kept[True] == layers * positions * width


def test_only_the_plain_gated_expression_is_swapped():
    class Shifted(torch.nn.Module):  # gated, but not the library's expression
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = torch.nn.Linear(4, 4)
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) + 1)

    model = torch.nn.Sequential(Shifted())
    assert gated_mlp.recompute_activations(model) == 0
    gpt2 = HFCausalLMPolicy.from_config(TINY_GPT2)  # GPT-2's MLP is not gated
    assert not any(isinstance(m, gated_mlp.RecomputedGatedMLP) for m in gpt2.modules())
    gemma = HFCausalLMPolicy.from_config(TINY_GEMMA).model
    assert gated_mlp.recompute_activations(gemma) == 0  # swapped once already, never twice
    names = [n for n, _ in gemma.named_parameters()]
    assert any(n.endswith("mlp.gate_proj.weight") for n in names)  # the same module names
