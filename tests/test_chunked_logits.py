"""The chunked output layer (tokenmdp/plugin/chunked.py): the log-probs and entropies of
the taken tokens, the KL to a full-vocabulary target (reverse-kl's loss), and their
gradients, equal the unchunked path's to a float tolerance, in fp32 and bf16, on GPT-2
(fast path and library), Gemma-3 and LoRA; toy runs keep the unchunked path, so their
metrics.jsonl stays byte-identical."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import TINY_GPT2
from test_real_lm import text_files, text_run  # noqa: F401 (fixture)

from tokenmdp.plugin.batch import RolloutBatch, token_distribution, token_kl, token_logprobs
from tokenmdp.plugin.chunked import auto_chunk, chunked_kl, chunked_token_stats
from tokenmdp.plugin.updaters import entropy_of
from tokenmdp.policies.hf import HFCausalLMPolicy

#: fp32: the same operations per position; only a smaller matrix product may round
#: differently (a few ulps of the logits). bf16: the output layer's product is rounded to
#: bf16 either way; a different blocking moves a logit by up to one bf16 ulp (2**-8 relative).
TOLERANCE = {"fp32": dict(atol=1e-5, rtol=1e-5), "bf16": dict(atol=3e-2, rtol=3e-2)}

TINY_GEMMA = {
    "model_type": "gemma3_text",
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "sliding_window": 8,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "final_logit_softcapping": 30.0,
}


def _batch(vocab: int, b: int = 5, p: int = 4, t: int = 7, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t)
    for row, n in enumerate([7, 3, 5, 1, 6][:b]):
        mask[row, n:] = 0
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[1, :2] = 0  # a left-padded prompt
    return RolloutBatch(
        prompt_ids=torch.randint(3, vocab, (b, p), generator=g),
        prompt_mask=prompt_mask,
        response_ids=torch.randint(3, vocab, (b, t), generator=g) * mask.long(),
        response_mask=mask,
        rewards=torch.zeros(b, t),
        prompt_index=torch.arange(b),
    )


def _policy(kind: str, precision: str, lora: bool = False) -> HFCausalLMPolicy:
    config = TINY_GEMMA if kind == "gemma" else TINY_GPT2
    policy = HFCausalLMPolicy.from_config(config, seed=0, lora={"r": 4, "alpha": 8} if lora else None)
    policy.fast_path = kind == "gpt2-fast"
    policy.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    return policy.eval()


def _both(policy, batch, chunk):
    """(log-probs, entropy, their gradients' sum over the trainable parameters) by the
    unchunked path and by the chunked one."""
    out = []
    for path in ("full", "chunked"):
        policy.zero_grad()
        if path == "full":
            logp, logits = token_logprobs(policy, batch, return_logits=True)
            entropy = entropy_of(logits) * batch.response_mask
        else:
            logp, entropy = token_logprobs(policy, batch, return_entropy=True, chunk=chunk)
        (logp.sum() + 0.1 * entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        out.append((logp.detach(), entropy.detach(), grads))
    return out


def assert_grads_close(got: dict, expected: dict, tol: dict) -> None:
    """The same parameters have gradients in both, and each of ``got``'s equals
    ``expected``'s at ``tol``, both divided by the expected tensor's largest entry."""
    assert expected and got.keys() == expected.keys()
    for name in expected:
        scale = float(expected[name].abs().max()) or 1.0
        torch.testing.assert_close(got[name] / scale, expected[name] / scale, **tol, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind, lora", [("gpt2-fast", False), ("gpt2", False), ("gemma", False), ("gpt2", True)])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_values_and_gradients_equal_the_unchunked_path(kind, lora, precision, chunk):
    policy = _policy(kind, precision, lora)
    batch = _batch(policy.vocab_size)
    (logp, ent, grads), (logp_c, ent_c, grads_c) = _both(policy, batch, chunk)
    tol = TOLERANCE[precision]
    torch.testing.assert_close(logp_c, logp, **tol)
    torch.testing.assert_close(ent_c, ent, **tol)
    assert_grads_close(grads_c, grads, tol)
    assert not logp_c[batch.response_mask == 0].any() and not ent_c[batch.response_mask == 0].any()


@contextlib.contextmanager
def saved_sizes():
    """The number of elements of every tensor autograd saves inside the block."""
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        yield sizes


def test_the_kernel_never_holds_a_batchs_logits():
    """With gradients on, the forward keeps each chunk's hidden states, not its logits:
    the saved tensors of the graph have no [*, vocab] tensor bigger than one chunk."""
    torch.manual_seed(0)
    vocab, width, n, chunk = 5000, 16, 64, 8
    head = torch.nn.Linear(width, vocab, bias=False)
    hidden = torch.randn(n, width, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    with saved_sizes() as saved:
        logp, ent = chunked_token_stats(hidden, head, targets, chunk, entropy=True)
    assert max(saved) < chunk * vocab  # nothing of a chunk's logits size is kept
    (logp.sum() + ent.sum()).backward()
    full = torch.log_softmax(head(hidden), -1)
    reference = torch.autograd.grad(full.gather(-1, targets[:, None]).sum() - (full.exp() * full).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, reference, atol=1e-5, rtol=1e-5)


def test_auto_chunk_keeps_a_chunk_near_16_mi_entries():
    assert auto_chunk(262_144) == 64 and auto_chunk(48) == (1 << 24) // 48 and auto_chunk(10**9) == 1


def test_a_text_run_trains_the_same_with_and_without_chunks(text_files, tmp_path):  # noqa: F811
    """The whole training loop: a tiny GPT-2 GRPO run with 2-position chunks (several
    chunks per micro-batch, the checkpointed backward) against the unchunked path."""
    import json

    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    rows = {}
    for chunk in ("0", "2"):
        run = tmp_path / f"chunk{chunk}"
        grpo = ["algorithm.name=grpo", "train.samples_per_prompt=4", "train.batch_size=8", "train.steps=3"]
        overrides = text_run(text_files, run, *grpo, "updater.lr=1e-3", f"train.logit_chunk={chunk}")
        Trainer(load_config(None, overrides)).train()
        rows[chunk] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ("losses/policy", "policy/entropy", "policy/approxkl", "kl_ref", "true_reward")
    for full, chunked in zip(rows["0"], rows["2"]):
        for key in keys:
            if key in full:
                assert chunked[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key
    assert any("losses/policy" in r for r in rows["2"])


def test_toy_policies_never_chunk_so_toy_metrics_are_unchanged(tmp_path):
    """A toy policy has no hidden-state path: train.logit_chunk cannot change a toy run."""
    import json

    from helpers import TINY

    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    texts = []
    for chunk in ("auto", "1", "0"):
        run = tmp_path / f"c{chunk}"
        Trainer(load_config(None, [*TINY, f"train.logit_chunk={chunk}", f"run.dir={run}"])).train()
        texts.append(
            [
                {k: v for k, v in json.loads(line).items() if "time" not in k and "per_s" not in k}
                for line in (run / "metrics.jsonl").read_text().splitlines()
            ]
        )
    assert texts[0] == texts[1] == texts[2]


@pytest.mark.parametrize("value", ["-1", "1.5", '"half"', "true"])
def test_bad_logit_chunk_values_are_one_line(value):
    from tokenmdp import ConfigError
    from tokenmdp.config import load_config

    with pytest.raises(ConfigError, match=r'logit_chunk must be "auto", 0 \(off\) or a number of positions >= 1'):
        load_config(None, [f"train.logit_chunk={value}"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("entropy_grad", [True, False])
def test_a_frozen_output_layer_takes_the_precomputed_backward_with_the_same_gradients(precision, entropy_grad):
    """LoRA leaves the output layer frozen: the chunks then go through _FrozenHeadStats (no
    recomputation), with gradients equal to the unchunked path's."""
    from tokenmdp.plugin import chunked

    policy = _policy("gpt2", precision, lora=True)
    assert policy.frozen_output_layer() is not None
    batch = _batch(policy.vocab_size)
    calls = []
    original = chunked._FrozenHeadStats.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunked._FrozenHeadStats, "apply", lambda *a: calls.append(1) or original(*a))
        logp, entropy = token_logprobs(policy, batch, return_entropy=True, chunk=3, entropy_grad=entropy_grad)
        assert calls  # the frozen path ran
        weight = 0.1 if entropy_grad else 0.0
        (logp.sum() + weight * entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    assert entropy.requires_grad == entropy_grad
    policy.zero_grad()
    full, logits = token_logprobs(policy, batch, return_logits=True)
    full_entropy = entropy_of(logits) * batch.response_mask
    (full.sum() + weight * full_entropy.sum()).backward()
    tol = TOLERANCE[precision]
    torch.testing.assert_close(logp.detach(), full.detach(), **tol)
    torch.testing.assert_close(entropy.detach(), full_entropy.detach(), **tol)
    for name, p in policy.named_parameters():
        if p.grad is not None:
            scale = float(p.grad.abs().max()) or 1.0
            torch.testing.assert_close(grads[name] / scale, p.grad / scale, **tol, msg=name)


def test_a_trainable_output_layer_is_not_frozen():
    assert _policy("gpt2", "fp32").frozen_output_layer() is None  # full fine-tuning trains it
    assert _policy("gemma", "fp32", lora=True).frozen_output_layer() is None  # a soft cap follows it


# --- the KL to a full-vocabulary target (reverse-kl's loss) ------------------------------


def _target(kind: str, precision: str) -> HFCausalLMPolicy:
    config = TINY_GEMMA if kind == "gemma" else TINY_GPT2
    target = HFCausalLMPolicy.from_config(config, seed=1)
    target.fast_path = kind == "gpt2-fast"
    target.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    return target.eval().requires_grad_(False)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind, lora", [("gpt2-fast", False), ("gemma", False), ("gpt2", True)])
@pytest.mark.parametrize("chunk, direction", [(1, "reverse"), (4, "reverse"), (4, "forward")])
def test_the_kl_to_a_target_equals_the_whole_logits_path(kind, lora, precision, chunk, direction):
    """``token_kl`` against a target held as hidden states, a chunk at a time (through the
    frozen layer's precomputed backward under LoRA), against the same KL from the whole
    logits of both models (written out here), in both directions (reverse-kl's KL(pi || q),
    TDPO's KL(q || pi)), values and gradients, with the taken tokens' log-probs of the same
    forward in the loss; the target's taken log-probs too."""
    from tokenmdp.plugin import chunked

    policy, target = _policy(kind, precision, lora), _target(kind, precision)
    batch, prefix = _batch(policy.vocab_size), torch.tensor([5, 6])
    taken, held = token_distribution(target, batch, prefix_ids=prefix, chunk=chunk)
    assert held.log_probs is None and held.hidden is not None  # no [B, T, V] tensor
    whole_taken, whole = token_distribution(target, batch, prefix_ids=prefix)
    tol = TOLERANCE[precision]
    torch.testing.assert_close(taken, whole_taken, **tol)
    torch.testing.assert_close(held.whole(), whole.log_probs, **tol)

    frozen_calls = []
    original = chunked._FrozenHeadKL.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunked._FrozenHeadKL, "apply", lambda *a: frozen_calls.append(1) or original(*a))
        kl, entropy, taken_logp = token_kl(policy, batch, held, chunk, direction, return_logprobs=True)
    assert bool(frozen_calls) == (policy.frozen_output_layer() is not None)
    (kl.sum() + 0.3 * taken_logp.sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    assert not entropy.requires_grad

    policy.zero_grad()
    whole_taken, logits = token_logprobs(policy, batch, return_logits=True)
    logp, q = torch.log_softmax(logits, -1), whole.log_probs
    if direction == "reverse":
        expected = (logp.exp() * (logp - q)).sum(-1) * batch.response_mask
    else:
        expected = (q.exp() * (q - logp)).sum(-1) * batch.response_mask
    (expected.sum() + 0.3 * whole_taken.sum()).backward()
    torch.testing.assert_close(kl.detach(), expected.detach(), **tol)
    torch.testing.assert_close(taken_logp.detach(), whole_taken.detach(), **tol)
    torch.testing.assert_close(entropy, entropy_of(logits.detach()) * batch.response_mask, **tol)
    assert (expected[batch.response_mask > 0] > 0).all()  # two different models: a real KL
    assert grads
    for name, p in policy.named_parameters():
        if p.grad is not None:
            scale = float(p.grad.abs().max()) or 1.0
            torch.testing.assert_close(grads[name] / scale, p.grad / scale, **tol, msg=name)


def test_the_kl_kernel_never_holds_a_batchs_logits():
    """Neither side's [N, vocab] is kept for the backward: the policy's chunk is recomputed,
    the target's is made inside the chunk; the gradient equals the whole formula's."""
    torch.manual_seed(0)
    vocab, width, n, chunk = 5000, 16, 64, 8
    head, target_head = (torch.nn.Linear(width, vocab, bias=False) for _ in range(2))
    hidden = torch.randn(n, width, requires_grad=True)
    target_hidden = torch.randn(n, width)
    with saved_sizes() as saved:
        kl, _ = chunked_kl(hidden, head, target_hidden, chunk, target_head=target_head)
    assert max(saved) < chunk * vocab
    kl.sum().backward()
    logp = torch.log_softmax(head(hidden), -1)
    q = torch.log_softmax(target_head(target_hidden), -1).detach()
    whole = (logp.exp() * (logp - q)).sum(-1)
    torch.testing.assert_close(kl.detach(), whole.detach(), atol=1e-5, rtol=1e-5)
    reference = torch.autograd.grad(whole.sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, reference, atol=1e-5, rtol=1e-5)


def test_inverse_q_distill_on_text_trains_the_same_with_and_without_chunks(text_files, tmp_path):  # noqa: F811
    """reverse-kl's update and the estimator's target through the kernel, in a 3-step text
    run (2-position chunks), against the whole logits (train.logit_chunk = 0)."""
    import json

    from tokenmdp.cli import main

    rows = {}
    for name, chunk in (("whole", "0"), ("chunked", "2")):
        sets = text_run(
            text_files,
            tmp_path / name,
            "algorithm.name=inverse-q-distill",
            'estimator.guide="kind"',
            "train.steps=3",
            f"train.logit_chunk={chunk}",
        )
        assert main(["train", *[a for s in sets for a in ("--set", s)]]) == 0
        rows[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert all("losses/reverse_kl" in row for row in rows["whole"][1:])
    for whole, chunked_row in zip(rows["whole"], rows["chunked"], strict=True):
        for key in ("losses/reverse_kl", "policy/entropy", "true_reward", "kl_ref"):
            if key in whole:
                assert chunked_row[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-5), key
